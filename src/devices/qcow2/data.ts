// Guest data paths (the hot path): reads resolved per cluster or subcluster (overlay data, zeros or
// the base) and coalesced into runs; copy-on-write writes into newly allocated clusters; write
// zeroes and trim through zero flags or zero bits.
import { FAST_ZERO, MAY_TRIM } from "../types.ts";
import { enotsup } from "../../protocol/errors.ts";
import type { Allocator } from "./allocator.ts";
import type { BaseImage } from "./base.ts";
import type { ImageFile } from "./file.ts";
import { HI_OFFSET_MASK, LO_OFFSET_MASK, LO_ZERO, TWO32 } from "./format.ts";
import { K_BASE, K_DATA, K_NONE, K_ZERO, type L2Table, type L2Tables } from "./tables.ts";

/**
 * I/O is synchronous (readSync/writeSync on page-cached files). That also serialises allocation: a
 * write runs from lookup to L2 update without yielding, so two writes into the same unallocated
 * cluster (from any connection) can never interleave. If data I/O is ever made asynchronous,
 * allocation needs a per-cluster lock (see the concurrency test), and the run state below one
 * instance per request.
 */
export class DataPath {
  private readonly cs: number;
  private readonly sc: number;
  private readonly l2Entries: number;
  private readonly extendedL2: boolean;
  private readonly l1: Float64Array;
  private readonly scratch: Uint8Array;
  private readonly zeros: Uint8Array;
  // The coalescing run of the current read or write (fields, not closures: hot path).
  private runKind = K_NONE;
  private runOff = 0;
  private runLen = 0;
  private runPos = 0;
  private runBuf: Uint8Array;

  constructor(private readonly file: ImageFile, private readonly base: BaseImage, private readonly tables: L2Tables,
    private readonly alloc: Allocator, private readonly virtualSize: number) {
    this.cs = tables.cs;
    this.sc = tables.sc;
    this.l2Entries = tables.entries;
    this.extendedL2 = tables.extendedL2;
    this.l1 = tables.l1;
    this.scratch = new Uint8Array(this.cs);
    this.zeros = new Uint8Array(this.cs);
    this.runBuf = this.zeros;
  }

  read(buf: Uint8Array, offset: number): void {
    this.runBuf = buf;
    const cs = this.cs;
    const end = buf.length;
    let pos = offset;
    let bo = 0;
    while (bo < end) {
      const c = Math.floor(pos / cs);
      const inC = pos - c * cs;
      const n = Math.min(cs - inC, end - bo);
      const l1i = Math.floor(c / this.l2Entries);
      const t = this.l1[l1i] ? this.tables.table(l1i) : undefined;
      if (t === undefined) {
        this.emitRead(K_BASE, bo, n, pos);
      } else if (!this.extendedL2) {
        const i = (c - l1i * this.l2Entries) * 8;
        const hi = t.dv.getUint32(i);
        const lo = t.dv.getUint32(i + 4);
        const host = (hi & HI_OFFSET_MASK) * TWO32 + ((lo & LO_OFFSET_MASK) >>> 0);
        if (lo & LO_ZERO) this.emitRead(K_ZERO, bo, n, 0);
        else if (host !== 0) this.emitRead(K_DATA, bo, n, host + inC);
        else this.emitRead(K_BASE, bo, n, pos);
      } else {
        const i = (c - l1i * this.l2Entries) * 16;
        const hi = t.dv.getUint32(i);
        const lo = t.dv.getUint32(i + 4);
        const zero = t.dv.getUint32(i + 8);
        const alloc = t.dv.getUint32(i + 12);
        const host = (hi & HI_OFFSET_MASK) * TWO32 + ((lo & LO_OFFSET_MASK) >>> 0);
        if (alloc === 0 && zero === 0) this.emitRead(K_BASE, bo, n, pos);
        else if (alloc === 0xffffffff) this.emitRead(K_DATA, bo, n, host + inC);
        else if (zero === 0xffffffff) this.emitRead(K_ZERO, bo, n, 0);
        else {
          const sc = this.sc;
          let p = inC;
          const stop = inC + n;
          while (p < stop) {
            const j = Math.floor(p / sc);
            const e = Math.min((j + 1) * sc, stop);
            const o = bo + (p - inC);
            if ((alloc >>> j) & 1) this.emitRead(K_DATA, o, e - p, host + p);
            else if ((zero >>> j) & 1) this.emitRead(K_ZERO, o, e - p, 0);
            else this.emitRead(K_BASE, o, e - p, c * cs + p);
            p = e;
          }
        }
      }
      pos += n;
      bo += n;
    }
    this.endRead();
    this.runBuf = this.zeros;
  }

