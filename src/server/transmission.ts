// The transmission phase (hot path): the receiver state machine asking for "N bytes" (compact
// headers parsed in place, WRITE payloads taken as views of the incoming chunk when they fit, the
// rest of a stream read on from the socket by direct-reader.ts where the transport allows),
// request checks (flag rules in request-flags.ts) and dispatch to the checked export, in-flight bookkeeping, flow control and
// disconnect. Extended headers subclass it (extended.ts): another header step, same everything else.
import {
  NBD_CMD_BLOCK_STATUS, NBD_CMD_CACHE, NBD_CMD_DISC, NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM,
  NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_EINVAL, NBD_ENOSPC, NBD_ESHUTDOWN, NBD_EXTENDED_REQUEST_SIZE, NBD_REQUEST_SIZE,
  commandName, errnoName,
} from "../protocol/constants.ts";
import { newRequestHeader, parseRequest, type RequestHeader } from "../protocol/codec.ts";
import { NbdError, toNbdErrno } from "../protocol/errors.ts";
import type { CheckedExport } from "../devices/checked.ts";
import { FAST_ZERO, FUA, MAY_TRIM, REQ_ONE, isPromise } from "../devices/types.ts";
import type { Logger } from "./log.ts";
import { DirectReader, STREAM_CHUNK } from "./direct-reader.ts";
import type { ExportStats } from "./metrics.ts";
import { clientFields } from "./identity.ts";
import { ReplyWriter } from "./replies.ts";
import { badFlagsError, validFlags } from "./request-flags.ts";
import { type ExportTable, type Negotiated, PendingRequest, type SessionLink, type Transport } from "./types.ts";

export const enum Rx { Header, Payload, Discard }

/** takeHeader results that are not a position. */
export const HEADER_PENDING = -1;
export const HEADER_BAD = -2;
/** Output queued above this pauses reading from the client; reading resumes below LOW_WATER. */
export const HIGH_WATER = 32 * 1024 * 1024;
export const LOW_WATER = 8 * 1024 * 1024;
/** At most this many asynchronous requests in flight per connection. */
const MAX_IN_FLIGHT = 64;

export const EMPTY = new Uint8Array(0);

/**
 * One connection's transmission phase, built once the handshake chose an export. The receiver
 * and dispatch stay in this one class so a request goes from bytes to device call without
 * crossing objects; replies go to one ReplyWriter. Extended headers are a subclass with its own
 * header step (ExtendedTransmission); the compact receive loop below never asks which it is.
 */
export class Transmission {
  private readonly exp: CheckedExport;
  private readonly structured: boolean;
  private readonly hasContexts: boolean;
  /** Allowed command flags per command (no DF without structured replies). */
  private readonly validFlags: readonly number[];
  /** Largest payload a request may carry (Negotiated.maxPayload). */
  protected readonly payloadLimit: number;
  protected readonly w: ReplyWriter;
  private readonly debug: boolean;
  /** Counters for metrics, or null when they are off. */
  private readonly stats: ExportStats | null;

  // Receiver.
  protected rx = Rx.Header;
  protected readonly hdr = newRequestHeader();
  /** Gathers a header split across chunks (room for the extended form too). */
  protected readonly hdrBuf = new Uint8Array(NBD_EXTENDED_REQUEST_SIZE);
  protected hdrFill = 0;
  private payload: Uint8Array = EMPTY;
  /** A WRITE payload was kept by a device that finished later (see startPayload). */
  private asyncWrites = false;
  private payloadFill = 0;
  private discardLeft = 0;
  /** The request whose payload is being received (or discarded). */
  private pendingReq: PendingRequest | null = null;

  // In-flight bookkeeping and flow control.
  private inFlight = 0;
  protected paused: boolean;
  protected backlog: Uint8Array | null = null;
  protected disconnecting = false;
  /** A WRITE, TRIM or WRITE_ZEROES came on this connection: its clean disconnect flushes. */
  private wrote = false;
  /** Reads on from the socket after a large chunk (null when the transport cannot). */
  protected readonly direct: DirectReader | null;
  private readonly feed = (chunk: Uint8Array): void => this.receive(chunk, 0);
  private readonly reading = (): boolean => !this.paused && !this.disconnecting && !this.s.closed;
  /** Called once nothing is in flight any more, after the connection closed (see whenIdle). */
  private onIdle: (() => void) | null = null;

  /**
   * `paused`: reading was already paused during the handshake (output backpressure). `w`: the
   * reply writer (extended headers bring their own).
   */
  constructor(
    protected readonly s: SessionLink, private readonly t: Transport, private readonly exports: ExportTable,
    private readonly log: Logger, n: Negotiated, paused: boolean, w?: ReplyWriter,
  ) {
    this.exp = n.exp;
    this.structured = n.structured;
    this.hasContexts = n.contexts.length > 0;
    this.validFlags = validFlags(n.structured);
    this.payloadLimit = n.maxPayload;
    this.w = w ?? new ReplyWriter(s, t, n);
    this.debug = log.debugEnabled;
    this.stats = n.lease.stats;
    this.paused = paused;
    this.direct = t.recvInto ? new DirectReader((d, o, l) => t.recvInto!(d, o, l)) : null;
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
    if (this.direct !== null && chunk.length >= STREAM_CHUNK) this.direct.drain(this.feed, this.reading);
  }

