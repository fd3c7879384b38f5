// Error values and the one place where a cause (an errno code from the OS, or our own NbdError)
// becomes an NBD wire errno. Pure: no I/O.
import {
  NBD_EINVAL, NBD_EIO, NBD_ENOMEM, NBD_ENOSPC, NBD_ENOTSUP, NBD_EOVERFLOW, NBD_EPERM, NBD_ESHUTDOWN,
} from "./constants.ts";

/** A request error: the session answers it with `errno` and carries on. */
export class NbdError extends Error {
  readonly errno: number;
  constructor(errno: number, message: string) {
    super(message);
    this.name = "NbdError";
    this.errno = errno;
  }
}

/** A protocol error: the byte stream can no longer be trusted and the connection closes. */
export class ProtocolError extends Error {
  /** A stable code for tests and logs, e.g. "BAD_REQUEST_MAGIC". */
  readonly code: string;
  constructor(code: string, message: string) {
    super(message);
    this.name = "ProtocolError";
    this.code = code;
  }
}

const osCodes: Record<string, number> = {
  EPERM: NBD_EPERM, EACCES: NBD_EPERM, EROFS: NBD_EPERM,
  EIO: NBD_EIO,
  ENOMEM: NBD_ENOMEM,
  EINVAL: NBD_EINVAL, ERANGE: NBD_EINVAL,
  ENOSPC: NBD_ENOSPC, EDQUOT: NBD_ENOSPC, EFBIG: NBD_ENOSPC,
  EOVERFLOW: NBD_EOVERFLOW,
  ENOTSUP: NBD_ENOTSUP, EOPNOTSUPP: NBD_ENOTSUP,
  ESHUTDOWN: NBD_ESHUTDOWN,
};

/** Map any thrown value to an NBD errno. Unknown causes become EIO. */
export function toNbdErrno(err: unknown): number {
  if (err instanceof NbdError) return err.errno;
  const code = (err as { code?: unknown } | null)?.code;
  if (typeof code === "string" && code in osCodes) return osCodes[code]!;
  return NBD_EIO;
}

export const einval = (msg: string) => new NbdError(NBD_EINVAL, msg);
export const eperm = (msg: string) => new NbdError(NBD_EPERM, msg);
export const enospc = (msg: string) => new NbdError(NBD_ENOSPC, msg);
export const eio = (msg: string) => new NbdError(NBD_EIO, msg);
export const enotsup = (msg: string) => new NbdError(NBD_ENOTSUP, msg);
