// What the option phase hands to the transmission phase, as plain data: the export's facts
// (ExportInfo, decoded from the transmission flags), the handshake style, the selected meta
// contexts and the open transport. Negotiation produces a `Negotiated`; NbdClient is built from it.
import {
  NBD_FLAG_CAN_MULTI_CONN, NBD_FLAG_READ_ONLY, NBD_FLAG_ROTATIONAL, NBD_FLAG_SEND_CACHE, NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO, NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES,
} from "../protocol/constants.ts";
import type { Conn, Rx } from "./conn.ts";

/** Block size constraints advertised by the server (NBD_INFO_BLOCK_SIZE). */
export interface BlockSizeInfo {
  minimum: number;
  preferred: number;
  /** Largest payload; 0xffffffff means no limit. */
  maximum: number;
}

/** What the server says about one export (from INFO, GO, EXPORT_NAME or the oldstyle greeting). */
export interface ExportInfo {
  /** The name we asked for. */
  name: string;
  /** The canonical name, if the server sent NBD_INFO_NAME. */
  canonicalName?: string;
  /** The description, if the server sent NBD_INFO_DESCRIPTION. */
  description?: string;
  /** Size in bytes. */
  size: number;
  /** Raw 16-bit transmission flags. */
  flags: number;
  /** Block size constraints, if the server advertised them. */
  blockSize?: BlockSizeInfo;
  readOnly: boolean;
  rotational: boolean;
  canFlush: boolean;
  canFua: boolean;
  canTrim: boolean;
  canZero: boolean;
  canFastZero: boolean;
  canCache: boolean;
  /** DF needs both the flag and structured replies (or extended headers). */
  canDf: boolean;
  canMultiConn: boolean;
}

/** One entry of an NBD_OPT_LIST answer. */
export interface ExportListing {
  name: string;
  description: string;
}

/** The handshake style the server used. */
export type HandshakeStyle = "oldstyle" | "newstyle" | "newstyle-fixed";

/** Options shared by every way of opening a connection. */
export interface ConnectOptions {
  /** Deadline for the TCP/unix connect and for each handshake reply, in ms (default 10000). */
  connectTimeoutMs?: number;
  /** Deadline for each request in the transmission phase, in ms (default 60000). */
  requestTimeoutMs?: number;
  /**
   * Busy-poll for replies for up to this many microseconds before going back to the event loop
   * (default 0: never). Only where the transport receives in place (Bun with libc reachable). It
   * trades CPU for throughput when many requests are in flight: bytes that would otherwise wait
   * for the next loop turn (and an extra buffer and copy) go straight into the READ buffers.
   */
  busyPollMicros?: number;
}

/**
 * The result of GO/EXPORT_NAME: everything the transmission phase needs, and nothing that points
 * back into the negotiation.
 */
export interface Negotiated {
  socket: Conn;
  /** The socket's receive hook (absent: the client listens for "data" events instead). */
  rx?: Rx;
  info: ExportInfo;
  /** Replies come as chunks: structured replies were agreed, or extended headers (which imply them). */
  structured: boolean;
  /**
   * Extended headers were agreed: 32-byte requests (64-bit lengths, PAYLOAD_LEN on payloads) and
   * 32-byte reply chunks; tells the request writer and the reply receiver which format to use.
   * Optional for callers that build a Negotiated by hand (absent: compact headers).
   */
  extended?: boolean;
  /** Selected meta contexts: name → id. */
  metaContexts: Map<string, number>;
  /** Bytes that arrived after the handshake. */
  leftover: Buffer[];
  style: HandshakeStyle;
}

/** Decodes transmission flags into booleans (`structured`: chunked replies, from either option). */
export function describeExport(name: string, size: number, flags: number, structured: boolean): ExportInfo {
  return {
    name, size, flags,
    readOnly: (flags & NBD_FLAG_READ_ONLY) !== 0,
    rotational: (flags & NBD_FLAG_ROTATIONAL) !== 0,
    canFlush: (flags & NBD_FLAG_SEND_FLUSH) !== 0,
    canFua: (flags & NBD_FLAG_SEND_FUA) !== 0,
    canTrim: (flags & NBD_FLAG_SEND_TRIM) !== 0,
    canZero: (flags & NBD_FLAG_SEND_WRITE_ZEROES) !== 0,
    canFastZero: (flags & NBD_FLAG_SEND_FAST_ZERO) !== 0,
    canCache: (flags & NBD_FLAG_SEND_CACHE) !== 0,
    canDf: structured && (flags & NBD_FLAG_SEND_DF) !== 0,
    canMultiConn: (flags & NBD_FLAG_CAN_MULTI_CONN) !== 0,
  };
}
