// The dynamic VHD plugin (read-only; writes go through an overlay): the Block Allocation Table maps
// each block of the disk to a sector in the file, or to nothing (reads as zeros). Each allocated
// block starts with a sector bitmap (most significant bit first, one bit per 512-byte sector):
// sectors whose bit is clear read as zeros. Bitmaps that are all ones (what QEMU and Hyper-V write
// for a block they allocate) are remembered as one flag, others are kept in a small cache.
import { closeSync, readSync } from "node:fs";
import { caps, type BlockDevice, type BlockSize, type Capabilities, EXTENT_HOLE, EXTENT_ZERO, type ExtentSink } from "../types.ts";

/** Damaged or missing image data: logged by the server as an error (not a client mistake), answered with EIO. */
function damaged(msg: string): Error {
  return Object.assign(new Error(msg), { code: "EIO" });
}

const UNALLOCATED = 0xffffffff;
const SECTOR = 512;
const READ_ONLY: Capabilities = Object.freeze(caps({ canWrite: false, canFlush: false, canExtents: true, canMultiConn: true }));
const BITMAP_CACHE = 1024;

export interface DynamicLayout {
  size: number;
  blockSize: number;
  /** Sector of each block in the file, or 0xffffffff. */
  bat: Uint32Array;
  /** Bytes of the sector bitmap before each block's data (a multiple of 512). */
  bitmapBytes: number;
}

export class DynamicVhd implements BlockDevice {
  private readonly sectorsPerBlock: number;
  /** Per block: 0 bitmap not read yet, 1 all ones, 2 partial (in `bitmaps`). */
  private readonly state: Uint8Array;
  private readonly bitmaps = new Map<number, Uint8Array>();
  private closed = false;

  constructor(readonly label: string, private readonly fd: number, private readonly l: DynamicLayout) {
    this.sectorsPerBlock = l.blockSize / SECTOR;
    this.state = new Uint8Array(l.bat.length);
  }

  size(): number { return this.l.size; }
  blockSize(): BlockSize { return { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 }; }
  capabilities(): Capabilities { return READ_ONLY; }

  private readFull(buf: Uint8Array, off: number, len: number, pos: number): void {
    let done = 0;
    while (done < len) {
      const n = readSync(this.fd, buf, off + done, len - done, pos + done);
      if (n === 0) throw damaged(`${this.label}: file ends at byte ${pos + done} inside a data block (truncated?)`);
      done += n;
    }
  }

  /** The bitmap of block b, or null when every sector is present. */
  private bitmap(b: number): Uint8Array | null {
    const s = this.state[b]!;
    if (s === 1) return null;
    if (s === 2) {
      const hit = this.bitmaps.get(b);
      if (hit) return hit;
    }
    const bm = new Uint8Array(this.l.bitmapBytes);
    this.readFull(bm, 0, bm.length, this.l.bat[b]! * SECTOR);
    const need = this.sectorsPerBlock >> 3;
    let full = true;
    for (let i = 0; i < need; i++) if (bm[i] !== 0xff) { full = false; break; }
    if (full) { this.state[b] = 1; return null; }
    this.state[b] = 2;
    if (this.bitmaps.size >= BITMAP_CACHE) this.bitmaps.delete(this.bitmaps.keys().next().value!);
    this.bitmaps.set(b, bm);
    return bm;
  }

  pread(buf: Uint8Array, offset: number, _flags: number): void {
    const bs = this.l.blockSize;
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const b = Math.floor(pos / bs);
      const within = pos - b * bs;
      const n = Math.min(bs - within, buf.length - done);
      const entry = this.l.bat[b]!;
      if (entry === UNALLOCATED) {
        buf.fill(0, done, done + n);
      } else {
        const data = entry * SECTOR + this.l.bitmapBytes;
        const bm = this.bitmap(b);
        if (!bm) this.readFull(buf, done, n, data + within);
        else this.readMasked(buf, done, n, data, within, bm);
      }
      done += n;
    }
  }

  /** Read [within, within+n) of a block whose bitmap is partial: runs of present sectors, zeros elsewhere. */
  private readMasked(buf: Uint8Array, off: number, n: number, data: number, within: number, bm: Uint8Array): void {
    let p = within;
    const end = within + n;
    while (p < end) {
      const sec = Math.floor(p / SECTOR);
      const present = (bm[sec >> 3]! & (0x80 >> (sec & 7))) !== 0;
      let q = (sec + 1) * SECTOR;
      while (q < end) {
        const s2 = q / SECTOR;
        if (((bm[s2 >> 3]! & (0x80 >> (s2 & 7))) !== 0) !== present) break;
        q += SECTOR;
      }
      if (q > end) q = end;
      if (present) this.readFull(buf, off + (p - within), q - p, data + p);
      else buf.fill(0, off + (p - within), off + (q - within));
      p = q;
    }
  }

  extents(offset: number, length: number, _flags: number, sink: ExtentSink): void {
    const bs = this.l.blockSize;
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const b = Math.floor(pos / bs);
      const blockEnd = Math.min(end, (b + 1) * bs);
      if (this.l.bat[b] === UNALLOCATED) {
        if (!sink.add(pos, blockEnd - pos, EXTENT_HOLE | EXTENT_ZERO)) return;
      } else {
        const bm = this.bitmap(b);
        if (!bm) {
          if (!sink.add(pos, blockEnd - pos, 0)) return;
        } else {
          for (let p = pos; p < blockEnd;) {
            const sec = Math.floor((p - b * bs) / SECTOR);
            const q = Math.min(blockEnd, b * bs + (sec + 1) * SECTOR);
            const present = (bm[sec >> 3]! & (0x80 >> (sec & 7))) !== 0;
            if (!sink.add(p, q - p, present ? 0 : EXTENT_HOLE | EXTENT_ZERO)) return;
            p = q;
          }
        }
      }
      pos = blockEnd;
    }
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    closeSync(this.fd);
  }
}
