// The persistent cache of a remote object, per URL + ETag: a sparse data file (bytes at their own
// offsets) and a map (identity, one state byte per block), bounded with LRU eviction. A block is
// marked only after its bytes are written, and unmarked before its hole is punched: kill -9 safe.
import { closeSync, existsSync, fstatSync, ftruncateSync, mkdirSync, openSync, readdirSync, readSync, statSync, unlinkSync, write as fsWrite, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createHash } from "node:crypto";
import { F_UNLCK, F_WRLCK, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate, ofdLock, ofdTestLock } from "../../sys/libc.ts";
import { versionTag, type ObjectVersion } from "./store.ts";

const MAGIC = "BNBDRCv1";
/** Most bytes of data writes waiting for the disk; beyond, new blocks are served but not kept. */
const MAX_PENDING = 64 * 1024 * 1024;

interface Filling {
  /** Some nonzero byte was written (otherwise the block is all zeros: a hole). */
  nonzero: boolean;
  /** A write failed or was skipped: the block will not be kept. */
  failed: boolean;
  /** Writes in flight. */
  pending: number;
  /** Set by complete(): called once the block is marked (or let go). */
  done: ((cached: boolean) => void) | null;
  abandoned: boolean;
}
const HEADER = 4096;
export const ABSENT = 0;
export const DATA = 1;
export const ZERO = 2;

export interface CacheOptions {
  /** Cache directory; null for a throw-away cache (unlinked files, gone at exit). */
  dir: string | null;
  /** What names the object (location and endpoint, no credentials). */
  key: string;
  version: ObjectVersion;
  blockSize: number;
  /** Most bytes of block data to keep, for this object and the directory as a whole. */
  budget: number;
  log: (msg: string) => void;
}

export class BlockCache {
  readonly blocks: number;
  /** The state byte of every block (ABSENT, DATA, ZERO). */
  readonly state: Uint8Array;
  /** Bytes of DATA blocks held. */
  used = 0;
  /** True once a block was evicted: from then on the data file's bytes may move under a sendfile. */
  evicted = false;
  evictions = 0;
  private readonly prev: Int32Array;
  private readonly next: Int32Array;
  private head = -1; // most recently used
  private tail = -1;
  private closing = false;
  private closed = false;
  private readonly one = new Uint8Array(1);

  private constructor(readonly fd: number, private readonly mapFd: number, readonly path: string | null,
    readonly blockSize: number, readonly size: number, readonly budget: number, private readonly log: (msg: string) => void) {
    this.blocks = Math.ceil(size / blockSize);
    this.state = new Uint8Array(this.blocks);
    this.prev = new Int32Array(this.blocks).fill(-1);
    this.next = new Int32Array(this.blocks).fill(-1);
  }

  get persistent(): boolean { return this.path !== null; }

  static open(o: CacheOptions): BlockCache {
    const budget = Math.max(o.budget, 16 * o.blockSize);
    if (o.dir === null) return BlockCache.throwAway(o, budget);
    mkdirSync(o.dir, { recursive: true });
    const id = createHash("sha256").update(`${o.key}\n${versionTag(o.version)}\n${o.version.size}`).digest("hex").slice(0, 32);
    const base = join(o.dir, id);
    const mapFd = openSync(`${base}.map`, "a+");
    closeSync(mapFd);
    const m = openSync(`${base}.map`, "r+");
    if (!ofdLock(m, F_WRLCK, 0, 1)) {
      closeSync(m);
      o.log(`cache ${base}.map is in use by another process; using a throw-away cache for ${o.key}`);
      return BlockCache.throwAway(o, budget);
    }
    let d = -1;
    try {
      d = openSync(`${base}.data`, existsSync(`${base}.data`) ? "r+" : "w+");
      const c = new BlockCache(d, m, base, o.blockSize, o.version.size, budget, o.log);
      const header = headerBytes(o, c.blocks);
      if (!c.load(header)) {
        ftruncateSync(m, 0);
        ftruncateSync(d, 0);
        writeFull(m, header, 0);
        ftruncateSync(m, HEADER + c.blocks);
      }
      if (fstatSync(d).size !== o.version.size) ftruncateSync(d, o.version.size);
      prune(o.dir, id, o.key, budget - Math.min(c.used, budget), o.log);
      c.shrinkTo(budget);
      return c;
    } catch (e) {
      if (d >= 0) closeSync(d);
      closeSync(m);
      throw e;
    }
  }

