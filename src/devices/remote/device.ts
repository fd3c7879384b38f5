// A remote object as a read-only BlockDevice: cached bytes are read from the cache file at once;
// a small read out of sequence fetches just its 4 KiB pieces, anything else whole aligned blocks
// (merged, several in flight, readahead for sequential readers), handed to readers and the cache as
// they stream in. Other devices sit on it (async pread, or isCached/load).
import { eio } from "../../protocol/errors.ts";
import { caps, EXTENT_HOLE, EXTENT_ZERO, type BlockDevice, type BlockSize, type Capabilities, type DeviceRecipe, type ExtentSink, type FileRange, type Maybe } from "../types.ts";
import { PIECE, ZERO, type BlockCache } from "./cache.ts";
import { Fetcher, type FetchJob, type FetchPolicy } from "./fetcher.ts";
import { dropCounters, newCounters, type RemoteCounters } from "./metrics.ts";
import type { ObjectStore, ObjectVersion } from "./store.ts";
import { Streams } from "./streams.ts";

export interface ReadPolicy {
  /** Most bytes one GET covers when neighbouring missing blocks are merged. */
  maxRequest: number;
  /** Bytes fetched ahead of a sequential reader. */
  readahead: number;
  /**
   * What a small read out of sequence fetches: its 4 KiB pieces, its whole block, or (auto) its
   * pieces while a round trip to the store costs less than moving a block (a web server nearby),
   * whole blocks when every request costs more (an object store far away, or a slow one).
   */
  smallReads: SmallReads;
}

export type SmallReads = "auto" | "pieces" | "blocks";

const CAPS: Capabilities = Object.freeze(caps({ canCache: true, canExtents: true, canMultiConn: true }));
/** After the cache failed to keep bytes, large reads are copied (not sent from the file) this long. */
const KEEP_FAILED_MS = 10_000;

/** Copies what it needs of a piece of a block (`chunk` holds the block's bytes from `at` on; valid only during the call). */
type Take = (chunk: Uint8Array, at: number) => void;

/**
 * A reader of a block's bytes up to `until`: answered as soon as a piece reaches that far, not when
 * the whole block is in (pieces arrive in order; a retry starts again at the block's beginning).
 */
interface Taker { take: Take; until: number; done: boolean; resolve: () => void }

interface Waiter {
  promise: Promise<void>;
  /** The GET bringing it, once sent (blocks wanted this tick are not yet). */
  job: FetchJob | null;
  /** Readers given each piece as it arrives. */
  takers: Taker[];
  /** Called once the block is marked in the cache (or let go): readers that came after the first piece, load(). */
  late: ((cached: boolean) => void)[];
  /** Its first piece arrived (new readers can no longer get every piece). */
  started: boolean;
  /** Every piece went to the takers; the cache is still writing it (the waiter stays until then). */
  delivered: boolean;
  resolve: () => void;
  reject: (e: Error) => void;
}

export class RemoteImage implements BlockDevice {
  readonly counters: RemoteCounters;
  readonly fetcher: Fetcher;
  private readonly bs: number;
  private readonly bytes: number;
  /** Blocks being fetched, by index; each resolves (after the cache holds it) to the block's bytes. */
  private readonly waiting = new Map<number, Waiter>();
  private wanted: number[] = [];
  private wantedAhead: number[] = [];
  private flushQueued = false;
  /** Sequential readers, and how far ahead of each to fetch. */
  private readonly streams: Streams;
  private closed = false;

  constructor(readonly store: ObjectStore, readonly version: ObjectVersion, readonly blocks: BlockCache,
    private readonly policy: ReadPolicy & FetchPolicy, private readonly log: (msg: string) => void) {
    this.bs = blocks.blockSize;
    this.bytes = version.size;
    this.counters = newCounters(store.display);
    this.counters.cachedBytes = blocks.used;
    this.fetcher = new Fetcher(store, version, policy, this.counters, log);
    this.streams = new Streams(this.bs, policy.readahead);
  }

  /** The object as printed (no credentials). */
  get location(): string { return this.store.display; }

  size(): number { return this.bytes; }
  blockSize(): BlockSize { return { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 }; }
  capabilities(): Capabilities { return CAPS; }

  /** True if [pos, pos+len) can be read from the cache now. */
  isCached(pos: number, len: number): boolean {
    return len <= 0 || this.blocks.has(pos, len);
  }

  /** Fetch whatever of [pos, pos+len) is not cached; resolves once it is (or has been delivered). */
  load(pos: number, len: number): Promise<void> {
    return this.loadBlocks(pos, len, false);
  }

