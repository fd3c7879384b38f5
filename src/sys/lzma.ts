// liblzma (liblzma.so.5) through bun:ffi: decoding one xz Block at a time (lzma_block_header_decode
// + lzma_block_decoder), given the Block's header bytes, the Stream's check type and the sizes the
// Index records. The container (stream header/footer, index) is parsed by the caller. Structs live
// outside the JavaScript heap.
import { cAlloc, cFree } from "./libc.ts";

type Ffi = typeof import("bun:ffi");
let ffi: Ffi | null = null;
try { ffi = require("bun:ffi") as Ffi; } catch { ffi = null; }

export const LZMA_OK = 0;
export const LZMA_STREAM_END = 1;
const LZMA_RUN = 0;

function load(f: Ffi) {
  const { FFIType: T } = f;
  return f.dlopen("liblzma.so.5", {
    lzma_block_header_decode: { args: [T.ptr, T.ptr, T.ptr], returns: T.i32 },
    lzma_block_compressed_size: { args: [T.ptr, T.u64], returns: T.i32 },
    lzma_raw_decoder_memusage: { args: [T.ptr], returns: T.u64_fast },
    lzma_block_decoder: { args: [T.ptr, T.ptr], returns: T.i32 },
    lzma_code: { args: [T.ptr, T.i32], returns: T.i32 },
    lzma_end: { args: [T.ptr], returns: T.void },
    free: { args: [T.ptr], returns: T.void },
  }).symbols;
}

let lib: ReturnType<typeof load> | null = null;
try { lib = ffi ? load(ffi) : null; } catch { lib = null; }
export const haveLzma = lib !== null;

const RET_NAMES: Record<number, string> = {
  2: "no integrity check", 3: "unsupported integrity check", 5: "out of memory", 6: "memory limit reached",
  7: "not the xz format", 8: "unsupported options (filter chain)", 9: "corrupt data", 10: "unexpected end of data",
  11: "liblzma programming error",
};
export function lzmaMessage(code: number): string { return RET_NAMES[code] ?? `liblzma error ${code}`; }

// lzma_stream (136 bytes), lzma_block (208 bytes) and 5 lzma_filter entries (16 bytes each) on
// 64-bit Linux, liblzma 5.x.
const STREAM_SIZE = 136, BLOCK_SIZE = 208, FILTERS_SIZE = 5 * 16;
const NEXT_IN = 0, AVAIL_IN = 8, NEXT_OUT = 24, AVAIL_OUT = 32;
const B_VERSION = 0, B_HEADER_SIZE = 4, B_CHECK = 8, B_CSIZE = 16, B_USIZE = 24, B_FILTERS = 32;
const EMPTY = new Uint8Array(1);

export class LzmaError extends Error {
  constructor(message: string, readonly ret: number) { super(message); }
}

/** Decodes xz Blocks, one at a time, reusing liblzma's state between them. */
export class XzBlockDecoder {
  private readonly mem: { addr: number; bytes: Uint8Array };
  private readonly v: DataView;
  private readonly strm: number;
  private readonly block: number;
  private readonly filters: number;
  private closed = false;
  inUsed = 0;
  outMade = 0;

  constructor() {
    if (!lib || !ffi) throw new Error("liblzma (liblzma.so.5) could not be loaded: install liblzma5");
    this.mem = cAlloc(STREAM_SIZE + BLOCK_SIZE + FILTERS_SIZE);
    this.v = new DataView(this.mem.bytes.buffer);
    this.strm = this.mem.addr;
    this.block = this.mem.addr + STREAM_SIZE;
    this.filters = this.block + BLOCK_SIZE;
  }

  private u64(at: number): number { return this.v.getUint32(at, true) + this.v.getUint32(at + 4, true) * 2 ** 32; }
  private setU64(at: number, n: number): void {
    this.v.setUint32(at, n % 2 ** 32, true);
    this.v.setUint32(at + 4, Math.floor(n / 2 ** 32), true);
  }

  /**
   * Prepare to decode a Block whose header is `header` (its first (header[0]+1)*4 bytes), in a
   * Stream with check type `check`, with the Unpadded and Uncompressed Sizes the Index records.
   * Throws an LzmaError for a corrupt header, sizes that disagree with the Index, an unsupported
   * filter chain, or a decoder that would need more than `memLimit` bytes.
   */
  begin(header: Uint8Array, check: number, unpaddedSize: number, uncompressedSize: number, memLimit: number): void {
    const l = lib!;
    const f = ffi!;
    const b = STREAM_SIZE;
    this.mem.bytes.fill(0, b, b + BLOCK_SIZE + FILTERS_SIZE);
    this.v.setUint32(b + B_VERSION, 1, true);
    this.v.setUint32(b + B_HEADER_SIZE, (header[0]! + 1) * 4, true);
    this.v.setUint32(b + B_CHECK, check, true);
    this.setU64(b + B_FILTERS, this.filters);
    let r = l.lzma_block_header_decode(this.block as never, null, f.ptr(header));
    if (r !== LZMA_OK) throw new LzmaError(`block header: ${lzmaMessage(r)}`, r);
    try {
      r = l.lzma_block_compressed_size(this.block as never, unpaddedSize);
      if (r !== LZMA_OK) throw new LzmaError(`block header sizes disagree with the index (${lzmaMessage(r)})`, r);
      const declared = this.v.getUint32(b + B_USIZE, true) === 0xffffffff && this.v.getUint32(b + B_USIZE + 4, true) === 0xffffffff
        ? -1 : this.u64(b + B_USIZE);
      if (declared === -1) this.setU64(b + B_USIZE, uncompressedSize);
      else if (declared !== uncompressedSize) {
        throw new LzmaError(`block header says ${declared} uncompressed bytes, the index ${uncompressedSize}`, 9);
      }
      const need = Number(l.lzma_raw_decoder_memusage(this.filters as never));
      if (need > memLimit) throw new LzmaError(`the block's filter chain needs ${need} bytes of memory (limit ${memLimit})`, 6);
      r = l.lzma_block_decoder(this.strm as never, this.block as never);
      if (r !== LZMA_OK) throw new LzmaError(`block decoder: ${lzmaMessage(r)}`, r);
    } finally {
      // The decoder keeps its own copy of the filter options.
      for (let i = 0; i < 5; i++) {
        const opt = this.u64(STREAM_SIZE + BLOCK_SIZE + i * 16 + 8);
        if (opt) l.free(opt as never);
      }
    }
  }

  /** lzma_code over input[inOff, +inLen) into output[outOff, +outLen); sets inUsed/outMade. */
  run(input: Uint8Array, inOff: number, inLen: number, output: Uint8Array, outOff: number, outLen: number): number {
    const f = ffi!;
    this.setU64(NEXT_IN, inLen > 0 ? f.ptr(input, inOff) : f.ptr(EMPTY));
    this.setU64(AVAIL_IN, inLen);
    this.setU64(NEXT_OUT, outLen > 0 ? f.ptr(output, outOff) : f.ptr(EMPTY));
    this.setU64(AVAIL_OUT, outLen);
    const r = lib!.lzma_code(this.strm as never, LZMA_RUN);
    this.inUsed = inLen - this.u64(AVAIL_IN);
    this.outMade = outLen - this.u64(AVAIL_OUT);
    this.setU64(NEXT_IN, 0);
    this.setU64(NEXT_OUT, 0);
    return r;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    lib!.lzma_end(this.strm as never);
    cFree(this.mem.addr);
  }
}
