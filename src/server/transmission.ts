// The transmission phase (hot path): the receiver state machine asking for "N bytes" (headers
// parsed in place, WRITE payloads taken as views of the incoming chunk when they fit), request
// checks and dispatch to the checked export, in-flight bookkeeping, flow control and disconnect.
import {
  HARD_MAX_PAYLOAD, NBD_CMD_BLOCK_STATUS, NBD_CMD_CACHE, NBD_CMD_DISC, NBD_CMD_FLAG_DF, NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM,
  NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_EINVAL, NBD_ENOSPC, NBD_ESHUTDOWN, NBD_REQUEST_SIZE, commandName, errnoName,
} from "../protocol/constants.ts";
import { newRequestHeader, parseRequest } from "../protocol/codec.ts";
import { NbdError, toNbdErrno } from "../protocol/errors.ts";
import type { CheckedExport } from "../devices/checked.ts";
import { FAST_ZERO, FUA, MAY_TRIM, REQ_ONE, isPromise } from "../devices/types.ts";
import type { Logger } from "./log.ts";
import type { ExportStats } from "./metrics.ts";
import { ReplyWriter } from "./replies.ts";
import { type ExportTable, type Negotiated, PendingRequest, type SessionLink, type Transport } from "./types.ts";

const enum Rx { Header, Payload, Discard }

/** Output queued above this pauses reading from the client; reading resumes below LOW_WATER. */
export const HIGH_WATER = 32 * 1024 * 1024;
export const LOW_WATER = 8 * 1024 * 1024;
/** At most this many asynchronous requests in flight per connection. */
const MAX_IN_FLIGHT = 64;

const VALID_FLAGS: number[] = [];
VALID_FLAGS[NBD_CMD_READ] = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF;
VALID_FLAGS[NBD_CMD_WRITE] = NBD_CMD_FLAG_FUA;
VALID_FLAGS[NBD_CMD_DISC] = NBD_CMD_FLAG_FUA;
VALID_FLAGS[NBD_CMD_FLUSH] = NBD_CMD_FLAG_FUA;
VALID_FLAGS[NBD_CMD_TRIM] = NBD_CMD_FLAG_FUA;
VALID_FLAGS[NBD_CMD_CACHE] = NBD_CMD_FLAG_FUA;
VALID_FLAGS[NBD_CMD_WRITE_ZEROES] = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO;
VALID_FLAGS[NBD_CMD_BLOCK_STATUS] = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE;

const EMPTY = new Uint8Array(0);

/**
 * One connection's transmission phase, built once the handshake chose an export. The receiver
 * and dispatch stay in this one class so a request goes from bytes to device call without
 * crossing objects; replies go to one ReplyWriter. Extended headers will make the request header
 * size and parser a choice fixed here at construction (from Negotiated).
 */
export class Transmission {
  private readonly exp: CheckedExport;
  private readonly structured: boolean;
  private readonly hasContexts: boolean;
  private readonly w: ReplyWriter;
  private readonly debug: boolean;
  /** Counters for metrics, or null when they are off. */
  private readonly stats: ExportStats | null;

  // Receiver.
  private rx = Rx.Header;
  private readonly hdr = newRequestHeader();
  private readonly hdrBuf = new Uint8Array(NBD_REQUEST_SIZE);
  private hdrFill = 0;
  private payload: Uint8Array = EMPTY;
  private payloadFill = 0;
  private discardLeft = 0;
  /** The request whose payload is being received (or discarded). */
  private pendingReq: PendingRequest | null = null;

  // In-flight bookkeeping and flow control.
  private inFlight = 0;
  private paused: boolean;
  private backlog: Uint8Array | null = null;
  private disconnecting = false;
  /** Called once nothing is in flight any more, after the connection closed (see whenIdle). */
  private onIdle: (() => void) | null = null;

