// A zran-style index of access points into deflate data (gzip members, deflated zip members): one
// pass over the whole stream at first open records, every few MiB at a deflate block boundary,
// the uncompressed offset, the compressed byte and bit position, and the 32 KiB history; from any
// access point zlib (raw inflate, inflatePrime + inflateSetDictionary) resumes. Histories live in
// an index file (windows first, then the point table), kept in the cache directory when there is
// one, so a second open reads a table instead of decompressing again.
import { closeSync, openSync, readSync, renameSync, unlinkSync, writeSync } from "node:fs";
import type { Maybe } from "../types.ts";
import { ensure, type Input, readIn } from "./input.ts";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { crc32, RawInflate, Z_BLOCK, Z_BUF_ERROR, Z_NO_FLUSH, Z_STREAM_END } from "../../sys/zlib.ts";
import type { SegmentSource, SegmentStream } from "./seekable.ts";

/** Access points at least this far apart (in uncompressed bytes); more for very large images. */
export const SPAN = 2 * 1024 * 1024;
const WINDOW = 32768;
const IN_CHUNK = 1024 * 1024;
const STAGE = 1024 * 1024;
/** Input a span's inflater may read past the next access point's byte (zlib reads ahead a little). */
const SLACK = 64 * 1024;
/** Deflate cannot expand more than 1032:1; output beyond that is corrupt data or a bomb. */
export const MAX_RATIO = 1032;

export class DeflateError extends Error {}

/** The points of an index, as parallel arrays. */
export interface Points {
  out: number[];
  inPos: number[];
  bits: number[];
  /** Window length; negative: that many zero bytes (not stored). */
  winLen: number[];
  winAt: number[];
}

/** How the deflate streams of a file are framed (gzip members, or one raw zip member). */
export interface Framing {
  /** The deflate data start of the next stream at or after file position `pos`, or null at the end. */
  next(pos: number): number | null;
  /** Check the end of a stream (trailer CRC and size) ending at `pos`; returns the position after it. */
  end(pos: number, crc: number, size: number): number;
  /** Uncompressed bytes the stream may not exceed (a declared size), or Infinity. */
  limit: number;
}

const MAGIC = "BNBDZIX1";
const HEADER = 64;
const ENTRY = 32;

/** Index file reader/writer: header, windows, table, table CRC. */
class IndexFile {
  fd: number;
  private at = HEADER;
  constructor(readonly path: string | null, fd: number) { this.fd = fd; }

  static create(dir: string | null, key: string): IndexFile {
    if (dir) {
      const path = join(dir, `${key}.zidx.tmp-${process.pid}-${Math.random().toString(36).slice(2, 8)}`);
      try { return new IndexFile(path, openSync(path, "wx+", 0o600)); } catch { /* fall through */ }
    }
    const tmp = join(process.env.TMPDIR || tmpdir(), `bun-nbd-index-${process.pid}-${Math.random().toString(36).slice(2, 10)}`);
    const fd = openSync(tmp, "wx+", 0o600);
    unlinkSync(tmp);
    return new IndexFile(null, fd);
  }

  append(buf: Uint8Array, len: number): number {
    const pos = this.at;
    let done = 0;
    while (done < len) done += writeSync(this.fd, buf, done, len - done, pos + done);
    this.at += len;
    return pos;
  }

  finish(p: Points, size: number, key: string, finalPath: string | null): void {
    const n = p.out.length;
    const table = new Uint8Array(n * ENTRY + 4);
    const v = new DataView(table.buffer);
    for (let i = 0; i < n; i++) {
      v.setFloat64(i * ENTRY, p.out[i]!, true);
      v.setFloat64(i * ENTRY + 8, p.inPos[i]!, true);
      v.setFloat64(i * ENTRY + 16, p.winAt[i]!, true);
      v.setInt32(i * ENTRY + 24, p.winLen[i]!, true);
      v.setUint8(i * ENTRY + 28, p.bits[i]!);
    }
    v.setUint32(n * ENTRY, crc32(0, table, 0, n * ENTRY), true);
    const tableAt = this.append(table, table.length);
    const head = new Uint8Array(HEADER);
    const hv = new DataView(head.buffer);
    head.set(new TextEncoder().encode(MAGIC), 0);
    hv.setUint32(8, n, true);
    hv.setFloat64(16, size, true);
    hv.setFloat64(24, tableAt, true);
    head.set(Buffer.from(key.slice(0, 64), "hex").subarray(0, 32), 32);
    writeSync(this.fd, head, 0, HEADER, 0);
    if (this.path && finalPath) {
      try { renameSync(this.path, finalPath); } catch { try { unlinkSync(this.path); } catch { /* ignore */ } }
    }
  }

