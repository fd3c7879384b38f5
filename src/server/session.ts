// One client connection: handshake → transmission → closed. The session owns the phase and the
// connection's end, and composes Handshake, then Transmission (or ExtendedTransmission) with its
// ReplyWriter; it talks to a Transport, never a socket, so it runs over TCP, unix sockets and fakes.
import type { Logger } from "./log.ts";
import { ExtendedTransmission } from "./extended.ts";
import { Handshake } from "./handshake.ts";
import { HIGH_WATER, LOW_WATER, Transmission } from "./transmission.ts";
import type { ExportTable, SessionLink, Transport } from "./types.ts";

let nextSessionId = 1;

/**
 * The phase is (closed, tx): handshaking while `tx` is null, transmitting once it is set, and
 * closed (for good) once `closed` is true. TLS will land here as a step of the handshake phase:
 * the session asks its transport to upgrade and tells the handshake "encrypted, peer is X".
 */
export class Session implements SessionLink {
  readonly id = nextSessionId++;
  readonly peer: string;
  /** See SessionLink.closed; set only by close(), protocolError() and onClose(). */
  closed = false;
  private readonly t: Transport;
  private readonly exports: ExportTable;
  private readonly log: Logger;
  private hs: Handshake | null;
  private tx: Transmission | null = null;
  /** Output backpressure paused reading during the handshake (carried into transmission). */
  private hsPaused = false;

  constructor(t: Transport, exports: ExportTable, log: Logger, peer: string) {
    this.t = t;
    this.exports = exports;
    this.log = log;
    this.peer = peer;
    this.hs = new Handshake(this, t, exports, log);
  }

  /** Feed bytes from the socket. */
  onData(chunk: Uint8Array): void {
    if (this.closed) return;
    const tx = this.tx;
    if (tx !== null) {
      tx.onData(chunk);
      return;
    }
    const hs = this.hs!;
    const rest = hs.feed(chunk);
    if (rest === null) return;
    const n = hs.result!;
    const next = n.extended
      ? new ExtendedTransmission(this, this.t, this.exports, this.log, n, this.hsPaused)
      : new Transmission(this, this.t, this.exports, this.log, n, this.hsPaused);
    this.hs = null;
    this.tx = next;
    if (rest.length) next.onData(rest);
  }

  /** Called by the transport after send() when output is piling up. */
  checkBackpressure(): void {
    const tx = this.tx;
    if (tx !== null) {
      tx.checkBackpressure();
    } else if (!this.hsPaused && this.t.queued() > HIGH_WATER) {
      this.hsPaused = true;
      this.t.pause();
    }
  }

  /** The socket's output drained: maybe resume reading and finish a disconnect. */
  onDrain(): void {
    const tx = this.tx;
    if (tx !== null) {
      tx.onDrain();
    } else if (this.hsPaused && this.t.queued() < LOW_WATER) {
      this.hsPaused = false;
      this.t.resume();
    }
  }

  /** The socket closed (either side). */
  onClose(): void {
    if (this.closed) return;
    const n = this.tx?.requestsInFlight ?? 0;
    if (n > 0) this.log.info(`[${this.id}] ${this.peer}: connection closed with ${n} request(s) in flight`);
    this.closed = true;
  }

  /** Server shutdown: stop reading; close once in-flight requests have been answered. */
  shutdown(): void {
    if (this.closed) return;
    if (this.tx === null) this.close();
    else this.tx.shutdown();
  }

  get idle(): boolean {
    return this.closed;
  }

  /** Close after everything queued has been sent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.t.end();
  }

  /** The byte stream can no longer be trusted: drop the connection. */
  protocolError(code: string, message: string): void {
    this.log.warn(`[${this.id}] ${this.peer}: protocol error ${code}: ${message}; closing the connection`);
    this.closed = true;
    this.t.destroy();
  }
}
