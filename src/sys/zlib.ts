// zlib (libz.so.1) through bun:ffi: raw inflate (windowBits -15) with the calls a zran-style index
// needs (Z_BLOCK stops, inflatePrime, inflateSetDictionary/GetDictionary) and crc32. The z_stream
// lives outside the JavaScript heap (zlib checks that it never moves); buffers are passed per call.
import { cAlloc, cFree } from "./libc.ts";

type Ffi = typeof import("bun:ffi");
let ffi: Ffi | null = null;
try { ffi = require("bun:ffi") as Ffi; } catch { ffi = null; }

export const Z_OK = 0;
export const Z_STREAM_END = 1;
export const Z_NEED_DICT = 2;
export const Z_BUF_ERROR = -5;
export const Z_NO_FLUSH = 0;
/** Stop at the end of each deflate block (and after the header). */
export const Z_BLOCK = 5;

function load(f: Ffi) {
  const { FFIType: T } = f;
  return f.dlopen("libz.so.1", {
    zlibVersion: { args: [], returns: T.ptr },
    inflateInit2_: { args: [T.ptr, T.i32, T.ptr, T.i32], returns: T.i32 },
    inflate: { args: [T.ptr, T.i32], returns: T.i32 },
    inflateEnd: { args: [T.ptr], returns: T.i32 },
    inflateReset: { args: [T.ptr], returns: T.i32 },
    inflatePrime: { args: [T.ptr, T.i32, T.i32], returns: T.i32 },
    inflateSetDictionary: { args: [T.ptr, T.ptr, T.u32], returns: T.i32 },
    inflateGetDictionary: { args: [T.ptr, T.ptr, T.ptr], returns: T.i32 },
    crc32: { args: [T.u64, T.ptr, T.u32], returns: T.u64_fast },
  }).symbols;
}

let lib: ReturnType<typeof load> | null = null;
try { lib = ffi ? load(ffi) : null; } catch { lib = null; }
export const haveZlib = lib !== null;

function zlib(): NonNullable<typeof lib> {
  if (!lib || !ffi) throw new Error("zlib (libz.so.1) could not be loaded: install zlib1g");
  return lib;
}

// struct z_stream on 64-bit Linux (zlib 1.2.x), 112 bytes.
const Z_STREAM_SIZE = 112;
const NEXT_IN = 0, AVAIL_IN = 8, TOTAL_IN = 16, NEXT_OUT = 24, AVAIL_OUT = 32, TOTAL_OUT = 40, MSG = 48, DATA_TYPE = 88;

const EMPTY = new Uint8Array(1);

/** One raw-deflate decoder. Not thread-safe; call close() when done. */
export class RawInflate {
  private readonly addr: number;
  private readonly view: DataView;
  private closed = false;
  private readonly lenBox = new Uint32Array(1);
  /** After run(): bytes of input consumed and output produced by that call. */
  inUsed = 0;
  outMade = 0;

  constructor() {
    const z = zlib();
    const mem = cAlloc(Z_STREAM_SIZE);
    this.addr = mem.addr;
    this.view = new DataView(mem.bytes.buffer);
    const r = z.inflateInit2_(this.addr as never, -15, z.zlibVersion(), Z_STREAM_SIZE);
    if (r !== Z_OK) { cFree(this.addr); throw new Error(`zlib inflateInit2 failed (${r})`); }
  }

  /** data_type after the last call: unused bits of the last input byte (& 7), +64 in the last block, +128 at a block boundary. */
  get dataType(): number { return this.view.getInt32(DATA_TYPE, true); }
  get totalOut(): number { return this.u64(TOTAL_OUT); }
  get totalIn(): number { return this.u64(TOTAL_IN); }

  private u64(at: number): number { return this.view.getUint32(at, true) + this.view.getUint32(at + 4, true) * 2 ** 32; }
  private setPtr(at: number, p: number): void {
    this.view.setUint32(at, p % 2 ** 32, true);
    this.view.setUint32(at + 4, Math.floor(p / 2 ** 32), true);
  }

  /** Start a new raw deflate stream (keeps the allocated window). */
  reset(): void {
    const r = zlib().inflateReset(this.addr as never);
    if (r !== Z_OK) throw new Error(`zlib inflateReset failed (${r})`);
  }

  /** Insert `bits` bits (the low bits of `value`) before the next input byte. */
  prime(bits: number, value: number): void {
    const r = zlib().inflatePrime(this.addr as never, bits, value);
    if (r !== Z_OK) throw new Error(`zlib inflatePrime failed (${r})`);
  }

  /** Preset the 32 KiB history a stream resumed in the middle needs. */
  setDictionary(dict: Uint8Array, len: number): void {
    if (len === 0) return;
    const r = zlib().inflateSetDictionary(this.addr as never, ffi!.ptr(dict), len);
    if (r !== Z_OK) throw new Error(`zlib inflateSetDictionary failed (${r})`);
  }

  /** Copy the current history (up to 32 KiB) into `out`; returns its length. */
  getDictionary(out: Uint8Array): number {
    const r = zlib().inflateGetDictionary(this.addr as never, ffi!.ptr(out), ffi!.ptr(this.lenBox));
    if (r !== Z_OK) throw new Error(`zlib inflateGetDictionary failed (${r})`);
    return this.lenBox[0]!;
  }

  /**
   * inflate() over input[inOff, +inLen) into output[outOff, +outLen). Returns zlib's code; sets
   * inUsed and outMade. Errors (Z_DATA_ERROR...) are returned, not thrown: see message().
   */
  run(input: Uint8Array, inOff: number, inLen: number, output: Uint8Array, outOff: number, outLen: number, flush: number): number {
    const f = ffi!;
    const v = this.view;
    this.setPtr(NEXT_IN, inLen > 0 ? f.ptr(input, inOff) : f.ptr(EMPTY));
    v.setUint32(AVAIL_IN, inLen, true);
    this.setPtr(NEXT_OUT, outLen > 0 ? f.ptr(output, outOff) : f.ptr(EMPTY));
    v.setUint32(AVAIL_OUT, outLen, true);
    const r = lib!.inflate(this.addr as never, flush);
    this.inUsed = inLen - v.getUint32(AVAIL_IN, true);
    this.outMade = outLen - v.getUint32(AVAIL_OUT, true);
    // Do not leave pointers into JavaScript buffers behind.
    this.setPtr(NEXT_IN, 0);
    this.setPtr(NEXT_OUT, 0);
    return r;
  }

  /** zlib's message for the last error, or the code. */
  message(code: number): string {
    const p = this.u64(MSG);
    const names: Record<number, string> = { [-2]: "stream error", [-3]: "invalid deflate data", [-4]: "out of memory", [-5]: "unexpected end of data", [2]: "needs a dictionary" };
    return p ? String(new ffi!.CString(p as never)) : names[code] ?? `zlib error ${code}`;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    lib!.inflateEnd(this.addr as never);
    cFree(this.addr);
  }
}

/** CRC-32 (the one gzip, zip and xz use) of buf[off, off+len), continuing from `crc`. */
export function crc32(crc: number, buf: Uint8Array, off = 0, len = buf.length - off): number {
  const z = zlib();
  let c = crc;
  const f = ffi!;
  // crc32() takes a 32-bit length.
  for (let at = off, end = off + len; at < end;) {
    const n = Math.min(end - at, 1 << 30);
    c = Number(z.crc32(c, f.ptr(buf, at), n));
    at += n;
  }
  return c >>> 0;
}