  private static throwAway(o: CacheOptions, budget: number): BlockCache {
    const dir = process.env.TMPDIR || tmpdir();
    const p = join(dir, `bun-nbd-cache-${process.pid}-${Math.random().toString(36).slice(2, 10)}`);
    const d = openSync(`${p}.data`, "wx+", 0o600);
    const m = openSync(`${p}.map`, "wx+", 0o600);
    unlinkSync(`${p}.data`);
    unlinkSync(`${p}.map`);
    ftruncateSync(d, o.version.size);
    const c = new BlockCache(d, m, null, o.blockSize, o.version.size, budget, o.log);
    ftruncateSync(m, HEADER + c.blocks);
    return c;
  }

  /** Read the map; false when it is not this object's (new, another version, another block size). */
  private load(header: Uint8Array): boolean {
    const st = fstatSync(this.mapFd);
    if (st.size !== HEADER + this.blocks) return false;
    const h = new Uint8Array(HEADER);
    if (readSync(this.mapFd, h, 0, HEADER, 0) !== HEADER || Buffer.compare(h, header) !== 0) return false;
    let got = 0;
    while (got < this.blocks) {
      const n = readSync(this.mapFd, this.state, got, this.blocks - got, HEADER + got);
      if (n <= 0) return false;
      got += n;
    }
    for (let b = 0; b < this.blocks; b++) {
      const s = this.state[b]!;
      if (s === DATA) { this.used += this.blockBytes(b); this.pushFront(b); }
      else if (s !== ZERO) this.state[b] = ABSENT;
    }
    return true;
  }

  blockBytes(b: number): number {
    return Math.min(this.blockSize, this.size - b * this.blockSize);
  }

  /** True if every block from `first` to `last` (inclusive) is cached. */
  has(first: number, last: number): boolean {
    const s = this.state;
    for (let b = first; b <= last; b++) if (s[b] === ABSENT) return false;
    return true;
  }

  /** Mark `b` as just used (eviction takes the least recently used first). */
  touch(b: number): void {
    if (this.state[b] !== DATA || this.head === b) return;
    this.unlink(b);
    this.pushFront(b);
  }

  /** Copy cached bytes [pos, pos+len) into buf[off..] (every block involved must be cached). */
  read(buf: Uint8Array, off: number, len: number, pos: number): void {
    let done = 0;
    while (done < len) {
      const n = readSync(this.fd, buf, off + done, len - done, pos + done);
      if (n <= 0) { buf.fill(0, off + done, off + len); return; } // past the data file's end: a hole
      done += n;
    }
  }

  /** Blocks being written as their bytes stream in (see write()). */
  private readonly filling = new Map<number, Filling>();
  /** Data writes in flight and their bytes: the event loop never waits for the disk. */
  private inflight = 0;
  private pendingBytes = 0;
  private drained: (() => void) | null = null;

