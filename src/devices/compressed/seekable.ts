// Random access to a compressed image, whatever the format: the image is cut into segments that
// can each be decoded from their start (xz Blocks, or the spans between a zran index's access
// points). A segment is decoded once, on first read, into a sparse, unlinked spill file; every
// later read of it is a plain file read (or sendfile: fileRange). Pages of zeros are left as holes in
// the spill file, so block status reports them and large reads send them as holes, not bytes (an
// undecoded range is reported as data). Segments up to FULL_SEGMENT are
// decoded whole, so their integrity check is verified before a byte is served; larger ones (a
// single-block xz file) are decoded progressively by a cursor kept open between reads.
import { closeSync, fstatSync, ftruncateSync, openSync, readSync, unlinkSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { haveLibc } from "../../sys/libc.ts";
import { seekExtents } from "../file.ts";
import { NotLocal, whenLocal } from "../staged.ts";
import { caps, type BlockDevice, type BlockSize, type Capabilities, type ExtentSink, type FileRange, type Maybe } from "../types.ts";

/** Damaged or missing image data: logged by the server as an error (not a client mistake), answered with EIO. */
function damaged(msg: string): Error {
  return Object.assign(new Error(msg), { code: "EIO" });
}

/** Segments at most this long are decoded whole on first touch. */
export const FULL_SEGMENT = 64 * 1024 * 1024;
/** A cursor over a larger segment decodes at least this much past what a read needs. */
const STEP = 4 * 1024 * 1024;
const STAGE = 1024 * 1024;
const MAX_CURSORS = 2;
/**
 * Fetches one read may wait for (compressed input not local yet: a remote object). Each makes
 * progress (a cursor keeps what it decoded), so a read deep into a large progressive segment may
 * need many.
 */
const FETCHES = 4096;

/** Decodes one segment from its start, in order. */
export interface SegmentStream {
  /** Up to `len` bytes of output into buf[off..]; returns how many (0 only at the segment's end). Throws on corrupt data. */
  read(buf: Uint8Array, off: number, len: number): number;
  /** Called once the segment's last byte was read: verify what follows (integrity check), throw if bad. */
  finish(): void;
  close(): void;
}

/** The format side: segment layout and a way to decode each. */
export interface SegmentSource {
  /** What it is, for messages ("disk.img.xz"). */
  readonly label: string;
  readonly size: number;
  /** Uncompressed start of each segment, increasing, starts[0] = 0. */
  readonly starts: Float64Array;
  /** Throws NotLocal (before any state is made) when its compressed bytes must be fetched first. */
  open(segment: number): SegmentStream;
  close(): Maybe;
}

/** An unlinked temporary file that holds decoded bytes at their uncompressed offsets. */
export class SpillFile {
  readonly fd: number;
  constructor(label: string) {
    const dir = process.env.TMPDIR || tmpdir();
    const path = join(dir, `bun-nbd-decoded-${process.pid}-${Math.random().toString(36).slice(2, 10)}`);
    try {
      this.fd = openSync(path, "wx+", 0o600);
    } catch (e) {
      throw new Error(`${label}: cannot create a temporary file in ${dir} for decoded data: ${(e as Error).message}`);
    }
    unlinkSync(path);
  }
  write(buf: Uint8Array, off: number, len: number, pos: number): void {
    let done = 0;
    while (done < len) done += writeSync(this.fd, buf, off + done, len - done, pos + done);
  }
  /**
   * Like write(), but whole pages (PAGE bytes at a multiple of PAGE in the file) of zeros are not
   * written: they stay holes, which read as zeros. Rewriting a range writes the same pages again.
   */
  writeSparse(buf: Uint8Array, off: number, len: number, pos: number): void {
    let run = 0; // start of the bytes not written yet
    for (let p = (PAGE - (pos % PAGE)) % PAGE; p + PAGE <= len; p += PAGE) {
      if (!isZeroPage(buf, off + p)) continue;
      if (p > run) this.write(buf, off + run, p - run, pos + run);
      run = p + PAGE;
    }
    if (len > run) this.write(buf, off + run, len - run, pos + run);
  }
  /** Make the file `size` bytes long (a hole at the end), so every offset below reads. */
  extend(size: number): void {
    if (fstatSync(this.fd).size < size) ftruncateSync(this.fd, size);
  }
  close(): void { closeSync(this.fd); }
}

const PAGE = 4096;
const ZERO_PAGE = Buffer.alloc(PAGE);
function isZeroPage(buf: Uint8Array, at: number): boolean {
  return ZERO_PAGE.compare(buf, at, at + PAGE) === 0; // memcmp, not a loop in JS
}

interface Cursor { segment: number; stream: SegmentStream; pos: number }

const READ_ONLY: Capabilities = Object.freeze(caps({ canWrite: false, canFlush: false, canCache: true, canExtents: haveLibc, canMultiConn: true }));

/** A read-only block device over a SegmentSource, decoding into a spill file. */
export class DecompressedDevice implements BlockDevice {
  private readonly n: number;
  private readonly starts: Float64Array;
  /** Bytes of each segment decoded (from its start) and present in the spill file. */
  private readonly done: Float64Array;
  private readonly bad: (string | undefined)[];
  private readonly stage = new Uint8Array(STAGE);
  private cursors: Cursor[] = [];
  private closed = false;

  constructor(private readonly src: SegmentSource, private readonly spill: SpillFile, opts: { decoded?: boolean } = {}) {
    this.starts = src.starts;
    this.n = src.starts.length;
    this.done = new Float64Array(this.n);
    this.bad = new Array(this.n);
    if (opts.decoded) for (let i = 0; i < this.n; i++) this.done[i] = this.segLen(i);
    spill.extend(src.size); // pages of zeros at the end are holes past what was written
  }

  size(): number { return this.src.size; }
  blockSize(): BlockSize { return { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 }; }
  capabilities(): Capabilities { return READ_ONLY; }

  private segLen(i: number): number {
    return (i + 1 < this.n ? this.starts[i + 1]! : this.src.size) - this.starts[i]!;
  }

  /** The segment holding byte `pos` (binary search). */
  private segmentAt(pos: number): number {
    const s = this.starts;
    let lo = 0, hi = this.n - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (s[mid]! <= pos) lo = mid; else hi = mid - 1;
    }
    return lo;
  }

  /** True if every byte of [offset, offset+length) is in the spill file. */
  private present(offset: number, length: number, fill: boolean): boolean {
    const end = offset + length;
    for (let i = this.segmentAt(offset); i < this.n && this.starts[i]! < end; i++) {
      const need = Math.min(end, this.starts[i]! + this.segLen(i)) - this.starts[i]!;
      if (this.done[i]! >= need) continue;
      if (!fill) return false;
      this.fill(i, need);
    }
    return true;
  }

  fileRange(offset: number, length: number, out: FileRange): boolean {
    if (!this.present(offset, length, false)) return false;
    out.fd = this.spill.fd;
    out.offset = offset;
    return true;
  }

  pread(buf: Uint8Array, offset: number, _flags: number): Maybe {
    if (buf.length === 0) return;
    if (!this.present(offset, buf.length, false)) {
      const r = this.decode(offset, buf.length);
      if (r) return r.then(() => this.copy(buf, offset));
    }
    this.copy(buf, offset);
  }

  /** Decode what [offset, offset+length) needs; a Promise when compressed bytes must be fetched first. */
  private decode(offset: number, length: number): Maybe {
    return whenLocal(() => { this.present(offset, length, true); }, FETCHES);
  }

  private copy(buf: Uint8Array, offset: number): void {
    let done = 0;
    while (done < buf.length) {
      const r = readSync(this.spill.fd, buf, done, buf.length - done, offset + done);
      if (r === 0) throw damaged(`${this.src.label}: decoded data missing at ${offset + done}`);
      done += r;
    }
  }

  cache(offset: number, length: number): Maybe {
    if (!this.present(offset, length, false)) return this.decode(offset, length);
  }

  /** Decoded ranges: data and holes of the spill file; ranges not decoded yet: data (they may be). */
  extents(offset: number, length: number, _flags: number, sink: ExtentSink): void {
    const end = offset + length;
    const at = { pos: offset };
    while (at.pos < end) {
      const i = this.segmentAt(at.pos);
      const segEnd = Math.min(end, this.starts[i]! + this.segLen(i));
      const decodedEnd = Math.min(segEnd, this.starts[i]! + this.done[i]!);
      if (at.pos < decodedEnd) {
        if (!seekExtents(this.spill.fd, at, decodedEnd, sink)) return; // the sink has enough
      }
      if (at.pos < segEnd) {
        const pos = at.pos;
        at.pos = segEnd;
        if (!sink.add(pos, segEnd - pos, 0)) return;
      }
    }
  }

  /** Decode segment i until at least `need` bytes of it are present. */
  private fill(i: number, need: number): void {
    const bad = this.bad[i];
    if (bad) throw damaged(bad);
    const len = this.segLen(i);
    const whole = len <= FULL_SEGMENT;
    const target = whole ? len : Math.min(len, Math.max(need, this.done[i]! + STEP));
    let c = this.cursors.find((x) => x.segment === i);
    if (!c) {
      let stream: SegmentStream;
      try {
        stream = this.src.open(i); // (a corrupt block header fails here)
      } catch (e) {
        if (e instanceof NotLocal) throw e;
        throw this.markBad(i, e);
      }
      c = { segment: i, stream, pos: 0 };
      if (!whole) this.keep(c);
    }
    const base = this.starts[i]!;
    let got = 0;
    try {
      while (c.pos < target) {
        const want = Math.min(STAGE, target - c.pos);
        got = 0;
        while (got < want) {
          const r = c.stream.read(this.stage, got, want - got);
          if (r === 0) throw new Error(`segment ${i} ended ${len - (c.pos + got)} bytes early`);
          got += r;
        }
        // Rewriting bytes already present (a restarted cursor) writes the same bytes again.
        this.spill.writeSparse(this.stage, 0, got, base + c.pos);
        c.pos += got;
        got = 0;
        if (!whole && c.pos > this.done[i]!) this.done[i] = c.pos;
      }
      if (c.pos === len) {
        c.stream.finish();
        this.drop(c);
      }
      if (whole) this.done[i] = len;
    } catch (e) {
      if (e instanceof NotLocal) {
        // Input not local yet: nothing is wrong. A kept cursor keeps what it decoded (the stream
        // threw before changing state) and goes on from there once the bytes are in; a whole
        // segment's stream is closed below and started again.
        if (!whole && got > 0) {
          this.spill.writeSparse(this.stage, 0, got, base + c.pos);
          c.pos += got;
          if (c.pos > this.done[i]!) this.done[i] = c.pos;
        }
        throw e;
      }
      this.drop(c);
      throw this.markBad(i, e);
    } finally {
      if (whole) { try { c.stream.close(); } catch { /* already failing */ } }
    }
  }

  /** Remembered: a damaged segment fails fast from now on, and other segments are unaffected. */
  private markBad(i: number, e: unknown): Error {
    const base = this.starts[i]!, len = this.segLen(i);
    const msg = `${this.src.label}: bytes ${base}-${base + len - 1} cannot be decoded: ${(e as Error).message}`;
    this.bad[i] = msg;
    return damaged(msg);
  }

  private keep(c: Cursor): void {
    this.cursors.push(c);
    while (this.cursors.length > MAX_CURSORS) this.drop(this.cursors[0]!);
  }

  private drop(c: Cursor): void {
    const k = this.cursors.indexOf(c);
    if (k >= 0) {
      this.cursors.splice(k, 1);
      try { c.stream.close(); } catch { /* ignore */ }
    }
  }

  /** Bytes decoded so far (for tests and messages). */
  decodedBytes(): number {
    let t = 0;
    for (let i = 0; i < this.n; i++) t += this.done[i]!;
    return t;
  }

  close(): Maybe {
    if (this.closed) return;
    this.closed = true;
    for (const c of [...this.cursors]) this.drop(c);
    this.spill.close();
    return this.src.close();
  }
}

/** Size of an open file. */
export function fdSize(fd: number): number {
  return fstatSync(fd).size;
}