  write(buf: Uint8Array, offset: number): void {
    this.writeRange(buf, 0, buf.length, offset);
  }

  /** Make [offset, offset+length) read as zeros (MAY_TRIM: and give the space back); FUA is the caller's. */
  zero(offset: number, length: number, flags: number): void {
    const end = offset + length;
    if (flags & FAST_ZERO) {
      // Fast only if no partially covered unit needs zero data written.
      const u = this.sc;
      const vEnd = this.virtualSize;
      const headPartial = offset % u !== 0 || (end - offset < u && end !== vEnd);
      const tailPartial = end % u !== 0 && end !== vEnd;
      if ((headPartial && !this.zeroFlagged(offset)) || (tailPartial && !this.zeroFlagged(end - 1))) {
        throw enotsup("fast zero: the range starts or ends inside a cluster that would need zero data written");
      }
    }
    const cs = this.cs;
    let pos = offset;
    while (pos < end) {
      const c = Math.floor(pos / cs);
      const inC = pos - c * cs;
      const n = Math.min(cs - inC, end - pos);
      const l1i = Math.floor(c / this.l2Entries);
      const i = c - l1i * this.l2Entries;
      const tailEnd = pos + n === this.virtualSize; // the clipped last cluster counts as whole
      if (!this.extendedL2) {
        if (inC === 0 && (n === cs || tailEnd)) {
          const t = this.l1[l1i] ? this.tables.table(l1i)! : this.newTable(l1i);
          const hi = t.dv.getUint32(i * 8);
          const lo = t.dv.getUint32(i * 8 + 4);
          if (!(lo & LO_ZERO)) {
            const host = (hi & HI_OFFSET_MASK) * TWO32 + ((lo & LO_OFFSET_MASK) >>> 0);
            this.tables.setStd(t, i, host, true); // keep a preallocated host cluster: no refcount change
            if (host !== 0 && flags & MAY_TRIM) this.punch(host, cs);
          }
        } else if (!this.zeroFlagged(pos)) {
          this.writeZeroData(pos, n);
        }
      } else {
        const sc = this.sc;
        // whole subclusters [j0, j1) get zero bits; partial ends are written as zero data
        const j0 = Math.ceil(inC / sc);
        const j1 = tailEnd ? Math.ceil((inC + n) / sc) : Math.floor((inC + n) / sc);
        let zero = 0;
        if (j1 > j0) {
          const t = this.l1[l1i] ? this.tables.table(l1i)! : this.newTable(l1i);
          const e = i * 16;
          const hi = t.dv.getUint32(e);
          const lo = t.dv.getUint32(e + 4);
          zero = t.dv.getUint32(e + 8);
          const alloc = t.dv.getUint32(e + 12);
          const host = (hi & HI_OFFSET_MASK) * TWO32 + ((lo & LO_OFFSET_MASK) >>> 0);
          const mask = rangeMask(j0, j1 - 1);
          const wasAlloc = (alloc & mask) >>> 0;
          zero = (zero | mask) >>> 0;
          this.tables.setExt(t, i, host, zero, (alloc & ~mask) >>> 0);
          if (wasAlloc !== 0 && flags & MAY_TRIM) this.punch(host + j0 * sc, (j1 - j0) * sc);
        } else if (this.l1[l1i]) {
          zero = this.tables.table(l1i)!.dv.getUint32(i * 16 + 8);
        }
        if (j1 < j0) {
          // the range lies inside one subcluster
          if (!((zero >>> (j1)) & 1)) this.writeZeroData(pos, n);
        } else {
          if (inC < j0 * sc && !((zero >>> (j0 - 1)) & 1)) this.writeZeroData(pos, j0 * sc - inC);
          if (inC + n > j1 * sc && !((zero >>> j1) & 1)) this.writeZeroData(c * cs + j1 * sc, inC + n - j1 * sc);
        }
      }
      pos += n;
    }
  }