  /** load(), counting each block as a cache hit or miss when `count`. */
  private loadBlocks(pos: number, len: number, count: boolean): Promise<void> {
    const bs = this.bs, end = pos + len, c = this.counters;
    const ps: Promise<void>[] = [];
    for (let b = Math.floor(pos / bs), last = Math.floor((end - 1) / bs); len > 0 && b <= last; b++) {
      const s = Math.max(pos, b * bs);
      const held = this.blocks.has(s, Math.min(end, (b + 1) * bs) - s);
      if (!held) ps.push(this.want(b, false));
      if (count) { if (held) c.cacheHits++; else c.cacheMisses++; }
    }
    return settle(ps); // every failure handled, the first one thrown
  }

  /** Cached bytes, for sendfile: their blocks are pinned (never evicted) until the server releases them. */
  fileRange(offset: number, length: number, out: FileRange): boolean {
    const counted = this.loadedForFile.delete(offset); // whenInFile() counted these blocks
    if (length === 0 || this.closed || !this.blocks.has(offset, length)) return false;
    this.hit(offset, offset + length, !counted);
    const blocks = this.blocks, b0 = Math.floor(offset / this.bs), b1 = Math.floor((offset + length - 1) / this.bs);
    blocks.pin(b0, b1);
    out.fd = blocks.fd;
    out.offset = offset;
    out.release = () => blocks.unpin(b0, b1);
    return true;
  }

  /**
   * Once every block is held, the cache's data file is the object's bytes (regions never written
   * read as the zeros they are) and nothing changes it again: blocks are fetched, written and
   * evicted only for a block not held. So a connection can then be served on a thread of its own
   * over that file, read-only, as a local file is (devices/recipe.ts). Measured before: warm 4 KiB
   * reads at QD1 on the event loop ran at 0.86x of the same image as a local file, which goes to
   * a thread. Reads served there count in the export's metrics, not as remote cache hits.
   */
  recipe(): DeviceRecipe | null {
    const c = this.blocks;
    if (this.closed || !c.allHeld()) return null;
    return { kind: "file", path: `${this.store.display} (cached in ${c.path ?? "a throw-away file"})`, fd: c.fd, size: this.bytes, readOnly: true, failed: this.noFailures };
  }

  /** The failure flag a thread's read-only view of the cache file gets (it never writes). */
  private readonly noFailures = new SharedArrayBuffer(4);

  /**
   * A large or sequential read that is not all cached yet: fetch its blocks whole and settle once
   * they are in the cache file, for the server to send them from there (sendfile: no copy through
   * a buffer). Null (read as usual) for a read that would fetch pieces, and for a while after the
   * cache could not keep something (a full disk): each block would be fetched once for the file
   * and again for the copy. (An eviction between the fetch and fileRange() also ends in a copy.)
   */
  whenInFile(offset: number, length: number): Promise<void> | null {
    if (this.closed || length === 0 || Date.now() - this.blocks.failedAt < KEEP_FAILED_MS) return null;
    if (this.piecesFor(length, this.streams.continues(offset))) return null;
    this.sequential(offset, offset + length);
    return this.loadBlocks(offset, length, true).then(() => { this.loadedForFile.add(offset); });
  }

  /** Reads whose blocks whenInFile() has counted as hits and misses: the fileRange() that follows does not count them again. */
  private readonly loadedForFile = new Set<number>();

  pread(buf: Uint8Array, offset: number, _flags: number): Maybe {
    const len = buf.length;
    if (len === 0) return;
    if (this.closed) throw eio(`${this.store.display}: closed`);
    if (this.blocks.has(offset, len)) {
      this.hit(offset, offset + len);
      this.blocks.read(buf, 0, len, offset);
      return;
    }
    return this.readMissing(buf, offset);
  }

  private hit(offset: number, end: number, count = true): void {
    const b0 = Math.floor(offset / this.bs), b1 = Math.floor((end - 1) / this.bs);
    if (count) this.counters.cacheHits += b1 - b0 + 1;
    for (let b = b0; b <= b1; b++) this.blocks.touch(b);
    this.sequential(offset, end);
  }

  /**
   * Each block of the read: from the cache if held; else joining the GET already bringing it; else
   * the whole block when the read continues a sequential one or covers half the block or more; else
   * (a small read out of sequence) just the 4 KiB pieces it touches, as nbdkit's curl plugin would.
   */
  private readMissing(buf: Uint8Array, offset: number): Promise<void> {
    const bs = this.bs, end = offset + buf.length;
    const seq = this.sequential(offset, end);
    const ps: Promise<void>[] = [];
    for (let b = Math.floor(offset / bs), b1 = Math.floor((end - 1) / bs); b <= b1; b++) {
      const s = Math.max(offset, b * bs), e = Math.min(end, (b + 1) * bs);
      if (this.blocks.has(s, e - s)) {
        this.counters.cacheHits++;
        this.blocks.touch(b);
        this.blocks.read(buf, s - offset, e - s, s);
        continue;
      }
      this.counters.cacheMisses++;
      if (!this.waiting.has(b) && this.piecesFor(e - s, seq)) {
        ps.push(this.fetchPieces(buf, offset, b, s, e));
        continue;
      }
      // the part of each arriving piece that falls in [s, e) goes straight into buf
      const from = s - b * bs, to = e - b * bs;
      ps.push(this.want(b, false, (chunk, at) => {
        const lo = Math.max(from, at), hi = Math.min(to, at + chunk.length);
        if (hi > lo) buf.set(chunk.subarray(lo - at, hi - at), b * bs + lo - offset);
      }, to));
    }
    return settle(ps);
  }

