/**
 * bun-nbd's NBD client library: connect to any NBD server (bun-nbd, nbdkit, qemu-nbd,
 * nbd-server) by URI, read, write, zero, trim, flush and ask block status, with pipelining,
 * structured replies and the server's block-size constraints honoured. Runs under Bun (on its
 * native sockets) and Node 20+ (on `node:net`).
 *
 * @example
 * ```ts
 * import { connect } from "bun-nbd/client";
 * const nbd = await connect("nbd://127.0.0.1:10809/disk");
 * const first = await nbd.read(0, 512);
 * for (const e of await nbd.extents()) console.log(e.offset, e.length, e.flags);
 * await nbd.close();
 * ```
 *
 * Errors are typed: {@link NbdRequestError} (the server failed one request, `code` is the errno
 * name), {@link NbdConnectionError} and its subclasses (the connection dropped, timed out or the
 * server broke the protocol: every pending request fails), {@link NbdOptionError} (the handshake
 * was refused, e.g. an unknown export) and {@link NbdUsageError} (a request the export cannot take,
 * refused before sending).
 *
 * @module
 */
// How a connection goes, one file after the other: connect.ts → transport.ts (opens a conn.ts
// adapter) → negotiate.ts (handshake-channel.ts, option-codec.ts) → a plain Negotiated
// (negotiated.ts) → client.ts (commands) → transmission.ts (requests.ts, sender.ts, receiver.ts
// with chunks.ts).
export { connect, inspectExport, listExports } from "./connect.ts";
export type { ClientOptions, ListedExport, ServerListing, Target } from "./connect.ts";
export { NbdClient, isConnectionError } from "./client.ts";
export type { BlockStatusOptions, ClientStats, Extent, Limits, ReadOptions, WriteOptions, ZeroOptions } from "./client.ts";
export {
  NbdClosedError, NbdConnectionError, NbdDisconnectedError, NbdOptionError, NbdProtocolViolation, NbdRequestError,
  NbdTimeoutError, NbdUsageError, type UsageErrorCode,
} from "./errors.ts";
export { Negotiation } from "./negotiate.ts";
export { describeExport } from "./negotiated.ts";
export type { BlockSizeInfo, ConnectOptions, ExportInfo, ExportListing, HandshakeStyle, Negotiated } from "./negotiated.ts";
export { copy, FileDestination, FileSource, NbdEndpoint, NullEndpoint } from "./copy.ts";
export type { CopyDestination, CopyOptions, CopyResult, CopySource, FileExtentProbe } from "./copy.ts";
export { formatNbdUri, NBD_DEFAULT_PORT, parseNbdUri, type NbdTarget, type TlsTarget } from "./uri.ts";
export { NBD_STATE_HOLE, NBD_STATE_ZERO } from "../protocol/constants.ts";
