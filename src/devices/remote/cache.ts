// The persistent cache of a remote object, per URL + ETag: a sparse data file (bytes at their own
// offsets) and a map (identity, one state byte per block, then a bitmap of 4 KiB pieces per block
// for blocks held in part), within its directory's budget (cache-budget.ts: LRU eviction of whole
// blocks, across every image open there, after entries no one uses). Bytes are marked only after
// they are written, and unmarked before their hole is punched: kill -9 safe.
import { closeSync, fstatSync, ftruncateSync, readSync } from "node:fs";
import { F_UNLCK, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate, ofdLock } from "../../sys/libc.ts";
import type { ObjectVersion } from "./store.ts";
import { DirBudget, type BudgetMember } from "./cache-budget.ts";
import { HEADER, headerBytes, openEntry, pruneVersions } from "./cache-dir.ts";
import { DataWriter, writeFull } from "./cache-writer.ts";
import { LruList } from "./lru.ts";
import { PIECE, PieceMap } from "./pieces.ts";

export { PIECE };

export const ABSENT = 0;
export const DATA = 1;
export const ZERO = 2;
/** Some of the block's pieces are held (its bitmap says which). */
export const PARTIAL = 3;

/** One block's bytes on their way to the disk, from one or more GETs at once. */
interface Filling {
  /** GETs still delivering into the block (begin() without complete/completePieces/abandon yet). */
  open: number;
  /** Bytes added to `used` at begin(): the block's room not held yet. */
  reserve: number;
  /** Some nonzero byte was written (otherwise what arrived was all zeros: a hole). */
  nonzero: boolean;
  /** A write failed or was skipped: nothing of this filling will be kept. */
  failed: boolean;
  /** Writes in flight. */
  pending: number;
  /** A GET delivered the whole block. */
  whole: boolean;
  /** Byte ranges (block-relative, [from, to) pairs) that piece GETs delivered. */
  pieces: number[];
  /** Called once the block's fate is known (true: marked). */
  done: ((cached: boolean) => void)[];
}

export interface CacheOptions {
  /** Cache directory; null for a throw-away cache (unlinked files, gone at exit). */
  dir: string | null;
  /** What names the object (location and endpoint, no credentials). */
  key: string;
  version: ObjectVersion;
  blockSize: number;
  /** Most bytes of block data the directory keeps, for every object in it (the smallest given, if they differ). */
  budget: number;
  log: (msg: string) => void;
}

export class BlockCache implements BudgetMember {
  readonly blocks: number;
  /** The state byte of every block (ABSENT, DATA, ZERO, PARTIAL). */
  readonly state: Uint8Array;
  /** Bytes held (DATA blocks, the pieces of PARTIAL ones) plus the room reserved by fillings. */
  used = 0;
  evictions = 0;
  /** The pieces held of PARTIAL blocks. */
  private readonly pieces: PieceMap;
  /** DATA and PARTIAL blocks that no GET is filling and no sendfile reads, least recently used last. */
  private readonly lru: LruList;
  /** When each block in the LRU list was last used (a tick of the directory's budget, comparable across images). */
  private readonly uses: Float64Array;
  /** Sendfiles under way per block (see pin()): such a block is never evicted. */
  private readonly pins: Int32Array;
  private closing = false;
  private closed = false;
  private readonly one = new Uint8Array(1);

  private constructor(readonly fd: number, private readonly mapFd: number, readonly path: string | null,
    readonly blockSize: number, readonly size: number, private readonly share: DirBudget, private readonly id: string | null,
    private readonly log: (msg: string) => void) {
    this.blocks = Math.ceil(size / blockSize);
    this.state = new Uint8Array(this.blocks);
    this.writer = new DataWriter(fd);
    this.lru = new LruList(this.blocks);
    this.uses = new Float64Array(this.blocks);
    this.pins = new Int32Array(this.blocks);
    this.pieces = new PieceMap(this.blocks, blockSize);
  }

  get persistent(): boolean { return this.path !== null; }

  /** Bytes of the map file: header, state bytes, bitmaps. */
  private get mapBytes(): number { return HEADER + this.blocks * (1 + this.pieces.bytesPerBlock); }