  // ---------------------------------------------------------------- receiver (hot) -------------

  protected receive(chunk: Uint8Array, pos: number): void {
    const len = chunk.length;
    while (pos < len) {
      if (this.s.closed || this.disconnecting) return;
      if (this.paused) {
        this.keepBacklog(chunk, pos);
        return;
      }
      switch (this.rx) {
        case Rx.Header: {
          const p = this.takeHeader(chunk, pos, NBD_REQUEST_SIZE, parseRequest);
          if (p < 0) return p === HEADER_BAD ? this.badMagic() : undefined;
          pos = p;
          const h = this.hdr;
          if (h.type === NBD_CMD_WRITE && h.length > 0) {
            const req = this.newRequest();
            if (h.length > this.payloadLimit) req.error = this.tooLarge(h.length);
            pos = this.startPayload(req, chunk, pos, h.length);
            continue;
          }
          this.dispatch(this.newRequest(), EMPTY);
          continue;
        }
        case Rx.Payload:
          pos = this.takePayload(chunk, pos);
          continue;
        case Rx.Discard:
          pos = this.takeDiscard(chunk, pos);
          continue;
      }
    }
  }

  /** Paused in the middle of `chunk`: keep the rest for later (a view, so the chunk must not be reused). */
  protected keepBacklog(chunk: Uint8Array, pos: number): void {
    this.backlog = pos === 0 ? chunk : chunk.subarray(pos);
    this.direct?.hold();
  }

  /**
   * Rx.Header: parse the next `size`-byte request header into `hdr`, in place when `chunk` holds it
   * whole, else gathered in hdrBuf across chunks. Returns the new position, HEADER_PENDING when the
   * chunk ended first, or HEADER_BAD on a bad magic. Compact and extended receivers share it.
   */
  protected takeHeader(chunk: Uint8Array, pos: number, size: number, parse: (b: Uint8Array, p: number, out: RequestHeader) => boolean): number {
    if (this.hdrFill === 0 && chunk.length - pos >= size) return parse(chunk, pos, this.hdr) ? pos + size : HEADER_BAD;
    const n = Math.min(size - this.hdrFill, chunk.length - pos);
    this.hdrBuf.set(chunk.subarray(pos, pos + n), this.hdrFill);
    this.hdrFill += n;
    if (this.hdrFill < size) return HEADER_PENDING;
    this.hdrFill = 0;
    return parse(this.hdrBuf, 0, this.hdr) ? pos + n : HEADER_BAD;
  }

  /** Rx.Payload: copy what `chunk` holds of the payload; dispatch once it is whole. Returns the new position. */
  protected takePayload(chunk: Uint8Array, pos: number): number {
    const p = this.payload;
    const n = Math.min(p.length - this.payloadFill, chunk.length - pos);
    p.set(chunk.subarray(pos, pos + n), this.payloadFill);
    this.payloadFill += n;
    pos += n;
    // The chunk is used up: the rest of the payload straight from the socket, if it is there.
    if (this.payloadFill < p.length && pos === chunk.length && this.direct !== null) this.payloadFill = this.direct.fill(p, this.payloadFill);
    if (this.payloadFill === p.length) {
      const req = this.pendingReq!;
      const payload = this.payload;
      this.pendingReq = null;
      this.payload = EMPTY;
      this.rx = Rx.Header;
      this.dispatch(req, payload);
    }
    return pos;
  }

  /** Rx.Discard: skip what `chunk` holds of a refused payload; answer the request once it is all consumed. */
  protected takeDiscard(chunk: Uint8Array, pos: number): number {
    const n = Math.min(this.discardLeft, chunk.length - pos);
    this.discardLeft -= n;
    pos += n;
    if (this.discardLeft === 0) {
      const req = this.pendingReq!;
      this.pendingReq = null;
      this.rx = Rx.Header;
      this.dispatch(req, EMPTY);
    }
    return pos;
  }

