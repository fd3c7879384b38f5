// NBD protocol constants, named as in the specification (doc/proto.md of NetworkBlockDevice/nbd).
// Pure data: no I/O, no runtime-specific APIs. 64-bit magics are split into high/low 32-bit halves
// so the hot path never needs BigInt.

// Handshake magics
export const NBDMAGIC_HI = 0x4e42444d; // "NBDM"
export const NBDMAGIC_LO = 0x41474943; // "AGIC"
export const IHAVEOPT_HI = 0x49484156; // "IHAV"
export const IHAVEOPT_LO = 0x454f5054; // "EOPT"
export const OPT_REPLY_MAGIC_HI = 0x0003e889;
export const OPT_REPLY_MAGIC_LO = 0x045565a9;

// Transmission magics
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;
export const NBD_EXTENDED_REQUEST_MAGIC = 0x21e41c71;
export const NBD_EXTENDED_REPLY_MAGIC = 0x6e8a278c;

// Handshake flags (server, 16 bit) and client flags (32 bit)
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

// Options
export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_PEEK_EXPORT = 4;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;
export const NBD_OPT_EXTENDED_HEADERS = 11;

// Option reply types
export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
export const NBD_REP_ERR_UNSUP = 0x80000001;
export const NBD_REP_ERR_POLICY = 0x80000002;
export const NBD_REP_ERR_INVALID = 0x80000003;
export const NBD_REP_ERR_PLATFORM = 0x80000004;
export const NBD_REP_ERR_TLS_REQD = 0x80000005;
export const NBD_REP_ERR_UNKNOWN = 0x80000006;
export const NBD_REP_ERR_SHUTDOWN = 0x80000007;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = 0x80000008;
export const NBD_REP_ERR_TOO_BIG = 0x80000009;
export const NBD_REP_ERR_EXT_HEADER_REQD = 0x8000000a;

// Info types (inside NBD_REP_INFO)
export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

// Transmission flags (16 bit)
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_RESIZE = 1 << 9;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;
/** Extended headers only: BLOCK_STATUS may carry a payload naming the contexts to report. */
export const NBD_FLAG_BLOCK_STATUS_PAYLOAD = 1 << 12;

// Commands
export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;

// Command flags (16 bit)
export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;
export const NBD_CMD_FLAG_PAYLOAD_LEN = 1 << 5;

// Structured reply
export const NBD_REPLY_FLAG_DONE = 1 << 0;
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
/** Extended headers only (and the only status chunk then): 64-bit extent lengths and status. */
export const NBD_REPLY_TYPE_BLOCK_STATUS_EXT = 6;
export const NBD_REPLY_TYPE_ERROR = 0x8001;
export const NBD_REPLY_TYPE_ERROR_OFFSET = 0x8002;

// Errors (wire values)
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

// base:allocation
export const NBD_STATE_HOLE = 1 << 0;
export const NBD_STATE_ZERO = 1 << 1;

export const BASE_ALLOCATION = "base:allocation";
export const QEMU_ALLOCATION_DEPTH = "qemu:allocation-depth";

// Sizes
export const NBD_REQUEST_SIZE = 28;
export const NBD_SIMPLE_REPLY_SIZE = 16;
export const NBD_STRUCTURED_HEADER_SIZE = 20;
/** Extended headers: every request and every reply chunk header is 32 bytes. */
export const NBD_EXTENDED_REQUEST_SIZE = 32;
export const NBD_EXTENDED_REPLY_SIZE = 32;
export const NBD_OPTION_HEADER_SIZE = 16;
export const NBD_OPTION_REPLY_HEADER_SIZE = 20;
/** The 124 zero bytes after an EXPORT_NAME reply when NO_ZEROES was not agreed. */
export const EXPORT_NAME_PADDING = 124;
/** Strings in the protocol MUST be at most 4096 bytes. */
export const NBD_MAX_STRING = 4096;
/** Largest offset/size we represent exactly without BigInt. */
export const MAX_SAFE_OFFSET = 2 ** 53;

/** Default advertised block sizes: min 1, preferred 4096, max payload 32 MiB. */
export const DEFAULT_MIN_BLOCK = 1;
export const DEFAULT_PREFERRED_BLOCK = 4096;
export const DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024;
/**
 * Payloads are accepted up to this from clients that never agreed to block sizes (legacy clients
 * send 48 MiB writes); above it a compact WRITE's payload is consumed and EINVAL returned, and an
 * extended request's payload disconnects. Clients that asked for NBD_INFO_BLOCK_SIZE in GO are
 * held to the advertised maximum instead.
 */
export const HARD_MAX_PAYLOAD = 64 * 1024 * 1024;

const errnoNames: Record<number, string> = {
  [NBD_EPERM]: "EPERM",
  [NBD_EIO]: "EIO",
  [NBD_ENOMEM]: "ENOMEM",
  [NBD_EINVAL]: "EINVAL",
  [NBD_ENOSPC]: "ENOSPC",
  [NBD_EOVERFLOW]: "EOVERFLOW",
  [NBD_ENOTSUP]: "ENOTSUP",
  [NBD_ESHUTDOWN]: "ESHUTDOWN",
};
export function errnoName(errno: number): string {
  return errnoNames[errno] ?? `errno ${errno}`;
}

const commandNames = ["READ", "WRITE", "DISC", "FLUSH", "TRIM", "CACHE", "WRITE_ZEROES", "BLOCK_STATUS"];
export function commandName(type: number): string {
  return commandNames[type] ?? `CMD_${type}`;
}

const optionNames: Record<number, string> = {
  1: "EXPORT_NAME", 2: "ABORT", 3: "LIST", 4: "PEEK_EXPORT", 5: "STARTTLS", 6: "INFO", 7: "GO",
  8: "STRUCTURED_REPLY", 9: "LIST_META_CONTEXT", 10: "SET_META_CONTEXT", 11: "EXTENDED_HEADERS",
};
export function optionName(opt: number): string {
  return optionNames[opt] ?? `OPT_${opt}`;
}

const repNames: Record<number, string> = {
  [NBD_REP_ACK]: "ACK", [NBD_REP_SERVER]: "SERVER", [NBD_REP_INFO]: "INFO", [NBD_REP_META_CONTEXT]: "META_CONTEXT",
  [NBD_REP_ERR_UNSUP]: "ERR_UNSUP", [NBD_REP_ERR_POLICY]: "ERR_POLICY", [NBD_REP_ERR_INVALID]: "ERR_INVALID",
  [NBD_REP_ERR_PLATFORM]: "ERR_PLATFORM", [NBD_REP_ERR_TLS_REQD]: "ERR_TLS_REQD", [NBD_REP_ERR_UNKNOWN]: "ERR_UNKNOWN",
  [NBD_REP_ERR_SHUTDOWN]: "ERR_SHUTDOWN", [NBD_REP_ERR_BLOCK_SIZE_REQD]: "ERR_BLOCK_SIZE_REQD",
  [NBD_REP_ERR_TOO_BIG]: "ERR_TOO_BIG", [NBD_REP_ERR_EXT_HEADER_REQD]: "ERR_EXT_HEADER_REQD",
};
export function replyTypeName(rep: number): string {
  return repNames[rep] ?? `REP_${rep.toString(16)}`;
}