  static open(o: CacheOptions): BlockCache {
    const e = openEntry(o.dir, o.key, o.version, o.log);
    try {
      const share = DirBudget.of(e.id === null ? null : o.dir, Math.max(o.budget, 16 * o.blockSize), o.log);
      const c = new BlockCache(e.data, e.map, e.base, o.blockSize, o.version.size, share, e.id, o.log);
      const header = headerBytes({ ...o, blocks: c.blocks });
      if (!c.load(header)) {
        ftruncateSync(e.map, 0);
        ftruncateSync(e.data, 0);
        writeFull(e.map, header, 0);
        ftruncateSync(e.map, c.mapBytes);
      }
      if (fstatSync(e.data).size !== o.version.size) ftruncateSync(e.data, o.version.size);
      if (e.id !== null) share.onDisk = pruneVersions(o.dir!, e.id, o.key, o.log);
      share.join(c, e.id);
      share.makeRoom(0);
      return c;
    } catch (err) {
      closeSync(e.data);
      closeSync(e.map);
      throw err;
    }
  }

  /** Read the map; false when it is not this object's (new, another version, block size or format). */
  private load(header: Uint8Array): boolean {
    const st = fstatSync(this.mapFd);
    if (st.size !== this.mapBytes) return false;
    const h = new Uint8Array(HEADER);
    if (readSync(this.mapFd, h, 0, HEADER, 0) !== HEADER || Buffer.compare(h, header) !== 0) return false;
    if (!readFull(this.mapFd, this.state, HEADER)) return false;
    for (let b = 0; b < this.blocks; b++) {
      const s = this.state[b]!;
      if (s === PARTIAL) {
        if (!readFull(this.mapFd, this.pieces.of(b), this.bitmapAt(b))) return false;
      } else if (s !== DATA && s !== ZERO) {
        this.state[b] = ABSENT;
        continue;
      }
      if (s !== ZERO) { this.used += this.held(b); this.markUsed(b); }
    }
    return true;
  }

  private bitmapAt(b: number): number { return HEADER + this.blocks + b * this.pieces.bytesPerBlock; }

  blockBytes(b: number): number {
    return Math.min(this.blockSize, this.size - b * this.blockSize);
  }

  /** Bytes of block `b` held in the data file. */
  private held(b: number): number {
    const s = this.state[b];
    if (s === DATA) return this.blockBytes(b);
    return s === PARTIAL ? this.pieces.held(b, this.blockBytes(b)) : 0;
  }

  /** True if every block is held whole (DATA or ZERO): nothing will be fetched, written or evicted again. */
  allHeld(): boolean {
    const s = this.state;
    for (let b = 0; b < s.length; b++) if (s[b] !== DATA && s[b] !== ZERO) return false;
    return this.filling.size === 0;
  }

  /** True if every byte of [pos, pos + len) is cached. */
  has(pos: number, len: number): boolean {
    const bs = this.blockSize, end = pos + len, s = this.state;
    for (let b = Math.floor(pos / bs), last = Math.floor((end - 1) / bs); b <= last; b++) {
      const x = s[b];
      if (x === ABSENT) return false;
      if (x === PARTIAL && !this.pieces.covers(b, Math.max(pos, b * bs) - b * bs, Math.min(end, (b + 1) * bs) - b * bs)) return false;
    }
    return true;
  }

  /** Mark `b` as just used (eviction takes the least recently used first); blocks being filled are not in the list. */
  touch(b: number): void {
    this.lru.touch(b);
    this.uses[b] = this.share.now();
  }

  /** Put `b` in the LRU list as just used. */
  private markUsed(b: number): void {
    this.lru.pushFront(b);
    this.uses[b] = this.share.now();
  }

  oldestUse(): number {
    const b = this.lru.tail;
    return b < 0 ? Infinity : this.uses[b]!;
  }

  evictOldest(): void {
    if (this.lru.tail >= 0) this.evict(this.lru.tail);
  }

  /**
   * Blocks first..last are being sent from the data file (sendfile, possibly queued for a while):
   * keep them out of eviction, whose hole punching would turn the bytes still to be sent into zeros,
   * until unpin().
   */
  pin(first: number, last: number): void {
    for (let b = first; b <= last; b++) {
      const n = this.pins[b]!;
      this.pins[b] = n + 1;
      if (n === 0) this.lru.unlink(b);
    }
  }