  /**
   * Bytes [pos, pos + chunk.length) of block `b` arrived: write them to the data file, without
   * waiting (synchronous writes stall the event loop whenever the kernel throttles dirty pages).
   * All-zero chunks are skipped: the region is a hole or already holds these bytes. The block's
   * first chunk reserves room for all of it, evicting least recently used blocks. A failed write
   * (disk full), or more than MAX_PENDING bytes waiting for the disk, leave the block uncached.
   * `chunk` must not change until its write is done.
   */
  write(b: number, pos: number, chunk: Uint8Array): void {
    if (this.closing || this.state[b] !== ABSENT) return;
    let f = this.filling.get(b);
    if (f === undefined) {
      const len = this.blockBytes(b);
      while (this.used + len > this.budget && this.tail >= 0) this.evict(this.tail);
      this.used += len;
      f = { nonzero: false, failed: false, pending: 0, done: null, abandoned: false };
      this.filling.set(b, f);
    }
    if (f.failed || isZero(chunk)) return;
    if (this.pendingBytes + chunk.length > MAX_PENDING) {
      f.failed = true; // the disk is behind: serve this block without keeping it
      return;
    }
    f.nonzero = true;
    f.pending++;
    this.inflight++;
    this.pendingBytes += chunk.length;
    const filling = f;
    fsWrite(this.fd, chunk, 0, chunk.length, pos, (err, n) => {
      this.inflight--;
      this.pendingBytes -= chunk.length;
      if (err !== null || n !== chunk.length) {
        filling.failed = true;
        this.writeFailed(err ?? new Error(`short write (${n} of ${chunk.length} bytes)`));
      }
      if (--filling.pending === 0) this.settle(b, filling);
      if (this.inflight === 0) this.drained?.();
    });
  }

  /**
   * Every byte of block `b` has been given to write(): once they are on their way to the disk,
   * the block counts as cached and `done(true)` is called (false if it could not be kept), at once
   * or when the last write ends.
   */
  complete(b: number, done: (cached: boolean) => void): void {
    const f = this.filling.get(b);
    if (f === undefined) { done(this.state[b] !== ABSENT); return; }
    f.done = done;
    if (f.pending === 0) this.settle(b, f);
  }

  /** Block `b` will not be completed: give back its room (and punch what was written of it). */
  abandon(b: number): void {
    const f = this.filling.get(b);
    if (f === undefined) return;
    f.abandoned = true;
    if (f.pending === 0) this.settle(b, f);
  }

  /** A block whose writes are all done and whose fate is known: mark it (map byte after the data), or let it go. */
  private settle(b: number, f: Filling): void {
    if (f.done === null && !f.abandoned) return; // bytes still arriving
    this.filling.delete(b);
    let cached = false;
    if (!f.abandoned && !f.failed && !this.closed) {
      try {
        this.setState(b, f.nonzero ? DATA : ZERO);
        if (f.nonzero) this.pushFront(b);
        else this.used -= this.blockBytes(b);
        cached = true;
      } catch (e) {
        this.writeFailed(e);
      }
    }
    if (!cached) this.release(b, f.nonzero);
    f.done?.(cached);
  }

  private release(b: number, written: boolean): void {
    this.used -= this.blockBytes(b);
    // Unmarked bytes are never read; after close the fd may even belong to another file by now.
    if (written && !this.closed) this.punch(b);
  }

  private failedOnce = false;
  private writeFailed(e: unknown): void {
    if (!this.failedOnce) this.log(`cache ${this.path ?? "(throw-away)"}: cannot write: ${(e as Error).message}; serving without caching what does not fit`);
    this.failedOnce = true;
  }

  private setState(b: number, s: number): void {
    this.one[0] = s;
    writeFull(this.mapFd, this.one, HEADER + b);
    this.state[b] = s;
  }

  private evict(b: number): void {
    this.unlink(b);
    this.setState(b, ABSENT); // the map first: a crash between leaves an unmarked block, never a marked hole
    this.punch(b);
    this.used -= this.blockBytes(b);
    this.evicted = true;
    this.evictions++;
  }

  private punch(b: number): void {
    try {
      fallocate(this.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, b * this.blockSize, this.blockBytes(b));
    } catch { /* no hole punching: the bytes stay allocated but unmarked */ }
  }

  private shrinkTo(budget: number): void {
    while (this.used > budget && this.tail >= 0) this.evict(this.tail);
  }

  private pushFront(b: number): void {
    this.prev[b] = -1;
    this.next[b] = this.head;
    if (this.head >= 0) this.prev[this.head] = b;
    this.head = b;
    if (this.tail < 0) this.tail = b;
  }

