// The transmission phase of one NBD connection: pipelined requests with cookies, replies in any
// order, simple and structured replies (data, holes, errors, block status), block-size
// constraints, deadlines, and DISC.
//
// Hot path (see DESIGN.md): requests are encoded into a shared staging buffer and flushed once per
// tick; replies are parsed in place from the socket's chunks with plain byte arithmetic (no
// DataView, no BigInt, no Buffer.concat); READ payloads are copied once, from the socket chunk into
// the caller's buffer. A header that straddles two chunks is gathered in a small scratch buffer.
//
// Receiving in place: where the transport offers `rx.recv` (Bun with libc), the receiver also
// pulls from the socket itself after every chunk: exactly the bytes the current state needs, READ
// payloads straight into the caller's buffer (one kernel copy, no intermediate buffer). After each
// completed request it continues in a microtask, so the continuations that submit new requests run
// (and their requests go out) before it drains more. Optionally it busy-polls for a while when the
// socket is momentarily empty but replies are due (`busyPollMicros`).
import {
  NBD_CMD_BLOCK_STATUS, NBD_CMD_CACHE, NBD_CMD_DISC, NBD_CMD_FLAG_DF, NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM, NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE, NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC, NBD_EIO, NBD_MAX_STRING, commandName,
} from "../protocol/constants.ts";
import {
  NbdClosedError, NbdConnectionError, NbdDisconnectedError, NbdProtocolViolation, NbdRequestError, NbdTimeoutError,
  NbdUsageError,
} from "./errors.ts";
import type { ExportInfo, HandshakeStyle, Negotiated } from "./negotiated.ts";
import type { Conn } from "./conn.ts";
import { put16, put32, put64, u16, u32, u64 } from "./wire.ts";

/** One extent of a metadata context: `flags` is the context's status (for base:allocation, NBD_STATE_HOLE/ZERO bits). */
export interface Extent {
  offset: number;
  length: number;
  flags: number;
}

/** Flags for read requests. */
export interface ReadOptions {
  /** NBD_CMD_FLAG_DF: ask the server not to fragment the reply (needs `canDf`). */
  df?: boolean;
  /** NBD_CMD_FLAG_FUA (rarely meaningful on reads; needs `canFua`). */
  fua?: boolean;
}

/** Flags for write, trim and cache requests. */
export interface WriteOptions {
  /** NBD_CMD_FLAG_FUA: the reply waits until the data is durable (needs `canFua`). */
  fua?: boolean;
}

/** Flags for write-zeroes requests. */
export interface ZeroOptions extends WriteOptions {
  /** NBD_CMD_FLAG_NO_HOLE: the range must stay allocated (without it the server may punch a hole). */
  noHole?: boolean;
  /** NBD_CMD_FLAG_FAST_ZERO: fail with ENOTSUP unless zeroing is fast (needs `canFastZero`). */
  fastZero?: boolean;
}

/** Flags for block status requests. */
export interface BlockStatusOptions {
  /** NBD_CMD_FLAG_REQ_ONE: the server returns exactly one extent per context. */
  reqOne?: boolean;
}

/** Effective limits the client enforces and splits by. */
export interface Limits {
  /** Offsets and lengths must be multiples of this (1 unless the server advertised more). */
  minimum: number;
  preferred: number;
  /** Largest READ/WRITE payload per wire request; bigger calls are split. */
  maxPayload: number;
}

/** Counters of what the server sent (cheap integer increments; handy for tests and tuning). */
export interface ClientStats {
  /** Requests sent (after splitting). */
  requests: number;
  simpleReplies: number;
  dataChunks: number;
  holeChunks: number;
  blockStatusChunks: number;
  errorChunks: number;
}

/** The largest payload this client ever puts in one request (interoperable servers accept 32 MiB). */
const MAX_PAYLOAD_CAP = 32 * 1024 * 1024;
/** Payload-less commands are split at 2 GiB (a multiple of every legal minimum block size). */
const MAX_EFFECT = 2 ** 31;
/** WRITE payloads up to this size are copied into the staging buffer; larger ones are written as they are. */
const COPY_PAYLOAD_MAX = 16 * 1024;
const STAGING_SIZE = 64 * 1024;

// Receiver states.
const S_HEADER = 0; // waiting for a reply header
const S_DATA = 1; // copying READ data into the request's buffer
const S_OFFSET = 2; // reading the 8-byte offset of an OFFSET_DATA chunk
const S_PAYLOAD = 3; // gathering a whole chunk payload (hole, block status, error)

interface Req {
  id: number;
  type: number;
  flags: number;
  offset: number;
  length: number;
  buf: Uint8Array | null;
  /** READ by views ({@link NbdClient.readViews}): the data as views of the received chunks, and where each goes. */
  views: Uint8Array[] | null;
  viewPos: number[] | null;
  /** Bytes of READ data (or holes) received. */
  got: number;
  error: Error | null;
  deadline: number;
  extents: Map<string, Extent[]> | null;
  resolve: (v: never) => void;
  reject: (e: Error) => void;
}