  unpin(first: number, last: number): void {
    for (let b = first; b <= last; b++) {
      if (--this.pins[b]! > 0) continue;
      const s = this.state[b];
      if ((s === DATA || s === PARTIAL) && !this.filling.has(b)) this.markUsed(b);
    }
  }

  /** Copy cached bytes [pos, pos+len) into buf[off..] (every byte involved must be cached). */
  read(buf: Uint8Array, off: number, len: number, pos: number): void {
    let done = 0;
    while (done < len) {
      const n = readSync(this.fd, buf, off + done, len - done, pos + done);
      if (n <= 0) { buf.fill(0, off + done, off + len); return; } // past the data file's end: a hole
      done += n;
    }
  }

  /** Blocks being written as their bytes stream in. */
  private readonly filling = new Map<number, Filling>();
  /** The data file's writes: the event loop never waits for the disk (see DataWriter). */
  readonly writer: DataWriter;

  /**
   * A GET will deliver bytes of block `b` (all of it, or pieces): reserve room for the rest of the
   * block, evicting least recently used blocks, and keep the block out of eviction until every GET
   * into it has ended with complete(), completePieces() or abandon().
   */
  begin(b: number): void {
    if (this.closing) return;
    const f = this.filling.get(b);
    if (f !== undefined) { f.open++; return; }
    const s = this.state[b];
    if (s === DATA || s === ZERO) return; // held already: its writes are skipped
    const reserve = this.blockBytes(b) - this.held(b);
    if (s === PARTIAL) this.lru.unlink(b);
    this.share.makeRoom(reserve);
    this.used += reserve;
    this.filling.set(b, { open: 1, reserve, nonzero: false, failed: false, pending: 0, whole: false, pieces: [], done: [] });
  }

  /**
   * Bytes [pos, pos + chunk.length) of block `b` arrived (after begin(b)): write them to the data
   * file without waiting (DataWriter: on the thread pool, small ones at once). All-zero chunks are
   * skipped: the region is a hole or already holds these bytes (a region only ever holds this
   * version's bytes or zeros). A failed write (disk full), or more than the writer's bound waiting
   * for the disk, leave what this filling brings unmarked. `chunk` must not change until its
   * write is done.
   */
  write(b: number, pos: number, chunk: Uint8Array): void {
    const f = this.filling.get(b);
    if (f === undefined || this.closing || f.failed || isZero(chunk)) return;
    if (!this.writer.hasRoom(chunk.length)) {
      f.failed = true; // the disk is behind: serve these bytes without keeping them
      this.failedAt = Date.now();
      return;
    }
    f.nonzero = true;
    f.pending++;
    try {
      const now = this.writer.write(chunk, pos, (err) => {
        if (err !== null) {
          f.failed = true;
          this.writeFailed(err);
        }
        f.pending--;
        this.settle(b, f);
      });
      if (now) f.pending--;
    } catch (e) {
      f.pending--;
      f.failed = true;
      this.writeFailed(e);
    }
  }

  /**
   * Every byte of block `b` has been given to write(): once they are on their way to the disk,
   * the block counts as cached and `done(true)` is called (false if it could not be kept), at once
   * or when the last write into the block ends.
   */
  complete(b: number, done: (cached: boolean) => void): void {
    const f = this.filling.get(b);
    if (f === undefined) { done(this.state[b] === DATA || this.state[b] === ZERO); return; }
    f.whole = true;
    this.end(b, f, done);
  }

  /** As complete(), for bytes [from, to) of block `b` (absolute offsets, whole pieces or up to the end). */
  completePieces(b: number, from: number, to: number, done: (cached: boolean) => void): void {
    const f = this.filling.get(b);
    if (f === undefined) { done(this.has(from, to - from)); return; }
    f.pieces.push(from - b * this.blockSize, to - b * this.blockSize);
    this.end(b, f, done);
  }

  /** A GET into block `b` will not deliver the rest of what it was to bring. */
  abandon(b: number): void {
    const f = this.filling.get(b);
    if (f !== undefined) this.end(b, f, null);
  }