  /**
   * Whether `length` bytes of a block are fetched as pieces: a small read (under half a block)
   * that continues no sequential one, when --small-reads says pieces (see ReadPolicy.smallReads).
   */
  private piecesFor(length: number, sequential: boolean): boolean {
    if (sequential || 2 * length >= this.bs) return false;
    const mode = this.policy.smallReads;
    if (mode !== "auto") return mode === "pieces";
    const f = this.fetcher;
    return f.roundTripMs !== null && f.roundTripMs * f.bytesPerMs < this.bs;
  }

  /** Bytes [s, e) of block `b` into buf (which holds the read at `offset`), by a GET of the pieces around them. */
  private fetchPieces(buf: Uint8Array, offset: number, b: number, s: number, e: number): Promise<void> {
    const ps = s - (s % PIECE), pe = Math.min(this.bytes, e + ((PIECE - (e % PIECE)) % PIECE));
    this.blocks.begin(b);
    return new Promise<void>((resolve, reject) => {
      this.fetcher.fetch(ps, pe, false, pe - ps, {
        data: (pos, chunk) => {
          if (!this.closed) this.blocks.write(b, pos, chunk);
          const lo = Math.max(s, pos), hi = Math.min(e, pos + chunk.length);
          if (hi > lo) buf.set(chunk.subarray(lo - pos, hi - pos), lo - offset);
        },
        unit: () => {
          resolve(); // every byte is in buf: answer now, not when the GET has wound down
          if (!this.closed) this.blocks.completePieces(b, ps, pe, this.noteCached);
        },
        lost: () => this.blocks.abandon(b),
      }).promise.catch(reject);
    });
  }

  private readonly noteCached = (): void => {
    this.counters.cachedBytes = this.blocks.used;
    this.counters.evictions = this.blocks.evictions;
  };

  /**
   * Fetch block `b` (or join the GET already bringing it); `take` gets its bytes the moment they
   * are in and the promise resolves once they reach `until` (block-relative); it rejects with EIO
   * when they cannot be had. Without `take`, it resolves once the block is marked in the cache.
   */
  private want(b: number, ahead: boolean, take?: Take, until = 0): Promise<void> {
    let w = this.waiting.get(b);
    if (w === undefined) {
      let resolve!: () => void, reject!: (e: Error) => void;
      const promise = new Promise<void>((res, rej) => { resolve = res; reject = rej; });
      promise.catch(() => {}); // every user attaches its own handler; this one keeps a failure from going unhandled
      w = { promise, resolve, reject, job: null, takers: [], late: [], started: false, delivered: false };
      this.waiting.set(b, w);
      (ahead ? this.wantedAhead : this.wanted).push(b);
      if (!this.flushQueued) {
        this.flushQueued = true;
        queueMicrotask(() => this.sendWanted());
      }
    } else if (!ahead) {
      // A read joining a GET already under way gets a full deadline of its own (and a readahead
      // GET, which would give up at its first error, becomes a read's).
      w.job?.extend();
    }
    if (take === undefined) return this.marked(w);
    if (!w.started) {
      const waiter = w;
      return new Promise<void>((resolve, reject) => {
        waiter.takers.push({ take, until, done: false, resolve });
        waiter.promise.then(resolve, reject);
      });
    }
    return this.late(w, b, take);
  }