/**
 * An open NBD connection in the transmission phase. Create it with {@link connect} (in
 * `index.ts`); every method returns a promise that settles when the server answered, and any number
 * of requests may be in flight at once.
 *
 * Buffers passed to {@link pwrite} must not be modified until the returned promise settles (large
 * payloads are sent without copying).
 */
export class NbdClient {
  /** What the server said about the export. */
  readonly info: ExportInfo;
  /** Export size in bytes. */
  readonly size: number;
  /** Whether structured replies are in use (needed for holes, DF and block status). */
  readonly structured: boolean;
  /** Selected meta contexts, name → id. */
  readonly metaContexts: ReadonlyMap<string, number>;
  /** The handshake style the server used. */
  readonly style: HandshakeStyle;
  /** Effective alignment and split sizes. */
  readonly limits: Limits;
  /** Resolves once the connection is closed (by us or by the server); never rejects. */
  readonly closed: Promise<void>;
  /** What went over the wire so far. */
  readonly stats: ClientStats = { requests: 0, simpleReplies: 0, dataChunks: 0, holeChunks: 0, blockStatusChunks: 0, errorChunks: 0 };

  private readonly socket: Conn;
  /** The transport hands over buffers it never reuses, so READ data may be kept as views. */
  private readonly rxOwned: boolean;
  private readonly timeoutMs: number;
  private readonly contextNames = new Map<number, string>();
  private readonly reqs: (Req | undefined)[] = [];
  private readonly freeIds: number[] = [];
  private pendingCount = 0;
  private dead: Error | null = null;
  private closing = false;
  private resolveClosed!: () => void;
  private sweeper: ReturnType<typeof setInterval> | null = null;
  private drainWaiters: (() => void)[] = [];

  // Sending.
  private staging = Buffer.allocUnsafe(STAGING_SIZE);
  private stagingStart = 0;
  private stagingEnd = 0;
  private flushQueued = false;
  private readonly flushBound = () => this.sendStaged();

  // Receiving.
  private state = S_HEADER;
  private readonly scratch = Buffer.alloc(32);
  private scratchHave = 0;
  private scratchNeed = 0;
  private cur: Req | null = null;
  private chunkType = 0;
  private chunkFlags = 0;
  private chunkLen = 0;
  private dataPos = 0;
  private dataLeft = 0;
  private payload: Buffer | null = null;
  private payloadHave = 0;
  /** The transport's in-place receive, or null (then every byte arrives through `onData`). */
  private readonly recvIn: ((dst: Uint8Array, off: number, len: number) => number) | null;
  private readonly busyPollMs: number;
  private readonly headerIn = Buffer.allocUnsafe(32);
  private completions = 0;
  private pullQueued = false;
  private readonly pullBound = () => this.pull();

  /** @internal Use {@link connect}. */
  constructor(n: Negotiated, opts: { requestTimeoutMs?: number; busyPollMicros?: number } = {}) {
    const requestTimeoutMs = opts.requestTimeoutMs ?? 60_000;
    this.socket = n.socket;
    this.rxOwned = n.rx?.owned === true;
    this.info = n.info;
    this.size = n.info.size;
    this.structured = n.structured;
    this.metaContexts = n.metaContexts;
    this.style = n.style;
    this.timeoutMs = requestTimeoutMs;
    for (const [name, id] of n.metaContexts) this.contextNames.set(id, name);
    const bs = n.info.blockSize;
    const minimum = bs?.minimum ?? 1;
    const preferred = bs?.preferred ?? 4096;
    const max = Math.min(bs ? bs.maximum : MAX_PAYLOAD_CAP, MAX_PAYLOAD_CAP);
    this.limits = { minimum, preferred, maxPayload: Math.max(minimum, max - (max % minimum)) };
    this.closed = new Promise((r) => (this.resolveClosed = r));
    this.recvIn = n.rx?.recv ?? null;
    this.busyPollMs = Math.max(0, opts.busyPollMicros ?? 0) / 1000;
    if (n.rx && this.recvIn) {
      n.rx.on = (b: Buffer, len: number) => {
        this.onData(b, len);
        this.pull();
      };
    } else if (n.rx) n.rx.on = (b: Buffer, len: number) => this.onData(b, len);
    else this.socket.on("data", (c: Buffer) => this.onData(c, c.length));
    this.socket.on("error", (e: Error) => this.fail(new NbdDisconnectedError(`connection error: ${e.message}`, { cause: e })));
    this.socket.on("end", () => this.fail(new NbdDisconnectedError("the server closed the connection")));
    this.socket.on("close", () => {
      this.fail(new NbdDisconnectedError("the connection closed"));
      this.resolveClosed();
    });
    for (const c of n.leftover) this.onData(c, c.length);
  }

  /** Requests sent and not yet answered. */
  get inFlight(): number {
    return this.pendingCount;
  }