  /** `paused`: reading was already paused during the handshake (output backpressure). */
  constructor(
    private readonly s: SessionLink, private readonly t: Transport, private readonly exports: ExportTable,
    private readonly log: Logger, n: Negotiated, paused: boolean,
  ) {
    this.exp = n.exp;
    this.structured = n.structured;
    this.hasContexts = n.contexts.length > 0;
    this.w = new ReplyWriter(s, t, n);
    this.debug = log.debugEnabled;
    this.stats = n.lease.stats;
    this.paused = paused;
  }

  /** Requests answered asynchronously and not finished yet. */
  get requestsInFlight(): number {
    return this.inFlight;
  }

  /** Feed bytes from the socket. */
  onData(chunk: Uint8Array): void {
    if (this.backlog || this.paused) {
      this.backlog = this.backlog ? concat(this.backlog, chunk) : chunk;
      return;
    }
    this.receive(chunk, 0);
  }

  // ---------------------------------------------------------------- receiver (hot) -------------

  private receive(chunk: Uint8Array, pos: number): void {
    const len = chunk.length;
    while (pos < len) {
      if (this.s.closed || this.disconnecting) return;
      if (this.paused) {
        this.backlog = pos === 0 ? chunk : chunk.subarray(pos);
        return;
      }
      switch (this.rx) {
        case Rx.Header: {
          if (this.hdrFill === 0 && len - pos >= NBD_REQUEST_SIZE) {
            if (!parseRequest(chunk, pos, this.hdr)) return this.badMagic();
            pos += NBD_REQUEST_SIZE;
          } else {
            const n = Math.min(NBD_REQUEST_SIZE - this.hdrFill, len - pos);
            this.hdrBuf.set(chunk.subarray(pos, pos + n), this.hdrFill);
            this.hdrFill += n;
            pos += n;
            if (this.hdrFill < NBD_REQUEST_SIZE) return;
            this.hdrFill = 0;
            if (!parseRequest(this.hdrBuf, 0, this.hdr)) return this.badMagic();
          }
          const h = this.hdr;
          if (h.type === NBD_CMD_WRITE && h.length > 0) {
            const req = this.newRequest();
            if (h.length > HARD_MAX_PAYLOAD) {
              req.error = new NbdError(NBD_EINVAL, `write payload of ${h.length} bytes exceeds the maximum ${HARD_MAX_PAYLOAD}`);
              this.pendingReq = req;
              this.discardLeft = h.length;
              this.rx = Rx.Discard;
              continue;
            }
            if (len - pos >= h.length) {
              // The whole payload is in this chunk: take a view (each chunk is its own buffer).
              pos += h.length;
              this.dispatch(req, chunk.subarray(pos - h.length, pos));
              continue;
            }
            this.pendingReq = req;
            this.payload = new Uint8Array(h.length);
            this.payloadFill = 0;
            this.rx = Rx.Payload;
            continue;
          }
          this.dispatch(this.newRequest(), EMPTY);
          continue;
        }
        case Rx.Payload: {
          const n = Math.min(this.payload.length - this.payloadFill, len - pos);
          this.payload.set(chunk.subarray(pos, pos + n), this.payloadFill);
          this.payloadFill += n;
          pos += n;
          if (this.payloadFill === this.payload.length) {
            const req = this.pendingReq!;
            const payload = this.payload;
            this.pendingReq = null;
            this.payload = EMPTY;
            this.rx = Rx.Header;
            this.dispatch(req, payload);
          }
          continue;
        }
        case Rx.Discard: {
          const n = Math.min(this.discardLeft, len - pos);
          this.discardLeft -= n;
          pos += n;
          if (this.discardLeft === 0) {
            const req = this.pendingReq!;
            this.pendingReq = null;
            this.rx = Rx.Header;
            this.dispatch(req, EMPTY);
          }
          continue;
        }
      }
    }
  }

  private badMagic(): void {
    this.s.protocolError("BAD_REQUEST_MAGIC", "request does not start with NBD_REQUEST_MAGIC");
  }

  private newRequest(): PendingRequest {
    const h = this.hdr;
    return new PendingRequest(h.type, h.flags, h.cookieHi, h.cookieLo, h.offset, h.offsetTooBig, h.length);
  }