  private end(b: number, f: Filling, done: ((cached: boolean) => void) | null): void {
    if (done !== null) f.done.push(done);
    f.open--;
    this.settle(b, f);
  }

  /** Once no GET delivers into the block and its writes are done: mark what arrived (map after data), give back the rest of the room. */
  private settle(b: number, f: Filling): void {
    if (f.open > 0 || f.pending > 0 || this.filling.get(b) !== f) return;
    this.filling.delete(b);
    const before = this.held(b);
    let cached = false;
    if (!f.failed && !this.closed) {
      try {
        if (f.whole) this.markWhole(b, f.nonzero ? DATA : ZERO);
        else if (f.pieces.length > 0) this.markPieces(b, f.pieces);
        cached = f.whole || f.pieces.length > 0;
      } catch (e) {
        this.writeFailed(e);
      }
    }
    this.used += this.held(b) - before - f.reserve;
    const s = this.state[b];
    if ((s === DATA || s === PARTIAL) && this.pins[b] === 0) this.markUsed(b);
    // Unmarked bytes are never read: give their room back (after close the fd may be another file's).
    else if (s === ABSENT && f.nonzero && !this.closed) this.punch(b);
    for (const d of f.done) d(cached);
  }

  private markWhole(b: number, s: number): void {
    this.setState(b, s);
    this.pieces.clear(b);
  }

  /** Set the pieces of `ranges` (block-relative pairs): the bitmap is written before the state byte says to read it. */
  private markPieces(b: number, ranges: number[]): void {
    const s = this.state[b];
    if (s === DATA || s === ZERO) return;
    if (this.pieces.add(b, ranges, this.blockBytes(b))) { this.markWhole(b, DATA); return; }
    writeFull(this.mapFd, this.pieces.of(b), this.bitmapAt(b));
    if (s !== PARTIAL) this.setState(b, PARTIAL);
  }

  /** When bytes last could not be kept (a failed write, or the disk behind): Date.now(), or 0. */
  failedAt = 0;
  private failedOnce = false;
  private writeFailed(e: unknown): void {
    this.failedAt = Date.now();
    if (!this.failedOnce) this.log(`cache ${this.path ?? "(throw-away)"}: cannot write: ${(e as Error).message}; serving without caching what does not fit`);
    this.failedOnce = true;
  }

  private setState(b: number, s: number): void {
    this.one[0] = s;
    writeFull(this.mapFd, this.one, HEADER + b);
    this.state[b] = s;
  }

  private evict(b: number): void {
    const bytes = this.held(b);
    this.lru.unlink(b);
    this.setState(b, ABSENT); // the map first: a crash between leaves unmarked bytes, never a marked hole
    this.pieces.clear(b);
    this.punch(b);
    this.used -= bytes;
    this.evictions++;
  }

  private punch(b: number): void {
    try {
      fallocate(this.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, b * this.blockSize, this.blockBytes(b));
    } catch { /* no hole punching: the bytes stay allocated but unmarked */ }
  }

  /** Close once the writes in flight have ended (an fd closed under them could be reused by another file). */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true; // no new writes; those in flight still mark their blocks
    await this.writer.idle();
    this.closed = true;
    this.share.leave(this, this.id); // before its files close: no other image evicts from it after
    if (this.path !== null) { try { ofdLock(this.mapFd, F_UNLCK, 0, 1); } catch { /* closing anyway */ } }
    closeSync(this.fd);
    closeSync(this.mapFd);
  }
}

function readFull(fd: number, buf: Uint8Array, pos: number): boolean {
  for (let got = 0; got < buf.length;) {
    const n = readSync(fd, buf, got, buf.length - got, pos + got);
    if (n <= 0) return false;
    got += n;
  }
  return true;
}

let zeros = new Uint8Array(0);
function isZero(b: Uint8Array): boolean {
  if (b.length === 0 || b[0] !== 0 || b[b.length - 1] !== 0) return false;
  if (zeros.length < b.length) zeros = new Uint8Array(b.length);
  return Buffer.compare(b, zeros.subarray(0, b.length)) === 0;
}
