// The one thing every parser here reads through: "N bytes at offset" over any source (a local
// file, a device stack, an NBD export through the client). It clamps to the source's size, caches
// 4 KiB blocks (an NBD round trip per 32-byte directory entry would be slow), and bounds every
// single read and the total read by one inspection, so no table however hostile makes it read
// forever. A Reader can be narrowed to a region (a partition) that shares the cache and budget.

/** What a source must offer: its size and positional reads (sync or async). */
export interface ByteSource {
  readonly size: number;
  read(offset: number, length: number): Uint8Array | Promise<Uint8Array>;
}

/** Thrown when an inspection has read its whole budget; the report gets a warning instead. */
export class ReadBudgetExceeded extends Error {
  constructor(limit: number) {
    super(`stopped after reading ${limit} bytes (the inspection's read budget)`);
  }
}

const BLOCK = 4096;
/** Largest single read a parser may ask for. */
export const MAX_READ = 1 << 20;
const CACHE_BLOCKS = 1024;

class Core {
  readonly cache = new Map<number, Uint8Array>();
  used = 0;
  constructor(readonly src: ByteSource, readonly budget: number) {}

  async fetch(first: number, last: number): Promise<void> {
    const start = first * BLOCK;
    const len = Math.min((last + 1) * BLOCK, this.src.size) - start;
    this.used += len;
    if (this.used > this.budget) throw new ReadBudgetExceeded(this.budget);
    const data = await this.src.read(start, len);
    if (this.cache.size + (last - first + 1) > CACHE_BLOCKS) this.cache.clear();
    for (let b = first; b <= last; b++) {
      const o = (b - first) * BLOCK;
      this.cache.set(b, data.subarray(o, Math.min(o + BLOCK, data.length)));
    }
  }
}

export class Reader {
  private constructor(private readonly core: Core, readonly base: number, readonly size: number) {}

  /** A reader over `src` that stops after `budget` bytes in all (64 MiB by default). */
  static over(src: ByteSource, budget = 64 << 20): Reader {
    return new Reader(new Core(src, budget), 0, src.size);
  }

  /** The region [offset, offset+length) of this reader, clamped to it; shares cache and budget. */
  region(offset: number, length: number): Reader {
    const start = Math.min(Math.max(0, offset), this.size);
    return new Reader(this.core, this.base + start, Math.max(0, Math.min(length, this.size - start)));
  }

  /** Bytes read from the source so far (by every region of it). */
  get bytesRead(): number { return this.core.used; }

  /** True if [offset, offset+length) lies inside this reader. */
  within(offset: number, length: number): boolean {
    return offset >= 0 && length >= 0 && offset + length <= this.size;
  }

  /**
   * Exactly `length` bytes at `offset`; whatever lies past the end reads as zeros. `length` is
   * capped at MAX_READ (a parser asking for more has misread a length field).
   */
  async read(offset: number, length: number): Promise<Uint8Array> {
    if (!Number.isSafeInteger(offset) || offset < 0) throw new RangeError(`bad offset ${offset}`);
    if (!Number.isSafeInteger(length) || length < 0 || length > MAX_READ) throw new RangeError(`read of ${length} bytes refused (limit ${MAX_READ})`);
    const out = new Uint8Array(length);
    const end = this.base + Math.min(offset + length, this.size);
    const start = this.base + offset;
    if (start >= end) return out;
    const cache = this.core.cache;
    const last = Math.floor((end - 1) / BLOCK);
    for (let b = Math.floor(start / BLOCK); b <= last; b++) {
      let block = cache.get(b);
      if (!block) {
        let runEnd = b; // fetch the run of missing blocks in one read
        while (runEnd < last && !cache.has(runEnd + 1)) runEnd++;
        await this.core.fetch(b, runEnd);
        block = cache.get(b)!;
      }
      const bStart = b * BLOCK;
      const from = Math.max(start, bStart) - bStart;
      const to = Math.min(end, bStart + block.length) - bStart;
      if (to > from) out.set(block.subarray(from, to), bStart + from - start);
    }
    return out;
  }
}
