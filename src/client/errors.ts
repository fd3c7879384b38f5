// Typed errors of the NBD client. What an error kills decides its class:
// - NbdRequestError: the server answered one request with an errno; the connection carries on.
// - NbdConnectionError (and its subclasses): the connection is gone or can no longer be trusted
//   (dropped, timed out, protocol violation by the server, closed by us); every pending request
//   fails with the same error.
// - NbdOptionError: the server refused an option during the handshake (unknown export, policy).
// - NbdUsageError: the caller asked for something the export or the client cannot do (misaligned,
//   out of range, read-only, unsupported command, bad URI); nothing was sent.
import { commandName, errnoName } from "../protocol/constants.ts";
import { NbdError } from "../protocol/errors.ts";

/** The server failed one request with an NBD errno (`errno`, named in `code`, e.g. "EIO"). */
export class NbdRequestError extends NbdError {
  /** The errno's name, e.g. "EIO", "EINVAL", "ENOSPC" ("errno N" for values the spec does not name). */
  readonly code: string;
  /** The command that failed, e.g. "READ". */
  readonly command: string;
  readonly offset: number;
  readonly length: number;
  /** The human-readable message of a structured error chunk, if the server sent one. */
  readonly serverMessage: string | undefined;
  constructor(errno: number, type: number, offset: number, length: number, serverMessage?: string) {
    const name = errnoName(errno);
    super(errno, `${commandName(type)} at ${offset} (+${length}) failed: ${name}${serverMessage ? `: ${serverMessage}` : ""}`);
    this.name = "NbdRequestError";
    this.code = name;
    this.command = commandName(type);
    this.offset = offset;
    this.length = length;
    this.serverMessage = serverMessage;
  }
}

/** The connection failed as a whole; every pending request fails with this error. */
export class NbdConnectionError extends Error {
  /** A stable code: "DISCONNECTED", "TIMEOUT", "CLOSED", "CONNECT_FAILED" or a protocol-violation code. */
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "NbdConnectionError";
    this.code = code;
  }
}

/** The server closed or reset the connection (code "DISCONNECTED"), or it could not be opened ("CONNECT_FAILED"). */
export class NbdDisconnectedError extends NbdConnectionError {
  constructor(message: string, options?: { cause?: unknown }, code = "DISCONNECTED") {
    super(code, message, options);
    this.name = "NbdDisconnectedError";
  }
}

/** A request (or a handshake step) did not complete before its deadline (code "TIMEOUT"). */
export class NbdTimeoutError extends NbdConnectionError {
  constructor(message: string) {
    super("TIMEOUT", message);
    this.name = "NbdTimeoutError";
  }
}

/**
 * The server broke the protocol (bad magic, unknown cookie, impossible chunk); the byte stream
 * cannot be trusted any more. `code` names the violation, e.g. "BAD_REPLY_MAGIC".
 */
export class NbdProtocolViolation extends NbdConnectionError {
  constructor(code: string, message: string) {
    super(code, message);
    this.name = "NbdProtocolViolation";
  }
}

/** The client was closed (code "CLOSED"), by close() or destroy(). */
export class NbdClosedError extends NbdConnectionError {
  constructor(message = "the NBD connection is closed") {
    super("CLOSED", message);
    this.name = "NbdClosedError";
  }
}

/** The server refused an option during the handshake. `code` is the reply name, e.g. "ERR_UNKNOWN". */
export class NbdOptionError extends Error {
  readonly code: string;
  /** The option that was refused, e.g. "GO". */
  readonly option: string;
  /** The raw reply type (e.g. 0x80000006 for ERR_UNKNOWN). */
  readonly reply: number;
  constructor(option: string, reply: number, code: string, message: string) {
    super(message);
    this.name = "NbdOptionError";
    this.code = code;
    this.option = option;
    this.reply = reply;
  }
}

/** Codes of {@link NbdUsageError}. */
export type UsageErrorCode =
  | "BAD_URI" | "UNSUPPORTED_SCHEME" | "BAD_ARGUMENT" | "MISALIGNED" | "OUT_OF_RANGE" | "READ_ONLY" | "UNSUPPORTED";

/** The caller asked for something the export or the client cannot do; nothing was sent. */
export class NbdUsageError extends Error {
  readonly code: UsageErrorCode;
  constructor(code: UsageErrorCode, message: string) {
    super(message);
    this.name = "NbdUsageError";
    this.code = code;
  }
}