  // ---- reads ---------------------------------------------------------------------------------

  private emitRead(kind: number, off: number, len: number, pos: number): void {
    if (kind === this.runKind && off === this.runOff + this.runLen && (kind === K_ZERO || pos === this.runPos + this.runLen)) {
      this.runLen += len;
      return;
    }
    this.endRead();
    this.runKind = kind;
    this.runOff = off;
    this.runLen = len;
    this.runPos = pos;
  }

  private endRead(): void {
    const kind = this.runKind;
    if (kind === K_NONE) return;
    this.runKind = K_NONE;
    if (kind === K_DATA) this.file.read(this.runBuf, this.runOff, this.runLen, this.runPos);
    else if (kind === K_BASE) this.base.read(this.runBuf, this.runOff, this.runLen, this.runPos);
    else this.runBuf.fill(0, this.runOff, this.runOff + this.runLen);
  }

  // ---- writes --------------------------------------------------------------------------------

  /** Write buf[bo, bo+len) at guest offset pos, allocating with copy-on-write. */
  private writeRange(buf: Uint8Array, bo: number, len: number, pos: number): void {
    const cs = this.cs;
    const end = bo + len;
    this.runBuf = buf;
    while (bo < end) {
      const c = Math.floor(pos / cs);
      const inC = pos - c * cs;
      const n = Math.min(cs - inC, end - bo);
      const l1i = Math.floor(c / this.l2Entries);
      const i = c - l1i * this.l2Entries;
      let t = this.l1[l1i] ? this.tables.table(l1i) : undefined;
      if (!this.extendedL2) {
        let host = 0;
        let zero = false;
        if (t !== undefined) {
          const hi = t.dv.getUint32(i * 8);
          const lo = t.dv.getUint32(i * 8 + 4);
          host = (hi & HI_OFFSET_MASK) * TWO32 + ((lo & LO_OFFSET_MASK) >>> 0);
          zero = (lo & LO_ZERO) !== 0;
          if (host !== 0 && !zero) {
            this.emitWrite(bo, n, host + inC);
            pos += n; bo += n;
            continue;
          }
        }
        this.endWrite();
        if (t === undefined) t = this.newTable(l1i);
        // a preallocated zero cluster keeps its host cluster (and refcount)
        // (a failed write below leaks a newly allocated cluster: the place for a rollback)
        if (host === 0) host = this.alloc.alloc();
        if (n === cs) {
          this.file.write(buf, bo, n, host);
        } else {
          const s = this.scratch;
          if (zero) s.fill(0);
          else this.base.read(s, 0, cs, c * cs);
          s.set(buf.subarray(bo, bo + n), inC);
          this.file.write(s, 0, cs, host);
        }
        this.tables.setStd(t, i, host, false);
      } else {
        const e = i * 16;
        let host = 0;
        let zero = 0;
        let alloc = 0;
        const sc = this.sc;
        const j0 = Math.floor(inC / sc);
        const j1 = Math.floor((inC + n - 1) / sc);
        const mask = rangeMask(j0, j1);
        if (t !== undefined) {
          const hi = t.dv.getUint32(e);
          const lo = t.dv.getUint32(e + 4);
          zero = t.dv.getUint32(e + 8);
          alloc = t.dv.getUint32(e + 12);
          host = (hi & HI_OFFSET_MASK) * TWO32 + ((lo & LO_OFFSET_MASK) >>> 0);
          if (((alloc & mask) >>> 0) === mask) {
            this.emitWrite(bo, n, host + inC);
            pos += n; bo += n;
            continue;
          }
        }
        this.endWrite();
        if (t === undefined) t = this.newTable(l1i);
        // (as above: a failed write below leaks a newly allocated cluster)
        if (host === 0) host = this.alloc.alloc();
        const from = inC;
        const to = inC + n;
        let first = from;
        let last = to;
        const s = this.scratch;
        const headPartial = from % sc !== 0 && !((alloc >>> j0) & 1);
        const tailPartial = to % sc !== 0 && !((alloc >>> j1) & 1);
        if (j0 === j1 && (headPartial || tailPartial)) {
          this.fillSubcluster(s, c, j0, zero);
          s.set(buf.subarray(bo, bo + n), from - j0 * sc);
          this.file.write(s, 0, sc, host + j0 * sc);
          first = last = to;
        } else {
          if (headPartial) {
            this.fillSubcluster(s, c, j0, zero);
            const k = (j0 + 1) * sc - from;
            s.set(buf.subarray(bo, bo + k), from - j0 * sc);
            this.file.write(s, 0, sc, host + j0 * sc);
            first = (j0 + 1) * sc;
          }
          if (tailPartial) {
            this.fillSubcluster(s, c, j1, zero);
            const k = to - j1 * sc;
            s.set(buf.subarray(bo + (j1 * sc - from), bo + n), 0);
            this.file.write(s, 0, sc, host + j1 * sc);
            last = j1 * sc;
          }
        }
        if (last > first) this.file.write(buf, bo + (first - from), last - first, host + first);
        this.tables.setExt(t, i, host, (zero & ~mask) >>> 0, (alloc | mask) >>> 0);
      }
      pos += n;
      bo += n;
    }
    this.endWrite();
    this.runBuf = this.zeros;
  }