  private unlink(b: number): void {
    const p = this.prev[b]!, n = this.next[b]!;
    if (p >= 0) this.next[p] = n; else if (this.head === b) this.head = n;
    if (n >= 0) this.prev[n] = p; else if (this.tail === b) this.tail = p;
    this.prev[b] = -1;
    this.next[b] = -1;
  }

  /** Close once the writes in flight have ended (an fd closed under them could be reused by another file). */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true; // no new writes; those in flight still mark their blocks
    if (this.inflight > 0) await new Promise<void>((resolve) => { this.drained = resolve; });
    this.closed = true;
    if (this.path !== null) { try { ofdLock(this.mapFd, F_UNLCK, 0, 1); } catch { /* closing anyway */ } }
    closeSync(this.fd);
    closeSync(this.mapFd);
  }
}

function headerBytes(o: CacheOptions, blocks: number): Uint8Array {
  const h = new Uint8Array(HEADER);
  const info = JSON.stringify({ key: o.key, size: o.version.size, etag: o.version.etag, lastModified: o.version.lastModified, blockSize: o.blockSize, blocks });
  const bytes = new TextEncoder().encode(MAGIC + info);
  h.set(bytes.subarray(0, HEADER - 1));
  return h;
}

/** The entry's key and version from its map header, or null when it is not a cache map. */
function readInfo(path: string): { key: string } | null {
  try {
    const fd = openSync(path, "r");
    try {
      const h = new Uint8Array(HEADER);
      const n = readSync(fd, h, 0, HEADER, 0);
      const text = new TextDecoder().decode(h.subarray(0, n)).replace(/\0+$/, "");
      if (!text.startsWith(MAGIC)) return null;
      return JSON.parse(text.slice(MAGIC.length)) as { key: string };
    } finally {
      closeSync(fd);
    }
  } catch {
    return null;
  }
}

/**
 * Make room in the directory: delete entries of other versions of the same object, then the least
 * recently used entries until the others hold at most `room` bytes. Entries in use by another
 * process (locked) are left alone.
 */
function prune(dir: string, self: string, key: string, room: number, log: (msg: string) => void): void {
  const others: { base: string; bytes: number; mtime: number }[] = [];
  for (const name of readdirSync(dir)) {
    if (!name.endsWith(".map") || name === `${self}.map`) continue;
    const base = join(dir, name.slice(0, -4));
    if (inUse(`${base}.map`)) continue;
    const info = readInfo(`${base}.map`);
    let bytes = 0, mtime = 0;
    try { const st = statSync(`${base}.data`); bytes = st.blocks * 512; mtime = statSync(`${base}.map`).mtimeMs; } catch { /* half an entry */ }
    if (info !== null && info.key === key) {
      remove(base);
      log(`cache: removed ${base} (an older version of ${key})`);
      continue;
    }
    others.push({ base, bytes, mtime });
  }
  others.sort((a, b) => a.mtime - b.mtime);
  let total = others.reduce((n, e) => n + e.bytes, 0);
  for (const e of others) {
    if (total <= room) break;
    remove(e.base);
    total -= e.bytes;
    log(`cache: removed ${e.base} (least recently used) to stay within the cache size`);
  }
}

function inUse(path: string): boolean {
  try {
    const fd = openSync(path, "r");
    try { return ofdTestLock(fd, F_WRLCK, 0, 1) !== F_UNLCK; } finally { closeSync(fd); }
  } catch {
    return false;
  }
}

function remove(base: string): void {
  for (const ext of [".map", ".data"]) { try { unlinkSync(base + ext); } catch { /* gone already */ } }
}

function writeFull(fd: number, buf: Uint8Array, pos: number): void {
  let done = 0;
  while (done < buf.length) done += writeSync(fd, buf, done, buf.length - done, pos + done);
}

let zeros = new Uint8Array(0);
function isZero(b: Uint8Array): boolean {
  if (b.length === 0 || b[0] !== 0 || b[b.length - 1] !== 0) return false;
  if (zeros.length < b.length) zeros = new Uint8Array(b.length);
  return Buffer.compare(b, zeros.subarray(0, b.length)) === 0;
}