  /**
   * True when READ payloads go from the socket straight into the buffer given to {@link pread}
   * (the transport receives in place); then `pread` into a reused buffer beats {@link readViews}.
   */
  get receivesInPlace(): boolean {
    return this.recvIn !== null;
  }

  /** Set once the connection failed or was closed: the error every new request fails with. */
  get failure(): Error | null {
    return this.dead;
  }

  // ---------------------------------------------------------------------------------------------
  // Public commands

  /** Reads `buf.length` bytes at `offset` into `buf` (split into several requests above the maximum payload). */
  pread(buf: Uint8Array, offset: number, opts?: ReadOptions): Promise<void> {
    const flags = this.readFlags(opts);
    if (typeof flags !== "number") return flags;
    const bad = this.check(NBD_CMD_READ, offset, buf.length);
    if (bad) return bad;
    return this.split(NBD_CMD_READ, flags, offset, buf.length, buf, this.limits.maxPayload);
  }

  /**
   * Reads `length` bytes at `offset` without copying them: the data comes back as consecutive views
   * of the buffers the socket received (their lengths add up to `length`; hole chunks come back as
   * views of a shared zero buffer, which must not be written to). The views stay valid for good.
   * Returns null when the transport reuses its receive buffer (node:net), so only {@link pread} works.
   */
  readViews(offset: number, length: number, opts?: ReadOptions): Promise<Uint8Array[]> | null {
    if (!this.rxOwned) return null;
    const flags = this.readFlags(opts);
    if (typeof flags !== "number") return flags;
    const bad = this.check(NBD_CMD_READ, offset, length);
    if (bad) return bad;
    if (length === 0) return this.dead ? Promise.reject(this.dead) : Promise.resolve([]);
    const max = this.limits.maxPayload;
    if (length <= max) return this.submit(NBD_CMD_READ, flags, offset, length, null, true);
    const parts: Promise<Uint8Array[]>[] = [];
    for (let done = 0; done < length; done += max) {
      parts.push(this.submit(NBD_CMD_READ, flags, offset + done, Math.min(max, length - done), null, true));
    }
    return Promise.all(parts).then((lists) => lists.flat());
  }

  /** Reads `length` bytes at `offset` into a new buffer. */
  async read(offset: number, length: number, opts?: ReadOptions): Promise<Uint8Array> {
    const buf = new Uint8Array(length);
    await this.pread(buf, offset, opts);
    return buf;
  }

  /** Writes `buf` at `offset`. Do not modify `buf` until the promise settles. */
  pwrite(buf: Uint8Array, offset: number, opts?: WriteOptions): Promise<void> {
    const bad = this.writable() ?? this.fuaFlag(opts) ?? this.check(NBD_CMD_WRITE, offset, buf.length);
    if (bad) return bad;
    return this.split(NBD_CMD_WRITE, opts?.fua ? NBD_CMD_FLAG_FUA : 0, offset, buf.length, buf, this.limits.maxPayload);
  }

  /** NBD_CMD_FLUSH: every write answered before it is durable once it is answered. */
  flush(): Promise<void> {
    if (!this.info.canFlush) return this.usage("UNSUPPORTED", "the server does not support FLUSH");
    return this.submit(NBD_CMD_FLUSH, 0, 0, 0, null);
  }

