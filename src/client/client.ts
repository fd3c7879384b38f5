// NbdClient, the public face of one connection in the transmission phase: every command (READ,
// WRITE, WRITE_ZEROES, TRIM, CACHE, FLUSH, BLOCK_STATUS), checked against what the export allows
// and split by the server's block-size limits. The wire work is transmission.ts's.
import {
  NBD_CMD_BLOCK_STATUS, NBD_CMD_CACHE, NBD_CMD_FLAG_DF, NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES,
  NBD_FLAG_BLOCK_STATUS_PAYLOAD, commandName,
} from "../protocol/constants.ts";
import { encodeStatusPayload } from "../protocol/codec.ts";
import { NbdClosedError, NbdConnectionError, NbdUsageError } from "./errors.ts";
import type { ExportInfo, HandshakeStyle, Negotiated } from "./negotiated.ts";
import type { ClientStats, Extent } from "./requests.ts";
import { Transmission } from "./transmission.ts";

export type { ClientStats, Extent } from "./requests.ts";

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
  /**
   * Report only these selected contexts (the payload form of BLOCK_STATUS: needs extended headers
   * and a server that offers it, see {@link NbdClient.canFilterStatus}). Default: every selected one.
   */
  contexts?: readonly string[];
}

/** Effective limits the client enforces and splits by. */
export interface Limits {
  /** Offsets and lengths must be multiples of this (1 unless the server advertised more). */
  minimum: number;
  preferred: number;
  /** Largest READ/WRITE payload per wire request; bigger calls are split. */
  maxPayload: number;
}

/** The largest payload this client ever puts in one request (interoperable servers accept 32 MiB). */
const MAX_PAYLOAD_CAP = 32 * 1024 * 1024;
/** Payload-less commands are split at 2 GiB (a multiple of every legal minimum block size), unless extended headers carry 64-bit lengths. */
const MAX_EFFECT = 2 ** 31;