  // ---------------------------------------------------------------- dispatch (hot) -------------

  private dispatch(req: PendingRequest, payload: Uint8Array): void {
    if (this.debug) this.log.debug(`[${this.s.id}] ${commandName(req.type)} flags=0x${req.flags.toString(16)} offset=${req.offset} length=${req.length}`);
    if (req.type === NBD_CMD_DISC) {
      this.disconnecting = true;
      this.t.pause();
      this.log.info(`[${this.s.id}] ${this.s.peer}: disconnect requested`);
      this.maybeFinishDisconnect();
      return;
    }
    const st = this.stats;
    if (st !== null) req.start = performance.now();
    let r: unknown;
    try {
      if (req.error) throw req.error;
      r = this.execute(req, payload);
    } catch (e) {
      this.fail(req, e);
      return;
    }
    if (st !== null && !isPromise(r)) st.record(req.type, req.length, 0, req.start);
    if (isPromise(r)) {
      this.inFlight++;
      if (this.inFlight >= MAX_IN_FLIGHT) this.pauseReading();
      r.then(() => this.asyncDone(req, null), (e: unknown) => this.asyncDone(req, e));
    }
  }

  private asyncDone(req: PendingRequest, err: unknown): void {
    this.inFlight--;
    if (err !== null) this.fail(req, err);
    else if (this.stats !== null) this.stats.record(req.type, req.length, 0, req.start);
    if (this.inFlight === 0 && this.onIdle !== null) this.idle();
    if (this.paused && this.inFlight < MAX_IN_FLIGHT && this.t.queued() < LOW_WATER) this.unpause();
    this.maybeFinishDisconnect();
  }

  /** Run one request. Returns a Promise when the device answered asynchronously; the reply is sent by then. */
  private execute(req: PendingRequest, payload: Uint8Array): unknown {
    const exp = this.exp;
    const type = req.type;
    if (type > NBD_CMD_BLOCK_STATUS) throw new NbdError(NBD_EINVAL, `unknown command ${type}`);
    const badFlags = req.flags & ~VALID_FLAGS[type]!;
    if (badFlags) throw new NbdError(NBD_EINVAL, `flags 0x${badFlags.toString(16)} are not valid for ${commandName(type)}`);
    if (req.offsetTooBig) throw new NbdError(type === NBD_CMD_WRITE || type === NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL, `offset ${req.offset} is beyond 2^53`);
    if (this.exports.shuttingDown()) throw new NbdError(NBD_ESHUTDOWN, "server is shutting down");
    const fua = req.flags & NBD_CMD_FLAG_FUA ? FUA : 0;
    switch (type) {
      case NBD_CMD_READ: {
        if (req.length > HARD_MAX_PAYLOAD) throw new NbdError(NBD_EINVAL, `read of ${req.length} bytes exceeds the maximum ${HARD_MAX_PAYLOAD}`);
        return this.w.read(req);
      }
      case NBD_CMD_WRITE: {
        if (payload.length !== req.length) payload = EMPTY; // zero-length write
        return this.after(req, exp.write(payload, req.offset, fua));
      }
      case NBD_CMD_FLUSH: return this.after(req, exp.flush());
      case NBD_CMD_TRIM: return this.after(req, exp.trim(req.offset, req.length, fua));
      case NBD_CMD_CACHE: return this.after(req, exp.cache(req.offset, req.length));
      case NBD_CMD_WRITE_ZEROES: {
        let f = fua;
        if (!(req.flags & NBD_CMD_FLAG_NO_HOLE)) f |= MAY_TRIM;
        if (req.flags & NBD_CMD_FLAG_FAST_ZERO) f |= FAST_ZERO;
        return this.after(req, exp.zero(req.offset, req.length, f));
      }
      case NBD_CMD_BLOCK_STATUS: {
        if (!this.structured || !this.hasContexts) {
          throw new NbdError(NBD_EINVAL, "BLOCK_STATUS needs structured replies and a selected meta context");
        }
        if (req.length === 0) throw new NbdError(NBD_EINVAL, "BLOCK_STATUS of zero length");
        return this.w.blockStatus(req, req.flags & NBD_CMD_FLAG_REQ_ONE ? REQ_ONE : 0);
      }
    }
  }

