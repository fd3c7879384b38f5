// .xz images: the container (Stream Header/Footer, Index, Stream Padding, concatenated Streams) is
// parsed here from the xz file format specification, backwards from the end of the file; each
// Block is one segment of the seekable device, decoded by liblzma (src/sys/lzma.ts). A file with
// a single large Block can only be decoded from its start: it is decoded progressively into the
// spill file, with a warning saying so.
import { ensure, type Input, readAt as readBytes, readIn } from "./input.ts";
import { haveLzma, LZMA_OK, LZMA_STREAM_END, lzmaMessage, XzBlockDecoder } from "../../sys/lzma.ts";
import { crc32 } from "../../sys/zlib.ts";
import type { Maybe } from "../types.ts";
import { FULL_SEGMENT, type SegmentSource, type SegmentStream } from "./seekable.ts";

export const XZ_MAGIC = [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00];
const FOOTER_MAGIC = [0x59, 0x5a];
/** Refuse Indexes larger than this (a few million Blocks). */
const MAX_INDEX = 64 * 1024 * 1024;
/** Refuse Blocks whose decoder needs more memory than this (LZMA2 dictionaries go up to 1.5 GiB). */
const MEM_LIMIT = 1024 * 1024 * 1024;
const CHECK_SIZES = [0, 4, 4, 4, 8, 8, 8, 16, 16, 16, 32, 32, 32, 64, 64, 64];

export interface XzBlock {
  /** File offset of the Block Header. */
  offset: number;
  unpadded: number;
  uncompressed: number;
  /** Uncompressed offset. */
  start: number;
  check: number;
}

export class XzError extends Error {}

function readAt(inp: Input, len: number, pos: number, what: string): Uint8Array {
  const b = readBytes(inp, len, pos);
  if (b.length < len) throw new XzError(`truncated: ${what} at byte ${pos} is cut off`);
  return b;
}

const u32 = (b: Uint8Array, at: number) => (b[at]! | (b[at + 1]! << 8) | (b[at + 2]! << 16) | (b[at + 3]! << 24)) >>> 0;
const eq = (b: Uint8Array, at: number, m: number[]) => m.every((x, i) => b[at + i] === x);

/** Decode a variable-length integer at b[pos]; returns [value, next pos]. */
function vli(b: Uint8Array, pos: number, end: number): [number, number] {
  let v = 0;
  for (let i = 0; i < 9; i++) {
    if (pos >= end) throw new XzError("corrupt index: a number runs past its end");
    const x = b[pos++]!;
    v += (x & 0x7f) * 2 ** (7 * i);
    if ((x & 0x80) === 0) {
      if (x === 0 && i > 0) throw new XzError("corrupt index: a number is not minimally encoded");
      if (v > Number.MAX_SAFE_INTEGER) throw new XzError("index value too large");
      return [v, pos];
    }
  }
  throw new XzError("corrupt index: a number is longer than 9 bytes");
}

function streamFlags(b: Uint8Array, at: number, where: string): number {
  if (b[at] !== 0 || (b[at + 1]! & 0xf0) !== 0) throw new XzError(`${where}: unsupported stream flags (a newer xz format?)`);
  return b[at + 1]! & 0x0f;
}

