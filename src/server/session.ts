// One client connection: handshake (→ TLS → handshake again) → transmission → closed. The session
// owns the phase and the connection's end, and composes Handshake, then Transmission (or
// ExtendedTransmission) with its ReplyWriter; it talks to a Transport, never a socket, so it runs
// over TCP, unix sockets, TLS and fakes.
import type { Logger } from "./log.ts";
import { ExtendedTransmission } from "./extended.ts";
import { Handshake } from "./handshake.ts";
import { HIGH_WATER, LOW_WATER, Transmission } from "./transmission.ts";
import type { ExportTable, Negotiated, SessionLink, TlsMode, Transport } from "./types.ts";
import { UNIX_PEER, type ClientIdentity, type TlsIdentity } from "./identity.ts";

let nextSessionId = 1;

export interface SessionOptions {
  /** Who is connecting (default: a unix-socket client named by `peer`). */
  client?: ClientIdentity;
  /** STARTTLS policy; "off" unless the transport can encrypt. */
  tls?: TlsMode;
  /**
   * Offered each chosen export before transmission starts: returns what now serves the connection
   * elsewhere (a thread of its own, thread-pool.ts), or null to serve it here. `rest` is what
   * arrived after the last option.
   */
  handOff?: (n: Negotiated, rest: Uint8Array) => Away | null;
}

/** A connection served elsewhere (see SessionOptions.handOff): stop() ends it. */
export interface Away {
  stop(): void;
}

/**
 * The phase is (closed, hs, tx): handshaking while `hs` is set, in the TLS handshake while both
 * are null, transmitting once `tx` is set, and closed (for good) once `closed` is true. STARTTLS
 * is a step of the handshake phase: the session asks its transport to upgrade and, once told
 * "encrypted, peer is X", restarts option haggling inside TLS.
 */
export class Session implements SessionLink {
  readonly id = nextSessionId++;
  readonly peer: string;
  /** Replaced (not mutated) when STARTTLS adds the TLS identity. */
  client: ClientIdentity;
  /** See SessionLink.closed; set only by close(), protocolError() and onClose(). */
  closed = false;
  private readonly t: Transport;
  private readonly exports: ExportTable;
  private readonly log: Logger;
  private hs: Handshake | null;
  private tx: Transmission | null = null;
  /** Set once the transmission phase runs elsewhere (SessionOptions.handOff). */
  private away: Away | null = null;
  private readonly handOff: SessionOptions["handOff"];
  private readonly tls: TlsMode;
  /** NO_ZEROES from the client flags, carried across STARTTLS. */
  private noZeroes = false;
  /** Output backpressure paused reading during the handshake (carried into transmission). */
  private hsPaused = false;
  /** What the handshake chose, until its lease is given back. */
  private chosen: Negotiated | null = null;
  /** The export this session chose, if any (for the close log line). */
  exportName: string | undefined;

  constructor(t: Transport, exports: ExportTable, log: Logger, peer: string, opts: SessionOptions = {}) {
    this.t = t;
    this.exports = exports;
    this.log = log;
    this.peer = peer;
    this.client = opts.client ?? UNIX_PEER;
    this.tls = t.startTls ? opts.tls ?? "off" : "off";
    this.handOff = opts.handOff;
    this.hs = new Handshake(this, t, exports, log, { tls: this.tls });
  }

  /** True until an export is chosen (option haggling or the TLS handshake is going on). */
  get negotiating(): boolean {
    return this.tx === null && this.away === null && !this.closed;
  }

  /** Feed bytes from the socket. */
  onData(chunk: Uint8Array): void {
    if (this.closed) return;
    const tx = this.tx;
    if (tx !== null) {
      tx.onData(chunk);
      return;
    }
    const hs = this.hs;
    if (hs === null) return; // the TLS handshake is going on: the transport does not deliver
    const rest = hs.feed(chunk);
    if (rest === null) return;
    if (hs.startTls) {
      this.hs = null;
      this.noZeroes = hs.clientNoZeroes;
      this.t.startTls!(rest);
      return;
    }
    const n = hs.result!;
    this.chosen = n;
    this.exportName = n.exp.name;
    if (n.lease.stats !== null) n.lease.stats.connections++;
    this.hs = null;
    const away = this.handOff?.(n, rest) ?? null;
    if (away !== null) {
      this.away = away;
      return;
    }
    const next = n.extended
      ? new ExtendedTransmission(this, this.t, this.exports, this.log, n, this.hsPaused)
      : new Transmission(this, this.t, this.exports, this.log, n, this.hsPaused);
    this.tx = next;
    if (rest.length) next.onData(rest);
  }

  /** The transport finished the TLS handshake: option haggling starts again, encrypted. */
  onSecured(tls: TlsIdentity): void {
    if (this.closed) return;
    this.client = { ...this.client, tls };
    const who = tls.kind === "psk" ? `PSK user "${tls.name}"` : tls.name !== null ? `client certificate CN="${tls.name}"` : "no client certificate";
    this.log.info(`[${this.id}] ${this.peer}: TLS established (${tls.protocol} ${tls.cipher}), ${who}`);
    this.hs = new Handshake(this, this.t, this.exports, this.log, { tls: this.tls, encrypted: { noZeroes: this.noZeroes } });
  }

  /** The TLS handshake failed: only this connection ends. */
  onTlsFailed(reason: string): void {
    if (this.closed) return;
    this.log.warn(`[${this.id}] ${this.peer}: TLS handshake failed: ${reason}; closing the connection`);
    this.closed = true;
    this.t.destroy();
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
    if (!this.closed) {
      const n = this.tx?.requestsInFlight ?? 0;
      if (n > 0) this.log.info(`[${this.id}] ${this.peer}: connection closed with ${n} request(s) in flight`);
      this.closed = true;
    }
    this.releaseExport();
  }


  /** Give the export's lease back once no request is running on it any more. */
  private releaseExport(): void {
    const n = this.chosen;
    if (n === null) return;
    this.chosen = null;
    const done = () => {
      if (n.lease.stats !== null) n.lease.stats.connections--;
      n.lease.release();
    };
    if (this.tx !== null) this.tx.whenIdle(done);
    else done();
  }

  /** Server shutdown: stop reading; close once in-flight requests have been answered. */
  shutdown(): void {
    if (this.closed) return;
    if (this.away !== null) this.away.stop();
    else if (this.tx === null) this.close();
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
