// Sequential readers of a remote image, told apart (several may interleave): where each recent
// stream ended and how far ahead of it to fetch. The window starts at one block and doubles for
// each block a stream enters, up to the readahead limit: a short run costs little, a long one gets
// deep readahead.

/** Streams remembered. */
const RECENT = 8;
/** A read starting at most this far after where a recent one ended continues it. */
const SEQ_GAP = 64 * 1024;

export class Streams {
  private readonly ends = new Float64Array(RECENT).fill(-Infinity);
  private readonly windows = new Float64Array(RECENT);
  private next = 0;

  constructor(private readonly blockSize: number, private readonly maxWindow: number) {}

  /** True if a read at `offset` would continue a recent one. */
  continues(offset: number): boolean { return this.find(offset) >= 0; }

  /**
   * Note a read of [offset, end). Returns -1 if it continues no recent read; 0 if it does but ends
   * in the block its stream was already in (looked ahead of before); else the stream's readahead
   * window in bytes, grown by this block.
   */
  note(offset: number, end: number): number {
    const i = this.find(offset);
    if (i < 0) {
      this.ends[this.next] = end;
      this.windows[this.next] = 0;
      this.next = (this.next + 1) % RECENT;
      return -1;
    }
    const bs = this.blockSize, prev = this.ends[i]!;
    this.ends[i] = end;
    if (Math.floor((prev - 1) / bs) === Math.floor((end - 1) / bs)) return 0;
    return (this.windows[i] = Math.min(this.maxWindow, Math.max(bs, 2 * this.windows[i]!)));
  }

  private find(offset: number): number {
    const e = this.ends;
    for (let i = 0; i < RECENT; i++) if (offset >= e[i]! && offset - e[i]! <= SEQ_GAP) return i;
    return -1;
  }
}