/** Parse every Stream of an .xz file; returns its Blocks in order and the uncompressed size. */
export function parseXz(fd: Input): { blocks: XzBlock[]; size: number; streams: number } {
  const size = fd.size;
  const streams: XzBlock[][] = [];
  let pos = size;
  if (size < 32) throw new XzError(`too short for an xz file (${size} bytes)`);
  while (pos > 0) {
    // Stream Padding: multiples of four zero bytes.
    let tail = readAt(fd, 12, pos - 12, "stream footer");
    while (u32(tail, 8) === 0 && pos >= 12 + 4) {
      pos -= 4;
      tail = readAt(fd, 12, pos - 12, "stream footer");
    }
    if (!eq(tail, 10, FOOTER_MAGIC)) throw new XzError(`corrupt or truncated: no stream footer at byte ${pos - 12}`);
    if (pos % 4 !== 0) throw new XzError("corrupt: the stream does not end on a multiple of four bytes");
    if (crc32(0, tail, 4, 6) !== u32(tail, 0)) throw new XzError(`corrupt: stream footer CRC mismatch at byte ${pos - 12}`);
    const check = streamFlags(tail, 8, "stream footer");
    const indexSize = (u32(tail, 4) + 1) * 4;
    if (indexSize > MAX_INDEX) throw new XzError(`index of ${indexSize} bytes is larger than the limit ${MAX_INDEX}`);
    const indexStart = pos - 12 - indexSize;
    if (indexStart < 12) throw new XzError("corrupt: the footer's index size points before the file start");
    const idx = readAt(fd, indexSize, indexStart, "index");
    if (idx[0] !== 0) throw new XzError(`corrupt: no index indicator at byte ${indexStart}`);
    if (crc32(0, idx, 0, indexSize - 4) !== u32(idx, indexSize - 4)) throw new XzError(`corrupt: index CRC mismatch at byte ${indexStart}`);
    let [count, p] = vli(idx, 1, indexSize - 4);
    if (count > indexSize / 2) throw new XzError("corrupt index: more records than it has bytes for");
    const recs: { unpadded: number; uncompressed: number }[] = [];
    let blocksBytes = 0;
    for (let i = 0; i < count; i++) {
      let unpadded: number, uncompressed: number;
      [unpadded, p] = vli(idx, p, indexSize - 4);
      [uncompressed, p] = vli(idx, p, indexSize - 4);
      if (unpadded < 5 + CHECK_SIZES[check]! ) throw new XzError(`corrupt index: record ${i} has an impossible size`);
      recs.push({ unpadded, uncompressed });
      blocksBytes += Math.ceil(unpadded / 4) * 4;
    }
    while (p < indexSize - 4) if (idx[p++] !== 0) throw new XzError("corrupt index: non-zero padding");
    if (p % 4 !== 0) throw new XzError("corrupt index: bad padding");
    const start = indexStart - blocksBytes - 12;
    if (start < 0) throw new XzError("corrupt: the index describes more data than the file holds");
    const head = readAt(fd, 12, start, "stream header");
    if (!eq(head, 0, XZ_MAGIC)) throw new XzError(`corrupt or truncated: no stream header at byte ${start} where the index says the stream starts`);
    if (crc32(0, head, 6, 2) !== u32(head, 8)) throw new XzError(`corrupt: stream header CRC mismatch at byte ${start}`);
    if (streamFlags(head, 6, "stream header") !== check) throw new XzError("corrupt: stream header and footer flags differ");
    const blocks: XzBlock[] = [];
    let off = start + 12;
    for (const r of recs) {
      blocks.push({ offset: off, unpadded: r.unpadded, uncompressed: r.uncompressed, start: 0, check });
      off += Math.ceil(r.unpadded / 4) * 4;
    }
    streams.unshift(blocks);
    pos = start;
  }
  const blocks: XzBlock[] = [];
  let total = 0;
  for (const s of streams) {
    for (const b of s) {
      b.start = total;
      total += b.uncompressed;
      if (total > Number.MAX_SAFE_INTEGER) throw new XzError("uncompressed size beyond 2^53");
      if (b.uncompressed > 0) blocks.push(b);
    }
  }
  return { blocks, size: total, streams: streams.length };
}

const IN_CHUNK = 256 * 1024;
/** A Block decoded progressively has this much of its compressed bytes made local at a time. */
const AHEAD = 8 * 1024 * 1024;

/** Decodes one Block from its header to its check. */
class BlockStream implements SegmentStream {
  private readonly dec = new XzBlockDecoder();
  private readonly input = new Uint8Array(IN_CHUNK);
  private inPos = 0;
  private inEnd = 0;
  private filePos: number;
  private readonly fileEnd: number;
  private produced = 0;
  private ended = false;