  /**
   * `req` carries `length` payload bytes from chunk[pos] on: consume and drop them when `req.error`
   * is already set (the stream stays in step), else dispatch with a view when the chunk holds them
   * all (each chunk is its own buffer), else receive them into a buffer of their own. Returns the
   * new position.
   */
  protected startPayload(req: PendingRequest, chunk: Uint8Array, pos: number, length: number): number {
    if (req.error !== null) {
      this.pendingReq = req;
      this.discardLeft = length;
      this.rx = Rx.Discard;
      return pos;
    }
    if (chunk.length - pos >= length) {
      const view = chunk.subarray(pos, pos + length);
      const p = this.direct === null || !this.asyncWrites ? view : this.direct.payload(view);
      const before = this.inFlight;
      this.dispatch(req, p);
      if (p === view && this.inFlight > before && this.direct !== null) {
        this.direct.hold(); // the device finishes later: keep the buffer, and copy large payloads
        this.asyncWrites = true; // from now on (cheaper than a new receive buffer per write)
      }
      return pos + length;
    }
    this.pendingReq = req;
    this.payload = Buffer.allocUnsafe(length); // every byte is received before it is used
    this.payloadFill = 0;
    this.rx = Rx.Payload;
    return pos;
  }

  /** The error for a payload above this session's limit (Negotiated.maxPayload). */
  protected tooLarge(length: number): NbdError {
    return new NbdError(NBD_EINVAL, `payload of ${length} bytes exceeds the maximum ${this.payloadLimit}`);
  }

  protected badMagic(): void {
    this.s.protocolError("BAD_REQUEST_MAGIC", "request does not start with the request magic");
  }

  protected newRequest(): PendingRequest {
    const h = this.hdr;
    return new PendingRequest(h.type, h.flags, h.cookieHi, h.cookieLo, h.offset, h.offsetTooBig, h.length);
  }

  // ---------------------------------------------------------------- dispatch (hot) -------------

  protected dispatch(req: PendingRequest, payload: Uint8Array): void {
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
    const badFlags = req.flags & ~this.validFlags[type]!;
    if (badFlags) throw badFlagsError(type, badFlags);
    if (req.offsetTooBig) throw new NbdError(type === NBD_CMD_WRITE || type === NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL, `request at ${req.offset} (+${req.length}) reaches beyond 2^53`);
    if (this.exports.shuttingDown()) throw new NbdError(NBD_ESHUTDOWN, "server is shutting down");
    const fua = req.flags & NBD_CMD_FLAG_FUA ? FUA : 0;
    switch (type) {
      case NBD_CMD_READ: {
        if (req.length > this.payloadLimit) throw new NbdError(NBD_EINVAL, `read of ${req.length} bytes exceeds the maximum ${this.payloadLimit}`);
        return this.w.read(req);
      }
      case NBD_CMD_WRITE: {
        if (payload.length !== req.length) payload = EMPTY; // zero-length write
        this.wrote = true;
        return this.after(req, exp.write(payload, req.offset, fua));
      }
      case NBD_CMD_FLUSH: return this.after(req, exp.flush());
      case NBD_CMD_TRIM: this.wrote = true; return this.after(req, exp.trim(req.offset, req.length, fua));
      case NBD_CMD_CACHE: return this.after(req, exp.cache(req.offset, req.length));
      case NBD_CMD_WRITE_ZEROES: {
        this.wrote = true;
        let f = fua;
        if (!(req.flags & NBD_CMD_FLAG_NO_HOLE)) f |= MAY_TRIM;
        if (req.flags & NBD_CMD_FLAG_FAST_ZERO) f |= FAST_ZERO;
        return this.after(req, exp.zero(req.offset, req.length, f));
      }
      case NBD_CMD_BLOCK_STATUS: {
        if (!this.structured || !this.hasContexts) {
          throw new NbdError(NBD_EINVAL, "BLOCK_STATUS needs structured replies and a selected meta context");
        }
        const flags = req.flags & NBD_CMD_FLAG_REQ_ONE ? REQ_ONE : 0;
        if (payload.length !== 0) return this.filteredStatus(req, payload, flags);
        if (req.length === 0) throw new NbdError(NBD_EINVAL, "BLOCK_STATUS of zero length");
        return this.w.blockStatus(req, flags);
      }
    }
  }

  /** BLOCK_STATUS with a payload: only extended headers have that form (ExtendedTransmission). */
  protected filteredStatus(_req: PendingRequest, _payload: Uint8Array, _flags: number): unknown {
    throw new NbdError(NBD_EINVAL, "BLOCK_STATUS takes no payload");
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
    return { conn: this.s.id, ...clientFields(this.s.client), export: this.exp.name, command: commandName(req.type), errno: errnoName(errno) };
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
    // Everything answered: make this connection's writes durable (a reader flushes nothing: its
    // fdatasync would stall every connection on others' dirty pages), then close once drained.
    if (!this.wrote || !this.exp.caps.canFlush) { this.s.close(); return; }
    const failed = (e: unknown) => { this.log.error(`[${this.s.id}] flush at disconnect failed: ${(e as Error).message}`); };
    let r: unknown;
    try { r = this.exp.flush(); } catch (e) { failed(e); }
    if (!isPromise(r)) { this.s.close(); return; }
    this.inFlight++;
    r.then(undefined, failed).then(() => this.flushedAtDisconnect());
  }
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  const c = new Uint8Array(a.length + b.length);
  c.set(a, 0);
  c.set(b, a.length);
  return c;
}