  /** Resolves once the block is marked in the cache, or let go (load() then looks again). */
  private marked(w: Waiter): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      w.late.push(() => resolve());
      w.promise.catch(reject);
    });
  }

  /** Send what was wanted this tick: runs of neighbouring blocks merged into GETs of up to maxRequest. */
  private sendWanted(): void {
    this.flushQueued = false;
    const demand = this.wanted, ahead = this.wantedAhead;
    this.wanted = [];
    this.wantedAhead = [];
    this.send(demand, false);
    this.send(ahead, true);
  }

  private send(blocks: number[], ahead: boolean): void {
    if (blocks.length === 0) return;
    blocks.sort((a, b) => a - b);
    const most = Math.max(1, Math.floor(this.policy.maxRequest / this.bs));
    let i = 0;
    while (i < blocks.length) {
      let j = i + 1;
      while (j < blocks.length && blocks[j] === blocks[j - 1]! + 1 && j - i < most) j++;
      this.fetchRun(blocks[i]!, blocks[j - 1]!, ahead);
      i = j;
    }
  }

  /**
   * A reader joining a block whose first bytes already went by: once the block is complete it
   * reads it from the cache file (at once, before anything can evict it); if the block could not
   * be cached, it asks for the block again.
   */
  private late(w: Waiter, b: number, take: Take): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      w.late.push((cached) => {
        if (!cached) { this.want(b, false, take).then(resolve, reject); return; }
        const bytes = Buffer.allocUnsafe(this.blocks.blockBytes(b));
        this.blocks.read(bytes, 0, bytes.length, b * this.bs);
        take(bytes, 0);
        resolve();
      });
      w.promise.catch(reject);
    });
  }

  private fetchRun(first: number, last: number, ahead: boolean): void {
    const bs = this.bs;
    for (let b = first; b <= last; b++) this.blocks.begin(b);
    // Each piece goes to the cache file and to the readers as it arrives; a block counts as
    // cached (and its readers are answered) when its last byte is in.
    const job: FetchJob = this.fetcher.fetch(first * bs, Math.min(this.bytes, (last + 1) * bs), ahead, bs, {
      data: (offset, chunk) => {
        const b = Math.floor(offset / bs);
        if (!this.closed) this.blocks.write(b, offset, chunk);
        const w = this.waiting.get(b);
        if (w === undefined || w.job !== job) return;
        w.started = true;
        const at = offset - b * bs;
        const reached = at + chunk.length;
        for (const t of w.takers) {
          if (t.done) continue; // answered already: its buffer may be on the wire
          t.take(chunk, at);
          if (reached >= t.until) { t.done = true; t.resolve(); }
        }
      },
      unit: (offset) => {
        const b = offset / bs;
        const w = this.waiting.get(b);
        const mine = w !== undefined && w.job === job;
        if (mine) {
          w.delivered = true;
          w.resolve(); // the takers have every byte; the waiter stays until the cache has them too
        }
        const marked = (cached: boolean) => {
          this.noteCached();
          if (!mine || this.waiting.get(b) !== w) return;
          this.waiting.delete(b);
          for (const l of w.late) l(cached);
        };
        if (this.closed) marked(false);
        else this.blocks.complete(b, marked);
      },
      lost: (offset) => {
        for (let b = offset / bs; b <= last; b++) this.blocks.abandon(b);
      },
    });
    for (let b = first; b <= last; b++) this.waiting.get(b)!.job = job;
    job.promise.catch((e: Error) => {
      for (let b = first; b <= last; b++) {
        const w = this.waiting.get(b);
        if (w?.job !== job || w.delivered) continue;
        this.waiting.delete(b);
        w.reject(e);
      }
    });
  }

  /** Note a read of [offset, end); if it continues a recent one, fetch ahead of it and say so. */
  private sequential(offset: number, end: number): boolean {
    const win = this.streams.note(offset, end);
    if (win < 0) return false;
    if (win === 0 || this.fetcher.changed !== null || this.fetcher.aheadQueued > 1) return true;
    const bs = this.bs, b1 = Math.floor((end - 1) / bs);
    for (let b = b1 + 1; b <= b1 + Math.floor(win / bs) && b < this.blocks.blocks; b++) {
      if (!this.waiting.has(b) && !this.blocks.has(b * bs, this.blocks.blockBytes(b))) this.want(b, true).catch(() => {});
    }
    return true;
  }

  extents(offset: number, length: number, _flags: number, sink: ExtentSink): void {
    const bs = this.bs, end = offset + length, st = this.blocks.state;
    let p = offset;
    while (p < end) {
      const b = Math.floor(p / bs);
      const zero = st[b] === ZERO;
      let e = Math.min(end, (b + 1) * bs);
      for (let c = b + 1; e < end && (st[c] === ZERO) === zero; c++) e = Math.min(end, (c + 1) * bs);
      if (!sink.add(p, e - p, zero ? EXTENT_HOLE | EXTENT_ZERO : 0)) return;
      p = e;
    }
  }

  cache(offset: number, length: number): Promise<void> {
    return this.load(offset, length);
  }

  close(): Promise<void> {
    if (this.closed) return Promise.resolve();
    this.closed = true;
    this.fetcher.close();
    dropCounters(this.counters);
    return this.blocks.close();
  }
}

/** Wait for all, then throw the first failure (so no buffer is written after the reply). */
async function settle(ps: Promise<void>[]): Promise<void> {
  let err: unknown = null;
  for (const p of ps) {
    try { await p; } catch (e) { err ??= e; }
  }
  if (err !== null) throw err;
}