  constructor(private readonly fd: Input, private readonly b: XzBlock) {
    const first = readAt(fd, 1, b.offset, "block header");
    const hsize = (first[0]! + 1) * 4;
    if (first[0] === 0 || hsize > b.unpadded) throw new XzError(`corrupt: no block header at byte ${b.offset}`);
    const header = readAt(fd, hsize, b.offset, "block header");
    try {
      this.dec.begin(header, b.check, b.unpadded, b.uncompressed, MEM_LIMIT);
    } catch (e) {
      this.dec.close();
      throw new XzError(`block at byte ${b.offset}: ${(e as Error).message}`);
    }
    this.filePos = b.offset + hsize;
    this.fileEnd = b.offset + Math.ceil(b.unpadded / 4) * 4;
  }

  private step(out: Uint8Array, off: number, len: number): number {
    if (this.inPos === this.inEnd && this.filePos < this.fileEnd) {
      const n = Math.min(IN_CHUNK, this.fileEnd - this.filePos);
      // (NotLocal is thrown before any state here changes: the read runs again once it is local)
      const r = readIn(this.fd, this.input, 0, n, this.filePos, Math.min(AHEAD, this.fileEnd - this.filePos));
      if (r === 0) throw new XzError(`truncated at byte ${this.filePos}`);
      this.filePos += r;
      this.inPos = 0;
      this.inEnd = r;
    }
    const avail = this.inEnd - this.inPos;
    const r = this.dec.run(this.input, this.inPos, avail, out, off, len);
    this.inPos += this.dec.inUsed;
    if (r === LZMA_STREAM_END) this.ended = true;
    else if (r !== LZMA_OK) throw new XzError(`block at byte ${this.b.offset}: ${lzmaMessage(r)}`);
    else if (this.dec.inUsed === 0 && this.dec.outMade === 0 && avail === 0 && this.filePos >= this.fileEnd) {
      throw new XzError(`block at byte ${this.b.offset} ends before its data does`);
    }
    return this.dec.outMade;
  }

  read(buf: Uint8Array, off: number, len: number): number {
    const left = this.b.uncompressed - this.produced;
    const want = Math.min(len, left);
    if (want === 0) return 0;
    for (;;) {
      const n = this.step(buf, off, want);
      this.produced += n;
      if (n > 0) return n;
      if (this.ended) throw new XzError(`block at byte ${this.b.offset} holds ${this.produced} bytes, the index says ${this.b.uncompressed}`);
    }
  }

  finish(): void {
    const spare = new Uint8Array(1);
    while (!this.ended) {
      if (this.step(spare, 0, 1) > 0) throw new XzError(`block at byte ${this.b.offset} holds more than the ${this.b.uncompressed} bytes the index says`);
    }
  }

  close(): void { this.dec.close(); }
}

/** The seekable view of a parsed .xz file. */
export class XzSource implements SegmentSource {
  readonly starts: Float64Array;
  constructor(readonly label: string, private readonly fd: Input, private readonly blocks: XzBlock[], readonly size: number, private readonly onClose: () => Maybe) {
    this.starts = Float64Array.from(blocks, (b) => b.start);
  }
  open(segment: number): SegmentStream {
    const b = this.blocks[segment]!;
    // A Block decoded whole has all of its compressed bytes made local at once (one fetch).
    // A larger one has its header made local here (the decoder would leak if its constructor
    // threw NotLocal), and the rest a window at a time as it is decoded.
    const padded = Math.ceil(b.unpadded / 4) * 4;
    if (b.uncompressed <= FULL_SEGMENT) ensure(this.fd, b.offset, padded);
    else ensure(this.fd, b.offset, Math.min(1024, padded), AHEAD);
    return new BlockStream(this.fd, b);
  }
  close(): Maybe { return this.onClose(); }
  /** The largest Block, and whether it is too large to decode whole on first read. */
  largest(): { bytes: number; progressive: boolean } {
    const bytes = this.blocks.reduce((m, b) => Math.max(m, b.uncompressed), 0);
    return { bytes, progressive: bytes > FULL_SEGMENT };
  }
}

export function xzAvailable(): boolean { return haveLzma; }