/**
 * An open NBD connection in the transmission phase. Create it with {@link connect} (in
 * `connect.ts`); every method returns a promise that settles when the server answered, and any number
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
  /** Whether replies come as chunks: structured replies, or extended headers (needed for holes, DF and block status). */
  readonly structured: boolean;
  /**
   * Whether extended headers are in use (asked for with `extendedHeaders`): 32-byte requests, so
   * TRIM, WRITE_ZEROES, CACHE and BLOCK_STATUS go out unsplit whatever their length.
   */
  readonly extended: boolean;
  /** Block status can be asked for some of the selected contexts only ({@link BlockStatusOptions.contexts}). */
  readonly canFilterStatus: boolean;
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

  /** The connection underneath: request submission, the reply receiver, failure and close. */
  private readonly link: Transmission;
  /** The transport hands over buffers it never reuses, so READ data may be kept as views. */
  private readonly rxOwned: boolean;
  /** Largest effect length of one payload-less request. */
  private readonly maxEffect: number;

  /** @internal Use {@link connect}. Built from the plain result of the negotiation. */
  constructor(n: Negotiated, opts: { requestTimeoutMs?: number; busyPollMicros?: number } = {}) {
    this.rxOwned = n.rx?.owned === true;
    this.info = n.info;
    this.size = n.info.size;
    this.structured = n.structured;
    this.extended = n.extended === true;
    this.canFilterStatus = this.extended && (n.info.flags & NBD_FLAG_BLOCK_STATUS_PAYLOAD) !== 0;
    this.maxEffect = this.extended ? Number.MAX_SAFE_INTEGER : MAX_EFFECT;
    this.metaContexts = n.metaContexts;
    this.style = n.style;
    const bs = n.info.blockSize;
    const minimum = bs?.minimum ?? 1;
    const preferred = bs?.preferred ?? 4096;
    const max = Math.min(bs ? bs.maximum : MAX_PAYLOAD_CAP, MAX_PAYLOAD_CAP);
    this.limits = { minimum, preferred, maxPayload: Math.max(minimum, max - (max % minimum)) };
    this.link = new Transmission(n, this.stats, opts.requestTimeoutMs ?? 60_000, Math.max(0, opts.busyPollMicros ?? 0) / 1000);
    this.closed = this.link.closed;
  }

  /** Requests sent and not yet answered. */
  get inFlight(): number {
    return this.link.requests.pending;
  }

  /**
   * True when READ payloads go from the socket straight into the buffer given to {@link pread}
   * (the transport receives in place); then `pread` into a reused buffer beats {@link readViews}.
   */
  get receivesInPlace(): boolean {
    return this.link.receiver.recvIn !== null;
  }

  /** Set once the connection failed or was closed: the error every new request fails with. */
  get failure(): Error | null {
    return this.link.dead;
  }

  // ---------------------------------------------------------------------------------------------
  // Commands

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
    if (length === 0) return this.link.dead ? Promise.reject(this.link.dead) : Promise.resolve([]);
    const max = this.limits.maxPayload;
    if (length <= max) return this.link.submit(NBD_CMD_READ, flags, offset, length, null, true);
    const parts: Promise<Uint8Array[]>[] = [];
    for (let done = 0; done < length; done += max) {
      parts.push(this.link.submit(NBD_CMD_READ, flags, offset + done, Math.min(max, length - done), null, true));
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
    return this.link.submit(NBD_CMD_FLUSH, 0, 0, 0, null);
  }

  /** NBD_CMD_TRIM: the range may be discarded (its contents become unspecified). */
  trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    if (!this.info.canTrim) return this.usage("UNSUPPORTED", "the server does not support TRIM");
    const bad = this.writable() ?? this.fuaFlag(opts) ?? this.check(NBD_CMD_TRIM, offset, length);
    if (bad) return bad;
    return this.split(NBD_CMD_TRIM, opts?.fua ? NBD_CMD_FLAG_FUA : 0, offset, length, null, this.maxEffect);
  }

  /** NBD_CMD_WRITE_ZEROES: the range reads as zeros afterwards (and may become a hole unless `noHole`). */
  zero(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    if (!this.info.canZero) return this.usage("UNSUPPORTED", "the server does not support WRITE_ZEROES");
    if (opts?.fastZero && !this.info.canFastZero) return this.usage("UNSUPPORTED", "the server does not support FAST_ZERO");
    const bad = this.writable() ?? this.fuaFlag(opts) ?? this.check(NBD_CMD_WRITE_ZEROES, offset, length);
    if (bad) return bad;
    const flags = (opts?.fua ? NBD_CMD_FLAG_FUA : 0) | (opts?.noHole ? NBD_CMD_FLAG_NO_HOLE : 0) | (opts?.fastZero ? NBD_CMD_FLAG_FAST_ZERO : 0);
    return this.split(NBD_CMD_WRITE_ZEROES, flags, offset, length, null, this.maxEffect);
  }

  /** NBD_CMD_CACHE: asks the server to prefetch the range. */
  cache(offset: number, length: number): Promise<void> {
    if (!this.info.canCache) return this.usage("UNSUPPORTED", "the server does not support CACHE");
    const bad = this.check(NBD_CMD_CACHE, offset, length);
    if (bad) return bad;
    return this.split(NBD_CMD_CACHE, 0, offset, length, null, this.maxEffect);
  }

  /**
   * One NBD_CMD_BLOCK_STATUS request: the extents of every selected meta context, keyed by
   * context name, starting at `offset`. The server may describe less than `length` (at least one
   * extent) or, without REQ_ONE, run the last extent past it. Lengths above 2 GiB are clipped
   * (unless extended headers are in use).
   */
  blockStatus(offset: number, length: number, opts?: BlockStatusOptions): Promise<Map<string, Extent[]>> {
    if (!this.structured || this.metaContexts.size === 0) {
      return this.usage("UNSUPPORTED", "block status needs structured replies and at least one selected meta context");
    }
    const bad = this.check(NBD_CMD_BLOCK_STATUS, offset, length);
    if (bad) return bad;
    let len = Math.min(length, this.maxEffect);
    if (len < length) len -= len % this.limits.minimum;
    let payload: Uint8Array | null = null;
    if (opts?.contexts) {
      if (!this.canFilterStatus) return this.usage("UNSUPPORTED", "block status by context needs extended headers and a server that offers it");
      const ids: number[] = [];
      for (const c of opts.contexts) {
        const id = this.metaContexts.get(c);
        if (id === undefined) return this.usage("UNSUPPORTED", `meta context "${c}" was not selected`);
        if (!ids.includes(id)) ids.push(id);
      }
      if (ids.length === 0) return this.usage("BAD_ARGUMENT", "block status for no context at all");
      payload = encodeStatusPayload(len, ids);
    }
    return this.link.submit(NBD_CMD_BLOCK_STATUS, opts?.reqOne ? NBD_CMD_FLAG_REQ_ONE : 0, offset, len, payload);
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
    const only = this.canFilterStatus && this.metaContexts.size > 1 ? { contexts: [context] } : undefined;
    while (pos < end) {
      const got = (await this.blockStatus(pos, end - pos, only)).get(context);
      if (!got || got.length === 0) {
        throw this.link.violation("MISSING_CONTEXT", `block status at ${pos} returned no extents for "${context}"`);
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
  close(): Promise<void> {
    return this.link.close();
  }

  /** Drops the connection at once; pending requests fail with `err` (default NbdClosedError). */
  destroy(err: Error = new NbdClosedError()): void {
    this.link.fail(err);
  }

  // ---------------------------------------------------------------------------------------------
  // Checks and splitting

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
    if (length === 0) return this.link.dead ? Promise.reject(this.link.dead) : Promise.resolve(undefined as T);
    if (length <= max) return this.link.submit(type, flags, offset, length, buf);
    const parts: Promise<T>[] = [];
    for (let done = 0; done < length; done += max) {
      const n = Math.min(max, length - done);
      parts.push(this.link.submit(type, flags, offset + done, n, buf ? buf.subarray(done, done + n) : null));
    }
    return Promise.all(parts).then(() => undefined as T);
  }
}

/** True for the errors that mean the whole connection is gone. */
export function isConnectionError(e: unknown): e is NbdConnectionError {
  return e instanceof NbdConnectionError;
}