  /** Load a finished index; null if it is missing, stale or damaged. */
  static load(path: string, key: string, compressedEnd: number): { file: IndexFile; points: Points; size: number } | null {
    let fd: number;
    try { fd = openSync(path, "r"); } catch { return null; }
    try {
      const head = new Uint8Array(HEADER);
      if (readSync(fd, head, 0, HEADER, 0) !== HEADER) throw 0;
      const hv = new DataView(head.buffer);
      if (new TextDecoder().decode(head.subarray(0, 8)) !== MAGIC) throw 0;
      if (Buffer.from(head.subarray(32, 64)).toString("hex") !== key) throw 0;
      const n = hv.getUint32(8, true);
      const size = hv.getFloat64(16, true);
      const tableAt = hv.getFloat64(24, true);
      if (n < 1 || n > 1 << 24 || !Number.isSafeInteger(size) || !Number.isSafeInteger(tableAt)) throw 0;
      const table = new Uint8Array(n * ENTRY + 4);
      if (readSync(fd, table, 0, table.length, tableAt) !== table.length) throw 0;
      const v = new DataView(table.buffer);
      if (crc32(0, table, 0, n * ENTRY) !== v.getUint32(n * ENTRY, true)) throw 0;
      const p: Points = { out: [], inPos: [], bits: [], winLen: [], winAt: [] };
      for (let i = 0; i < n; i++) {
        const out = v.getFloat64(i * ENTRY, true), inPos = v.getFloat64(i * ENTRY + 8, true);
        const winAt = v.getFloat64(i * ENTRY + 16, true), winLen = v.getInt32(i * ENTRY + 24, true), bits = v.getUint8(i * ENTRY + 28);
        if (out < (i ? p.out[i - 1]! : 0) || out >= size || inPos > compressedEnd || bits > 7 || Math.abs(winLen) > WINDOW
          || winAt + Math.max(0, winLen) > tableAt) throw 0;
        p.out.push(out); p.inPos.push(inPos); p.bits.push(bits); p.winLen.push(winLen); p.winAt.push(winAt);
      }
      if (p.out[0] !== 0) throw 0;
      return { file: new IndexFile(null, fd), points: p, size };
    } catch {
      closeSync(fd);
      return null;
    }
  }

  window(at: number, len: number, buf: Uint8Array): void {
    if (readSync(this.fd, buf, 0, len, at) !== len) throw new DeflateError("index file: window cut short");
  }

  close(): void { closeSync(this.fd); }
}

export interface BuildResult { points: Points; size: number; file: IndexFile }

/**
 * One pass over the deflate streams of `fd` in [start, end): verifies every stream (zlib, the
 * framing's CRC and size checks), records access points, and hands every decoded byte to `sink`
 * (the spill file). Throws a DeflateError naming the byte where the data goes wrong.
 */
export function buildIndex(fd: Input, start: number, end: number, framing: Framing, store: { dir: string | null; key: string },
  sink: (buf: Uint8Array, len: number, pos: number) => void): BuildResult {
  const file = IndexFile.create(store.dir, store.key);
  const p: Points = { out: [], inPos: [], bits: [], winLen: [], winAt: [] };
  const inf = new RawInflate();
  const input = new Uint8Array(IN_CHUNK);
  const stage = new Uint8Array(STAGE);
  const win = new Uint8Array(WINDOW);
  let bufPos = start, bufLen = 0;
  let out = 0;
  try {
    let pos = start;
    let ds: number | null;
    while ((ds = framing.next(pos)) !== null) {
      inf.reset();
      let crc = 0, made = 0, at = ds, last = out;
      p.out.push(out); p.inPos.push(ds); p.bits.push(0); p.winLen.push(0); p.winAt.push(0);
      for (;;) {
        if (at >= bufPos + bufLen || at < bufPos) {
          bufPos = at;
          bufLen = readIn(fd, input, 0, Math.min(IN_CHUNK, Math.max(0, end - at)), at);
        }
        const avail = bufPos + bufLen - at;
        const r = inf.run(input, at - bufPos, avail, stage, 0, STAGE, Z_BLOCK);
        at += inf.inUsed;
        const n = inf.outMade;
        if (n > 0) {
          crc = crc32(crc, stage, 0, n);
          sink(stage, n, out);
          out += n;
          made += n;
          if (made > framing.limit) throw new DeflateError(`decodes to more than the ${framing.limit} bytes declared`);
          if (out > (at - start) * MAX_RATIO + (1 << 20)) {
            throw new DeflateError(`expands beyond deflate's ${MAX_RATIO}:1 limit by byte ${at}: corrupt data or a decompression bomb`);
          }
        }
        if (r === Z_STREAM_END) break;
        if (r < 0 && r !== Z_BUF_ERROR) throw new DeflateError(`${inf.message(r)} near byte ${at}`);
        if (avail === 0 && n === 0 && at >= end) throw new DeflateError(`truncated: the deflate data ends at byte ${end} in the middle of a stream`);
        const dt = inf.dataType;
        if ((dt & 128) !== 0 && (dt & 64) === 0 && out - last >= Math.max(SPAN, out / 16384)) {
          const len = inf.getDictionary(win);
          let zero = true;
          for (let i = 0; i < len; i++) if (win[i] !== 0) { zero = false; break; }
          p.out.push(out); p.inPos.push(at); p.bits.push(dt & 7);
          p.winLen.push(zero ? -len : len); p.winAt.push(zero ? 0 : file.append(win, len));
          last = out;
        }
      }
      pos = framing.end(at, crc, made);
    }
    if (p.out.length === 0 || out === 0) throw new DeflateError("no data: the image is empty");
    // Drop points that start nothing (a trailing empty member).
    while (p.out.length > 1 && p.out[p.out.length - 1]! >= out) { p.out.pop(); p.inPos.pop(); p.bits.pop(); p.winLen.pop(); p.winAt.pop(); }
    file.finish(p, out, store.key, store.dir ? join(store.dir, `${store.key}.zidx`) : null);
    return { points: p, size: out, file };
  } catch (e) {
    file.close();
    if (file.path) { try { unlinkSync(file.path); } catch { /* ignore */ } }
    throw e;
  } finally {
    inf.close();
  }
}