  /** Send the success reply now, or when `r` resolves. */
  private after(req: PendingRequest, r: unknown): unknown {
    if (isPromise(r)) return r.then(() => this.w.ok(req));
    this.w.ok(req);
  }

  /** Log the real cause, then reply with its NBD errno. */
  private fail(req: PendingRequest, e: unknown): void {
    const errno = toNbdErrno(e);
    const msg = e instanceof Error ? e.message : String(e);
    if (this.stats !== null) this.stats.record(req.type, req.length, errno, req.start);
    if (e instanceof NbdError) {
      if (this.debug) this.log.debug(`[${this.s.id}] ${commandName(req.type)} offset=${req.offset} length=${req.length}: ${errnoName(errno)}: ${msg}`, this.fields(req, errno));
    } else {
      this.log.error(`[${this.s.id}] ${commandName(req.type)} offset=${req.offset} length=${req.length} failed: ${msg} (replying ${errnoName(errno)})`, this.fields(req, errno));
    }
    this.w.error(req, errno, msg);
  }

  private fields(req: PendingRequest, errno: number) {
    return { conn: this.s.id, peer: this.s.client.address, export: this.exp.name, command: commandName(req.type), errno: errnoName(errno) };
  }

  /** Run `f` once no request is in flight (now, or when the last one finishes). */
  whenIdle(f: () => void): void {
    this.onIdle = f;
    if (this.inFlight === 0) this.idle();
  }

  private idle(): void {
    const f = this.onIdle!;
    this.onIdle = null;
    f();
  }

  // ---------------------------------------------------------------- flow control ---------------

  /** Called (through the session) by the transport after send() when output is piling up. */
  checkBackpressure(): void {
    if (!this.paused && this.t.queued() > HIGH_WATER) this.pauseReading();
  }

  /** The socket's output drained: maybe resume reading and finish a disconnect. */
  onDrain(): void {
    if (this.paused && this.t.queued() < LOW_WATER && this.inFlight < MAX_IN_FLIGHT) this.unpause();
    this.maybeFinishDisconnect();
  }

  /** Server shutdown: stop reading; close once in-flight requests have been answered. */
  shutdown(): void {
    this.disconnecting = true;
    this.t.pause();
    this.maybeFinishDisconnect();
  }

  private pauseReading(): void {
    if (this.paused) return;
    this.paused = true;
    this.t.pause();
  }

  private unpause(): void {
    this.paused = false;
    if (!this.disconnecting) this.t.resume();
    const b = this.backlog;
    if (b) {
      this.backlog = null;
      this.receive(b, 0);
    }
  }

  private flushedAtDisconnect(): void {
    this.inFlight--;
    if (this.inFlight === 0 && this.onIdle !== null) this.idle();
    this.s.close();
  }

  private maybeFinishDisconnect(): void {
    if (!this.disconnecting || this.inFlight > 0 || this.s.closed) return;
    // Everything answered: make writes durable, then close once the output has drained.
    const exp = this.exp;
    if (exp.caps.canFlush) {
      try {
        const r = exp.flush();
        if (isPromise(r)) {
          this.inFlight++;
          r.then(() => { this.flushedAtDisconnect(); }, (e: unknown) => {
            this.log.error(`[${this.s.id}] flush at disconnect failed: ${(e as Error).message}`);
            this.flushedAtDisconnect();
          });
          return;
        }
      } catch (e) {
        this.log.error(`[${this.s.id}] flush at disconnect failed: ${(e as Error).message}`);
      }
    }
    this.s.close();
  }
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  const c = new Uint8Array(a.length + b.length);
  c.set(a, 0);
  c.set(b, a.length);
  return c;
}
