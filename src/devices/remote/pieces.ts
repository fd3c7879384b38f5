// Which 4 KiB pieces of each block a remote cache holds, for blocks held in part: one bitmap per
// block in one array, all zeros unless the block is PARTIAL. 32 bytes per MiB of image whatever
// the block size, its pages only touched where blocks are held in part (a map of small arrays
// would cost a client's random reads ~100 bytes of heap per block). The map file keeps the same
// bitmaps after its state bytes; the cache writes them there.

/** The unit of a block held in part: what a small random read fetches and marks. */
export const PIECE = 4096;

export class PieceMap {
  /** Bytes of one block's bitmap. */
  readonly bytesPerBlock: number;
  private readonly bits: Uint8Array;

  constructor(blocks: number, blockSize: number) {
    this.bytesPerBlock = Math.ceil(blockSize / PIECE / 8);
    this.bits = new Uint8Array(blocks * this.bytesPerBlock);
  }

  /** Block `b`'s bitmap (a view: reading the map file into it loads it). */
  of(b: number): Uint8Array { return this.bits.subarray(b * this.bytesPerBlock, (b + 1) * this.bytesPerBlock); }

  clear(b: number): void { this.of(b).fill(0); }

  /** Bytes held of block `b`, `blockBytes` long. */
  held(b: number, blockBytes: number): number {
    const bm = this.bits, at = b * this.bytesPerBlock * 8;
    let n = 0;
    for (let p = 0, off = 0; off < blockBytes; p++, off += PIECE) if (bm[(at + p) >> 3]! & (1 << ((at + p) & 7))) n += Math.min(PIECE, blockBytes - off);
    return n;
  }

  /** True if the pieces covering block-relative bytes [from, to) of block `b` are held. */
  covers(b: number, from: number, to: number): boolean {
    const bm = this.bits, at = b * this.bytesPerBlock * 8;
    for (let p = at + Math.floor(from / PIECE), last = at + Math.floor((to - 1) / PIECE); p <= last; p++) {
      if ((bm[p >> 3]! & (1 << (p & 7))) === 0) return false;
    }
    return true;
  }

  /** Set the pieces of `ranges` (block-relative pairs) of block `b`, `blockBytes` long; true if now every piece is held. */
  add(b: number, ranges: readonly number[], blockBytes: number): boolean {
    const bm = this.bits, at = b * this.bytesPerBlock * 8;
    for (let i = 0; i < ranges.length; i += 2) {
      for (let p = at + Math.floor(ranges[i]! / PIECE), last = at + Math.floor((ranges[i + 1]! - 1) / PIECE); p <= last; p++) bm[p >> 3]! |= 1 << (p & 7);
    }
    return this.covers(b, 0, blockBytes);
  }
}