/** Load the cached index for `key`, if there is a valid one. */
export function loadIndex(store: { dir: string | null; key: string }, compressedEnd: number): BuildResult | null {
  if (!store.dir) return null;
  const r = IndexFile.load(join(store.dir, `${store.key}.zidx`), store.key, compressedEnd);
  return r && { points: r.points, size: r.size, file: r.file };
}

/** Inflates one span between access points. */
class SpanStream implements SegmentStream {
  private readonly inf: RawInflate;
  private readonly input = new Uint8Array(256 * 1024);
  private at: number;
  private bufPos = 0;
  private bufLen = 0;
  private left: number;
  private ended = false;
  /** Reads stop here: a little past where the next access point's data starts. */
  private readonly limit: number;

  constructor(private readonly src: DeflateSource, i: number, len: number) {
    const p = src.points;
    this.at = p.inPos[i]!;
    this.limit = Math.min(src.end, (i + 1 < p.inPos.length ? p.inPos[i + 1]! : src.end) + SLACK);
    // The span's compressed bytes are made local at once (one fetch), before any state is made.
    const from = Math.max(0, this.at - 1);
    ensure(src.input, from, this.limit - from);
    this.inf = src.inflater();
    this.left = len;
    try {
      this.resume(i);
    } catch (e) {
      src.release(this.inf);
      throw e;
    }
  }

  /** Put the inflater in the state it had at access point i: leftover bits, then the history. */
  private resume(i: number): void {
    const src = this.src;
    const p = src.points;
    const bits = p.bits[i]!;
    if (bits > 0) {
      const b = new Uint8Array(1);
      if (readIn(src.input, b, 0, 1, this.at - 1) !== 1) throw new DeflateError("truncated at an access point");
      this.inf.prime(bits, b[0]! >> (8 - bits));
    }
    const wl = p.winLen[i]!;
    if (wl !== 0) {
      const w = src.scratchWindow();
      if (wl < 0) w.fill(0, 0, -wl);
      else src.index.window(p.winAt[i]!, wl, w);
      this.inf.setDictionary(w, Math.abs(wl));
    }
  }

  read(buf: Uint8Array, off: number, len: number): number {
    const want = Math.min(len, this.left);
    if (want === 0) return 0;
    for (;;) {
      if (this.at >= this.bufPos + this.bufLen) {
        this.bufPos = this.at;
        this.bufLen = readIn(this.src.input, this.input, 0, Math.min(this.input.length, Math.max(0, this.limit - this.at)), this.at);
      }
      const avail = this.bufPos + this.bufLen - this.at;
      const r = this.inf.run(this.input, this.at - this.bufPos, avail, buf, off, want, Z_NO_FLUSH);
      this.at += this.inf.inUsed;
      const n = this.inf.outMade;
      this.left -= n;
      if (r === Z_STREAM_END) this.ended = true;
      else if (r < 0 && r !== Z_BUF_ERROR) throw new DeflateError(`${this.inf.message(r)} near byte ${this.at}`);
      if (n > 0) return n;
      if (this.ended) throw new DeflateError(`stream ends ${this.left} bytes early`);
      if (avail === 0) throw new DeflateError(`truncated at byte ${this.at}`);
    }
  }

  finish(): void { /* CRCs were checked when the index was built */ }
  close(): void { this.src.release(this.inf); }
}

/** The seekable view of deflate data through its index. */
export class DeflateSource implements SegmentSource {
  readonly starts: Float64Array;
  private spare: RawInflate | null = null;
  private win = new Uint8Array(WINDOW);

  constructor(readonly label: string, readonly input: Input, readonly end: number, readonly points: Points,
    readonly size: number, readonly index: IndexFile, private readonly onClose: () => Maybe) {
    this.starts = Float64Array.from(points.out);
  }

  open(segment: number): SegmentStream {
    const len = (segment + 1 < this.starts.length ? this.starts[segment + 1]! : this.size) - this.starts[segment]!;
    return new SpanStream(this, segment, len);
  }

  inflater(): RawInflate {
    const s = this.spare;
    if (s) { this.spare = null; s.reset(); return s; }
    return new RawInflate();
  }
  release(inf: RawInflate): void {
    if (this.spare === null) this.spare = inf; else inf.close();
  }
  scratchWindow(): Uint8Array { return this.win; }

  close(): Maybe {
    this.spare?.close();
    this.spare = null;
    this.index.close();
    return this.onClose();
  }
}