  /** NBD_CMD_TRIM: the range may be discarded (its contents become unspecified). */
  trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    if (!this.info.canTrim) return this.usage("UNSUPPORTED", "the server does not support TRIM");
    const bad = this.writable() ?? this.fuaFlag(opts) ?? this.check(NBD_CMD_TRIM, offset, length);
    if (bad) return bad;
    return this.split(NBD_CMD_TRIM, opts?.fua ? NBD_CMD_FLAG_FUA : 0, offset, length, null, MAX_EFFECT);
  }

  /** NBD_CMD_WRITE_ZEROES: the range reads as zeros afterwards (and may become a hole unless `noHole`). */
  zero(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    if (!this.info.canZero) return this.usage("UNSUPPORTED", "the server does not support WRITE_ZEROES");
    if (opts?.fastZero && !this.info.canFastZero) return this.usage("UNSUPPORTED", "the server does not support FAST_ZERO");
    const bad = this.writable() ?? this.fuaFlag(opts) ?? this.check(NBD_CMD_WRITE_ZEROES, offset, length);
    if (bad) return bad;
    const flags = (opts?.fua ? NBD_CMD_FLAG_FUA : 0) | (opts?.noHole ? NBD_CMD_FLAG_NO_HOLE : 0) | (opts?.fastZero ? NBD_CMD_FLAG_FAST_ZERO : 0);
    return this.split(NBD_CMD_WRITE_ZEROES, flags, offset, length, null, MAX_EFFECT);
  }

  /** NBD_CMD_CACHE: asks the server to prefetch the range. */
  cache(offset: number, length: number): Promise<void> {
    if (!this.info.canCache) return this.usage("UNSUPPORTED", "the server does not support CACHE");
    const bad = this.check(NBD_CMD_CACHE, offset, length);
    if (bad) return bad;
    return this.split(NBD_CMD_CACHE, 0, offset, length, null, MAX_EFFECT);
  }

  /**
   * One NBD_CMD_BLOCK_STATUS request: the extents of every selected meta context, keyed by
   * context name, starting at `offset`. The server may describe less than `length` (at least one
   * extent) or, without REQ_ONE, run the last extent past it. Lengths above 2 GiB are clipped.
   */
  blockStatus(offset: number, length: number, opts?: BlockStatusOptions): Promise<Map<string, Extent[]>> {
    if (!this.structured || this.metaContexts.size === 0) {
      return this.usage("UNSUPPORTED", "block status needs structured replies and at least one selected meta context");
    }
    const bad = this.check(NBD_CMD_BLOCK_STATUS, offset, length);
    if (bad) return bad;
    let len = Math.min(length, MAX_EFFECT);
    if (len < length) len -= len % this.limits.minimum;
    return this.submit(NBD_CMD_BLOCK_STATUS, opts?.reqOne ? NBD_CMD_FLAG_REQ_ONE : 0, offset, len, null);
  }

  /**
   * Every extent of `context` covering [offset, offset+length), clipped to that range, with
   * neighbours of equal flags merged (several block status requests if needed).
   */
  async extents(offset = 0, length = this.size - offset, context = "base:allocation"): Promise<Extent[]> {
    if (!this.metaContexts.has(context)) return this.usage("UNSUPPORTED", `meta context "${context}" was not selected`);
    const out: Extent[] = [];
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const got = (await this.blockStatus(pos, end - pos)).get(context);
      if (!got || got.length === 0) {
        throw this.violation("MISSING_CONTEXT", `block status at ${pos} returned no extents for "${context}"`);
      }
      for (const e of got) {
        if (pos >= end) break;
        const len = Math.min(e.length, end - pos);
        const last = out[out.length - 1];
        if (last && last.flags === e.flags) last.length += len;
        else out.push({ offset: pos, length: len, flags: e.flags });
        pos += len;
      }
    }
    return out;
  }

  /**
   * Waits for every request in flight, sends NBD_CMD_DISC and closes the socket. Requests made
   * after close() fail with {@link NbdClosedError}.
   */
  async close(): Promise<void> {
    if (this.closing || this.dead) {
      this.socket.destroy();
      return this.closed;
    }
    this.closing = true;
    while (this.pendingCount > 0 && !this.dead) await new Promise<void>((r) => this.drainWaiters.push(r));
    if (!this.dead) {
      this.queueHeader(NBD_CMD_DISC, 0, 0, 0, 0);
      this.sendStaged();
      this.socket.end();
      this.dead = new NbdClosedError();
      const t = setTimeout(() => this.socket.destroy(), 2000);
      await this.closed;
      clearTimeout(t);
    }
    this.socket.destroy();
    return this.closed;
  }

  /** Drops the connection at once; pending requests fail with `err` (default NbdClosedError). */
  destroy(err: Error = new NbdClosedError()): void {
    this.fail(err);
  }

  // ---------------------------------------------------------------------------------------------
  // Request validation and submission

  /** The wire flags of a READ, or a rejected promise when the server cannot take them. */
  private readFlags(opts: ReadOptions | undefined): number | Promise<never> {
    let flags = 0;
    if (opts?.df) {
      if (!this.info.canDf) return this.usage("UNSUPPORTED", "the server does not support DF (or structured replies are off)");
      flags |= NBD_CMD_FLAG_DF;
    }
    if (opts?.fua) {
      if (!this.info.canFua) return this.usage("UNSUPPORTED", "the server does not support FUA");
      flags |= NBD_CMD_FLAG_FUA;
    }
    return flags;
  }

  private usage<T>(code: NbdUsageError["code"], msg: string): Promise<T> {
    return Promise.reject(new NbdUsageError(code, msg));
  }

  private writable(): Promise<never> | undefined {
    return this.info.readOnly ? this.usage("READ_ONLY", `export "${this.info.name}" is read-only`) : undefined;
  }

  private fuaFlag(opts: WriteOptions | undefined): Promise<never> | undefined {
    return opts?.fua && !this.info.canFua ? this.usage("UNSUPPORTED", "the server does not support FUA") : undefined;
  }

  private check(type: number, offset: number, length: number): Promise<never> | undefined {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      return this.usage("BAD_ARGUMENT", `${commandName(type)}: offset and length must be non-negative integers`);
    }
    if (offset + length > this.size) {
      return this.usage("OUT_OF_RANGE", `${commandName(type)} at ${offset} (+${length}) runs past the end of the export (${this.size} bytes)`);
    }
    const m = this.limits.minimum;
    if (m > 1 && (offset % m !== 0 || (length % m !== 0 && offset + length !== this.size))) {
      return this.usage("MISALIGNED", `${commandName(type)} at ${offset} (+${length}) is not aligned to the server's minimum block size ${m}`);
    }
    return undefined;
  }

  /** Sends one request, or several of at most `max` bytes each, and waits for all of them. */
  private split<T>(type: number, flags: number, offset: number, length: number, buf: Uint8Array | null, max: number): Promise<T> {
    if (length === 0) return this.dead ? Promise.reject(this.dead) : Promise.resolve(undefined as T);
    if (length <= max) return this.submit(type, flags, offset, length, buf);
    const parts: Promise<T>[] = [];
    for (let done = 0; done < length; done += max) {
      const n = Math.min(max, length - done);
      parts.push(this.submit(type, flags, offset + done, n, buf ? buf.subarray(done, done + n) : null));
    }
    return Promise.all(parts).then(() => undefined as T);
  }

  private submit<T>(type: number, flags: number, offset: number, length: number, buf: Uint8Array | null, views = false): Promise<T> {
    if (this.dead) return Promise.reject(this.dead);
    if (this.closing) return Promise.reject(new NbdClosedError("close() was called: no new requests"));
    return new Promise<T>((resolve, reject) => {
      const id = this.freeIds.length ? this.freeIds.pop()! : this.reqs.length;
      const req: Req = {
        id, type, flags, offset, length, buf, views: views ? [] : null, viewPos: views ? [] : null, got: 0, error: null,
        deadline: performance.now() + this.timeoutMs,
        extents: null,
        resolve: resolve as (v: never) => void,
        reject,
      };
      this.reqs[id] = req;
      this.pendingCount++;
      this.stats.requests++;
      if (!this.sweeper) this.startSweeper();
      if (type === NBD_CMD_WRITE) {
        if (length <= COPY_PAYLOAD_MAX) {
          this.queueHeader(type, flags, id, offset, length);
          this.ensureStaging(length);
          this.staging.set(buf!, this.stagingEnd);
          this.stagingEnd += length;
        } else {
          this.queueHeader(type, flags, id, offset, length);
          this.sendStaged();
          this.socket.write(buf!);
        }
      } else {
        this.queueHeader(type, flags, id, offset, length);
      }
    });
  }

  private ensureStaging(n: number): void {
    if (this.stagingEnd + n <= this.staging.length) return;
    this.sendStaged();
    if (this.stagingEnd + n > this.staging.length) {
      this.staging = Buffer.allocUnsafe(Math.max(STAGING_SIZE, n));
      this.stagingStart = this.stagingEnd = 0;
    }
  }

  private queueHeader(type: number, flags: number, id: number, offset: number, length: number): void {
    this.ensureStaging(28);
    const b = this.staging;
    const o = this.stagingEnd;
    put32(b, o, NBD_REQUEST_MAGIC);
    put16(b, o + 4, flags);
    put16(b, o + 6, type);
    put32(b, o + 8, 0);
    put32(b, o + 12, id);
    put64(b, o + 16, offset);
    put32(b, o + 24, length);
    this.stagingEnd = o + 28;
    if (!this.flushQueued) {
      this.flushQueued = true;
      queueMicrotask(this.flushBound);
    }
  }

  /** Hands the staged bytes to the socket. The socket keeps the view, so staging moves past it. */
  private sendStaged(): void {
    this.flushQueued = false;
    if (this.stagingEnd === this.stagingStart) return;
    if (!this.dead) this.socket.write(this.staging.subarray(this.stagingStart, this.stagingEnd));
    this.stagingStart = this.stagingEnd;
    if (this.staging.length - this.stagingEnd < 4096) {
      this.staging = Buffer.allocUnsafe(STAGING_SIZE);
      this.stagingStart = this.stagingEnd = 0;
    }
  }

  private startSweeper(): void {
    const every = Math.max(10, Math.min(1000, this.timeoutMs / 4));
    this.sweeper = setInterval(() => {
      if (this.pendingCount === 0) {
        clearInterval(this.sweeper!);
        this.sweeper = null;
        return;
      }
      const now = performance.now();
      for (const r of this.reqs) {
        if (r && r.deadline < now) {
          this.fail(new NbdTimeoutError(`${commandName(r.type)} at ${r.offset} (+${r.length}) got no reply within ${this.timeoutMs} ms`));
          return;
        }
      }
    }, every);
  }

  /** Fails the connection: every pending request and every later one gets `err`. */
  private fail(err: Error): void {
    if (this.dead && this.pendingCount === 0) {
      this.socket.destroy();
      return;
    }
    this.dead ??= err;
    const failWith = this.dead;
    if (this.sweeper) {
      clearInterval(this.sweeper);
      this.sweeper = null;
    }
    for (let i = 0; i < this.reqs.length; i++) {
      const r = this.reqs[i];
      if (r) {
        this.reqs[i] = undefined;
        r.reject(failWith);
      }
    }
    this.pendingCount = 0;
    this.freeIds.length = 0;
    this.reqs.length = 0;
    this.wakeDrain();
    this.socket.destroy();
  }

  private violation(code: string, msg: string): NbdProtocolViolation {
    const err = new NbdProtocolViolation(code, `protocol violation by the server: ${msg}`);
    this.fail(err);
    return err;
  }

  private wakeDrain(): void {
    const w = this.drainWaiters;
    if (w.length) {
      this.drainWaiters = [];
      for (const f of w) f();
    }
  }

  private complete(r: Req): void {
    this.completions++;
    this.reqs[r.id] = undefined;
    this.freeIds.push(r.id);
    this.pendingCount--;
    if (r.error) r.reject(r.error);
    else if (r.type === NBD_CMD_BLOCK_STATUS) {
      if (!r.extents || r.extents.size === 0) {
        r.reject(this.violation("MISSING_BLOCK_STATUS", `BLOCK_STATUS at ${r.offset} succeeded without any extents`));
        return;
      }
      r.resolve(r.extents as never);
    } else if (r.views) r.resolve(orderViews(r.views, r.viewPos!) as never);
    else r.resolve(undefined as never);
    if (this.pendingCount === 0) this.wakeDrain();
  }

  // ---------------------------------------------------------------------------------------------
  // Receiving

  /**
   * Receives in place (see the top of the file) until the socket is empty or a request completes;
   * in the second case it goes on in a microtask, after the continuations of that request and
   * after sending what they staged.
   */
  private pull(): void {
    this.pullQueued = false;
    if (this.flushQueued) this.sendStaged();
    const done = this.completions;
    while (!this.dead) {
      if (this.state === S_DATA) {
        const r = this.cur!;
        if (!r.buf) return; // READ by views: those keep the transport's own chunks
        const n = this.recvWait(r.buf, this.dataPos, this.dataLeft);
        if (n === 0) return;
        this.dataPos += n;
        this.dataLeft -= n;
        if (this.dataLeft === 0) this.endOfPayload();
      } else if (this.state === S_PAYLOAD) {
        const p = this.payload!;
        const n = this.recvWait(p, this.payloadHave, p.length - this.payloadHave);
        if (n === 0) return;
        this.payloadHave += n;
        if (this.payloadHave === p.length) this.onPayload(p);
      } else {
        // A header or a data offset: exactly the bytes still missing (16 first for a header, the
        // shorter of the two reply headers), so nothing that follows them is taken here.
        if (this.pendingCount === 0) return;
        const need = this.state === S_OFFSET ? 8 - this.scratchHave : this.scratchNeed === 0 ? 16 : this.scratchNeed - this.scratchHave;
        const n = this.recvWait(this.headerIn, 0, need);
        if (n === 0) return;
        this.onData(this.headerIn, n);
      }
      if (this.completions !== done) {
        if (!this.pullQueued && !this.dead) {
          this.pullQueued = true;
          queueMicrotask(this.pullBound);
        }
        return;
      }
    }
  }

  /** One in-place receive, busy-polling up to `busyPollMs` while the socket is empty. */
  private recvWait(dst: Uint8Array, off: number, len: number): number {
    const recv = this.recvIn!;
    let n = recv(dst, off, len);
    if (n === 0 && this.busyPollMs > 0) {
      const until = performance.now() + this.busyPollMs;
      do n = recv(dst, off, len);
      while (n === 0 && performance.now() < until && !this.dead);
    }
    return n;
  }

  /** Parses `chunk[0..n)`. Keeps no reference to `chunk`: the caller may reuse it. */
  private onData(chunk: Buffer, n: number): void {
    let i = 0;
    while (i < n && !this.dead) {
      switch (this.state) {
        case S_HEADER: {
          if (this.scratchHave === 0 && n - i >= 4) {
            const magic = u32(chunk, i);
            const size = magic === NBD_STRUCTURED_REPLY_MAGIC ? 20 : magic === NBD_SIMPLE_REPLY_MAGIC ? 16 : 0;
            if (size === 0) {
              this.violation("BAD_REPLY_MAGIC", `bad reply magic 0x${magic.toString(16).padStart(8, "0")}`);
              return;
            }
            if (n - i >= size) {
              i += size;
              if (size === 16) this.onSimple(chunk, i - 16);
              else this.onChunkHeader(chunk, i - 20);
              continue;
            }
          }
          // The header straddles chunks: gather it in the scratch buffer.
          if (this.scratchNeed === 0) this.scratchNeed = 4;
          const take = Math.min(this.scratchNeed - this.scratchHave, n - i);
          chunk.copy(this.scratch, this.scratchHave, i, i + take);
          this.scratchHave += take;
          i += take;
          if (this.scratchHave < this.scratchNeed) break;
          if (this.scratchNeed === 4) {
            const magic = u32(this.scratch, 0);
            this.scratchNeed = magic === NBD_STRUCTURED_REPLY_MAGIC ? 20 : magic === NBD_SIMPLE_REPLY_MAGIC ? 16 : 0;
            if (this.scratchNeed === 0) {
              this.violation("BAD_REPLY_MAGIC", `bad reply magic 0x${magic.toString(16).padStart(8, "0")}`);
              return;
            }
            break;
          }
          const size = this.scratchNeed;
          this.scratchHave = this.scratchNeed = 0;
          if (size === 16) this.onSimple(this.scratch, 0);
          else this.onChunkHeader(this.scratch, 0);
          break;
        }
        case S_DATA: {
          const take = Math.min(this.dataLeft, n - i);
          const r = this.cur!;
          if (r.views) {
            r.views.push(chunk.subarray(i, i + take));
            r.viewPos!.push(this.dataPos);
          } else chunk.copy(r.buf!, this.dataPos, i, i + take);
          i += take;
          this.dataPos += take;
          this.dataLeft -= take;
          if (this.dataLeft === 0) this.endOfPayload();
          break;
        }
        case S_OFFSET: {
          let base: Uint8Array;
          let at: number;
          if (this.scratchHave === 0 && n - i >= 8) {
            base = chunk;
            at = i;
            i += 8;
          } else {
            const take = Math.min(8 - this.scratchHave, n - i);
            chunk.copy(this.scratch, this.scratchHave, i, i + take);
            this.scratchHave += take;
            i += take;
            if (this.scratchHave < 8) break;
            this.scratchHave = 0;
            base = this.scratch;
            at = 0;
          }
          this.onDataOffset(u64(base, at));
          break;
        }
        case S_PAYLOAD: {
          const p = this.payload!;
          const take = Math.min(p.length - this.payloadHave, n - i);
          chunk.copy(p, this.payloadHave, i, i + take);
          this.payloadHave += take;
          i += take;
          if (this.payloadHave === p.length) this.onPayload(p);
          break;
        }
        default:
          this.violation("INTERNAL", `receiver in unknown state ${this.state}`);
          return;
      }
    }
  }

  private lookup(b: Uint8Array, o: number): Req | null {
    const hi = u32(b, o);
    const lo = u32(b, o + 4);
    const r = hi === 0 ? this.reqs[lo] : undefined;
    if (!r) {
      this.violation("UNKNOWN_COOKIE", `reply for unknown cookie 0x${hi.toString(16)}${lo.toString(16).padStart(8, "0")}`);
      return null;
    }
    return r;
  }

  private onSimple(b: Uint8Array, o: number): void {
    const r = this.lookup(b, o + 8);
    if (!r) return;
    const errno = u32(b, o + 4);
    this.stats.simpleReplies++;
    if (errno !== 0) {
      r.error = new NbdRequestError(errno, r.type, r.offset, r.length);
      this.complete(r);
      return;
    }
    if (r.type === NBD_CMD_READ) {
      this.cur = r;
      r.got = r.length;
      this.chunkFlags = NBD_REPLY_FLAG_DONE;
      this.dataPos = 0;
      this.dataLeft = r.length;
      this.state = S_DATA;
      return;
    }
    if (r.type === NBD_CMD_BLOCK_STATUS) {
      this.violation("SIMPLE_BLOCK_STATUS", "BLOCK_STATUS answered with a simple reply and no error");
      return;
    }
    this.complete(r);
  }

  private onChunkHeader(b: Uint8Array, o: number): void {
    const flags = u16(b, o + 4);
    const type = u16(b, o + 6);
    const r = this.lookup(b, o + 8);
    if (!r) return;
    const len = u32(b, o + 16);
    if (!this.structured) {
      this.violation("UNEXPECTED_STRUCTURED_REPLY", "structured reply chunk without structured replies negotiated");
      return;
    }
    this.cur = r;
    this.chunkType = type;
    this.chunkFlags = flags;
    this.chunkLen = len;
    switch (type) {
      case NBD_REPLY_TYPE_NONE:
        if (len !== 0 || !(flags & NBD_REPLY_FLAG_DONE)) {
          this.violation("BAD_CHUNK", `NONE chunk with length ${len} or without DONE`);
          return;
        }
        this.endOfPayload();
        return;
      case NBD_REPLY_TYPE_OFFSET_DATA:
        if (r.type !== NBD_CMD_READ || len < 9) {
          this.violation("BAD_CHUNK", `OFFSET_DATA chunk of length ${len} for ${commandName(r.type)}`);
          return;
        }
        this.state = S_OFFSET;
        return;
      case NBD_REPLY_TYPE_OFFSET_HOLE:
        if (r.type !== NBD_CMD_READ || len !== 12) {
          this.violation("BAD_CHUNK", `OFFSET_HOLE chunk of length ${len} for ${commandName(r.type)}`);
          return;
        }
        break;
      case NBD_REPLY_TYPE_BLOCK_STATUS:
        if (r.type !== NBD_CMD_BLOCK_STATUS || len < 12 || (len - 4) % 8 !== 0) {
          this.violation("BAD_CHUNK", `BLOCK_STATUS chunk of length ${len} for ${commandName(r.type)}`);
          return;
        }
        break;
      default:
        if (!(type & 0x8000)) {
          this.violation("UNKNOWN_CHUNK_TYPE", `unknown structured reply chunk type ${type}`);
          return;
        }
        if (len < 6 || len > 6 + NBD_MAX_STRING + 8) {
          this.violation("BAD_CHUNK", `error chunk of length ${len}`);
          return;
        }
    }
    this.payload = Buffer.allocUnsafe(len);
    this.payloadHave = 0;
    this.state = S_PAYLOAD;
  }

  private onDataOffset(offset: number): void {
    const r = this.cur!;
    const n = this.chunkLen - 8;
    if (!(offset >= r.offset && offset + n <= r.offset + r.length)) {
      this.violation("DATA_OUT_OF_RANGE", `OFFSET_DATA at ${offset} (+${n}) outside READ at ${r.offset} (+${r.length})`);
      return;
    }
    r.got += n;
    this.stats.dataChunks++;
    this.dataPos = offset - r.offset;
    this.dataLeft = n;
    this.state = S_DATA;
  }

  private onPayload(p: Buffer): void {
    const r = this.cur!;
    this.payload = null;
    const type = this.chunkType;
    if (type === NBD_REPLY_TYPE_OFFSET_HOLE) {
      const offset = u64(p, 0);
      const n = u32(p, 8);
      if (n === 0 || !(offset >= r.offset && offset + n <= r.offset + r.length)) {
        this.violation("HOLE_OUT_OF_RANGE", `OFFSET_HOLE at ${offset} (+${n}) outside READ at ${r.offset} (+${r.length})`);
        return;
      }
      if (r.views) {
        const z = zeroView(n);
        for (let pos = 0; pos < n; pos += z.length) {
          r.views.push(pos + z.length <= n ? z : z.subarray(0, n - pos));
          r.viewPos!.push(offset - r.offset + pos);
        }
      } else r.buf!.fill(0, offset - r.offset, offset - r.offset + n);
      r.got += n;
      this.stats.holeChunks++;
    } else if (type === NBD_REPLY_TYPE_BLOCK_STATUS) {
      const name = this.contextNames.get(u32(p, 0));
      if (name === undefined) {
        this.violation("UNKNOWN_CONTEXT", `block status for unknown meta context id ${u32(p, 0)}`);
        return;
      }
      const list: Extent[] = [];
      let pos = r.offset;
      for (let o = 4; o < p.length; o += 8) {
        const length = u32(p, o);
        if (length === 0) {
          this.violation("BAD_BLOCK_STATUS", "zero-length extent");
          return;
        }
        list.push({ offset: pos, length, flags: u32(p, o + 4) });
        pos += length;
      }
      (r.extents ??= new Map()).set(name, list);
      this.stats.blockStatusChunks++;
    } else {
      // An error chunk (ERROR, ERROR_OFFSET, or an unknown type with the error bit).
      let errno = u32(p, 0);
      const msgLen = u16(p, 4);
      if (6 + msgLen > p.length) {
        this.violation("BAD_CHUNK", `error chunk message of ${msgLen} bytes in a ${p.length}-byte chunk`);
        return;
      }
      if (errno === 0) errno = NBD_EIO;
      this.stats.errorChunks++;
      const msg = p.toString("utf8", 6, 6 + msgLen);
      let off = r.offset;
      if (type === 0x8002 && p.length >= 6 + msgLen + 8) off = u64(p, 6 + msgLen);
      r.error ??= new NbdRequestError(errno, r.type, off, r.length, msg || undefined);
    }
    this.endOfPayload();
  }

  private endOfPayload(): void {
    this.state = S_HEADER;
    const r = this.cur!;
    this.cur = null;
    if (!(this.chunkFlags & NBD_REPLY_FLAG_DONE)) return;
    if (r.type === NBD_CMD_READ && !r.error && r.got !== r.length) {
      this.violation("SHORT_READ", `READ at ${r.offset} (+${r.length}) completed with ${r.got} bytes described`);
      return;
    }
    this.complete(r);
  }
}

/** A shared zero buffer for holes read by views (never written to). */
let zeroes: Uint8Array | null = null;
function zeroView(n: number): Uint8Array {
  zeroes ??= new Uint8Array(1024 * 1024);
  return n < zeroes.length ? zeroes.subarray(0, n) : zeroes;
}

/** Views in offset order (structured replies may send a READ's chunks in any order). */
function orderViews(views: Uint8Array[], pos: number[]): Uint8Array[] {
  let sorted = true;
  for (let i = 1; i < pos.length; i++) if (pos[i]! < pos[i - 1]!) sorted = false;
  if (sorted) return views;
  return views.map((v, i) => [pos[i]!, v] as const).sort((a, b) => a[0] - b[0]).map((e) => e[1]);
}

/** True for the errors that mean the whole connection is gone. */
export function isConnectionError(e: unknown): e is NbdConnectionError {
  return e instanceof NbdConnectionError;
}
