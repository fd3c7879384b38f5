// The client's transport adapter interface (DESIGN.md: runtime-specific code behind an adapter):
// `Conn`, the part of a node:net Socket the client uses, and `Rx`, where incoming bytes go. Types
// only: both implementations and the factory that picks one (transport.ts) import this file.
//
// The negotiation and the transmission phase see nothing but these. STARTTLS (nbds://) is an
// upgrade from one `Opened` to another: the handshake channel (handshake-channel.ts) detaches
// from the plain connection and attaches to the encrypted one.
import type { ClientTls } from "./tls.ts";
import type { NbdTarget } from "./uri.ts";

/** The socket operations the client needs (a node:net Socket satisfies it). */
export interface Conn {
  /** Queues bytes in order. The caller does not modify `data` afterwards (it may be sent later, without a copy). */
  write(data: Uint8Array): unknown;
  /** Sends whatever is queued, then a FIN. */
  end(): unknown;
  /** Closes at once; "close" follows (asynchronously). Idempotent. */
  destroy(): unknown;
  on(event: "error", f: (e: Error) => void): unknown;
  on(event: "end" | "close", f: () => void): unknown;
  on(event: "data", f: (b: Buffer) => void): unknown;
  off(event: "error", f: (e: Error) => void): unknown;
  off(event: "end" | "close", f: () => void): unknown;
}

/**
 * Where a connection's incoming bytes go: `on` sees `buf[0..n)`. It must copy whatever it keeps
 * unless `owned` is true (the buffer is never reused by the transport and may be kept as a view).
 */
export interface Rx {
  on: (buf: Buffer, n: number) => void;
  /** True when every buffer handed to `on` is fresh and never written again by the transport. */
  readonly owned: boolean;
  /**
   * Optional: receives what the socket holds right now straight into `dst[off, off+len)`, without
   * waiting and without passing through `on`. Returns the byte count; 0 means nothing is there now
   * (end of stream and errors then arrive through the usual events). Lets the receiver put READ
   * payloads where they belong with one kernel copy and no intermediate buffer. (A TLS transport
   * will have none: the bytes on the socket are ciphertext.)
   */
  recv?: (dst: Uint8Array, off: number, len: number) => number;
}

/** An open connection and its receive hook. */
export interface Opened {
  socket: Conn;
  rx: Rx;
  /**
   * Runs the TLS handshake over this connection (after STARTTLS was acknowledged) and resolves
   * with the encrypted connection; this one must not be used any more. Fails with
   * NbdDisconnectedError (code "TLS_FAILED") or NbdTimeoutError.
   */
  startTls?(tls: ClientTls, timeoutMs: number): Promise<Opened>;
}

/** Opens a Conn; fails with NbdDisconnectedError("CONNECT_FAILED") or NbdTimeoutError. */
export type Opener = (target: NbdTarget, timeoutMs: number) => Promise<Opened>;
