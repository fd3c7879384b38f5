// Which command flags each NBD command may carry (the spec's per-command flag lists), and the
// error a request with others gets: the transmission phase checks every request against these.
import {
  NBD_CMD_BLOCK_STATUS, NBD_CMD_CACHE, NBD_CMD_DISC, NBD_CMD_FLAG_DF, NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM,
  NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_EINVAL, commandName,
} from "../protocol/constants.ts";
import { NbdError } from "../protocol/errors.ts";

const VALID_FLAGS: number[] = [];
VALID_FLAGS[NBD_CMD_READ] = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF;
VALID_FLAGS[NBD_CMD_WRITE] = NBD_CMD_FLAG_FUA;
VALID_FLAGS[NBD_CMD_DISC] = NBD_CMD_FLAG_FUA;
VALID_FLAGS[NBD_CMD_FLUSH] = NBD_CMD_FLAG_FUA;
VALID_FLAGS[NBD_CMD_TRIM] = NBD_CMD_FLAG_FUA;
VALID_FLAGS[NBD_CMD_CACHE] = NBD_CMD_FLAG_FUA;
VALID_FLAGS[NBD_CMD_WRITE_ZEROES] = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO;
VALID_FLAGS[NBD_CMD_BLOCK_STATUS] = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE;
/** Without structured replies there is no DF (SEND_DF is not advertised): a DF READ gets EINVAL. */
const VALID_FLAGS_SIMPLE = VALID_FLAGS.slice();
VALID_FLAGS_SIMPLE[NBD_CMD_READ] = NBD_CMD_FLAG_FUA;

/** Allowed command flags, indexed by command type, for a session with or without structured replies. */
export function validFlags(structured: boolean): readonly number[] {
  return structured ? VALID_FLAGS : VALID_FLAGS_SIMPLE;
}

export function badFlagsError(type: number, bad: number): NbdError {
  const why = type === NBD_CMD_READ && bad & NBD_CMD_FLAG_DF ? " (DF needs structured replies)" : "";
  return new NbdError(NBD_EINVAL, `flags 0x${bad.toString(16)} are not valid for ${commandName(type)}${why}`);
}