  private newTable(l1i: number): L2Table {
    return this.tables.newTable(l1i, this.alloc.alloc());
  }

  /** Fill scratch with what subcluster j of guest cluster c reads as before it is allocated. */
  private fillSubcluster(s: Uint8Array, c: number, j: number, zeroBits: number): void {
    if ((zeroBits >>> j) & 1) s.fill(0, 0, this.sc);
    else this.base.read(s, 0, this.sc, c * this.cs + j * this.sc);
  }

  private emitWrite(off: number, len: number, host: number): void {
    if (this.runKind === K_DATA && off === this.runOff + this.runLen && host === this.runPos + this.runLen) {
      this.runLen += len;
      return;
    }
    this.endWrite();
    this.runKind = K_DATA;
    this.runOff = off;
    this.runLen = len;
    this.runPos = host;
  }

  private endWrite(): void {
    if (this.runKind === K_NONE) return;
    this.runKind = K_NONE;
    this.file.write(this.runBuf, this.runOff, this.runLen, this.runPos);
  }

  private writeZeroData(pos: number, len: number): void {
    const saved = this.runBuf;
    for (let done = 0; done < len;) {
      const n = Math.min(len - done, this.zeros.length);
      this.writeRange(this.zeros, 0, n, pos + done);
      done += n;
    }
    this.runBuf = saved;
  }

  /** Is the unit (cluster or subcluster) holding guest byte `pos` zero-flagged? */
  private zeroFlagged(pos: number): boolean {
    const c = Math.floor(pos / this.cs);
    const inC = pos - c * this.cs;
    const l1i = Math.floor(c / this.l2Entries);
    if (!this.l1[l1i]) return false;
    const t = this.tables.table(l1i)!;
    const i = c - l1i * this.l2Entries;
    if (!this.extendedL2) return (t.dv.getUint32(i * 8 + 4) & LO_ZERO) !== 0;
    return ((t.dv.getUint32(i * 16 + 8) >>> Math.floor(inC / this.sc)) & 1) === 1;
  }

  private punch(host: number, len: number): void {
    try {
      this.file.punch(host, len);
    } catch {
      // space reclamation is optional: the zero flags already make the range read as zeros
    }
  }
}

/** Bits j0..j1 (inclusive) of a 32-bit subcluster bitmap. */
function rangeMask(j0: number, j1: number): number {
  return (2 ** (j1 + 1) - 2 ** j0) >>> 0;
}
