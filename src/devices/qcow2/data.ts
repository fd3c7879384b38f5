// The guest write paths (hot path): copy-on-write into newly allocated clusters, in-place writes
// coalesced into runs, write zeroes and trim through zero flags or bits. A copy-on-write that waits
// for an asynchronous base holds its cluster (serial.ts). Reads are in read.ts.
import { FAST_ZERO, MAY_TRIM, type Maybe } from "../types.ts";
import { enotsup } from "../../protocol/errors.ts";
import type { Allocator } from "./allocator.ts";
import { settleAll, type BaseImage } from "./base.ts";
import type { ImageFile } from "./file.ts";
import { HI_OFFSET_MASK, LO_OFFSET_MASK, LO_ZERO, TWO32 } from "./format.ts";
import { ClusterLocks } from "./serial.ts";
import { K_DATA, K_NONE, type L2Table, type L2Tables } from "./tables.ts";

/**
 * Overlay file I/O is synchronous (writeSync on page-cached files), and so are reads of a raw base:
 * then a write runs from lookup to L2 update without yielding, which serialises allocation. A base
 * read may return a Promise (an asynchronous device): a copy-on-write that must wait for base bytes
 * holds its guest cluster (ClusterLocks) from before its base read until its data and L2 entry are
 * in place, and any write or zero reaching a held cluster runs after it, looking at the entry
 * afresh. Reads take no lock: until the L2 entry changes they see the base, after it the new data.
 * The coalescing run state below is only used within one synchronous call; code that runs after
 * an await ("direct") writes straight to the file.
 */
export class WritePath {
  private readonly cs: number;
  private readonly sc: number;
  private readonly l2Entries: number;
  private readonly extendedL2: boolean;
  private readonly l1: Float64Array;
  /** Base bytes for a copy-on-write (replaced when a base read keeps it busy). */
  private scratch: Uint8Array;
  private readonly zeros: Uint8Array;
  readonly locks = new ClusterLocks();
  // The coalescing run of the current write (fields, not closures: hot path).
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

  write(buf: Uint8Array, offset: number): Maybe {
    const cs = this.cs;
    const end = buf.length;
    let pending: Promise<void>[] | null = null;
    let pos = offset;
    let bo = 0;
    this.runKind = K_NONE; // (a write that threw may have left a run behind)
    this.runBuf = buf;
    while (bo < end) {
      const c = Math.floor(pos / cs);
      const inC = pos - c * cs;
      const n = Math.min(cs - inC, end - bo);
      if (this.locks.held(c)) {
        (pending ??= []).push(this.writeAfter(buf, bo, n, pos, c, inC));
      } else {
        const r = this.writeCluster(buf, bo, n, pos, c, inC, false);
        if (r !== undefined) (pending ??= []).push(this.locks.hold(c, r));
      }
      pos += n;
      bo += n;
    }
    this.endWrite();
    this.runBuf = this.zeros;
    return pending === null ? undefined : settleAll(pending);
  }

  /** Make [offset, offset+length) read as zeros (MAY_TRIM: and give the space back); FUA is the caller's. */
  zero(offset: number, length: number, flags: number): Maybe {
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
    let pending: Promise<void>[] | null = null;
    let pos = offset;
    while (pos < end) {
      const c = Math.floor(pos / cs);
      const n = Math.min(cs - (pos - c * cs), end - pos);
      if (this.locks.held(c)) {
        (pending ??= []).push(this.zeroAfter(pos, n, c, flags));
      } else {
        const r = this.zeroCluster(pos, n, c, flags, false);
        if (r !== undefined) (pending ??= []).push(this.locks.hold(c, r));
      }
      pos += n;
    }
    return pending === null ? undefined : settleAll(pending);
  }

  // ---- writes --------------------------------------------------------------------------------

  /**
   * Write buf[bo, bo+n) at guest offset pos, inside guest cluster c (at inC). Returns a Promise when
   * the copy-on-write waits for base bytes: the caller then holds cluster c until it settles.
   * `direct`: called after an await, so no coalescing run (write straight to the file).
   */
  private writeCluster(buf: Uint8Array, bo: number, n: number, pos: number, c: number, inC: number, direct: boolean): Maybe {
    const l1i = Math.floor(c / this.l2Entries);
    const i = c - l1i * this.l2Entries;
    const t = this.l1[l1i] ? this.tables.table(l1i) : undefined;
    const cs = this.cs;
    if (!this.extendedL2) {
      let zero = false;
      if (t !== undefined) {
        const hi = t.dv.getUint32(i * 8);
        const lo = t.dv.getUint32(i * 8 + 4);
        const host = (hi & HI_OFFSET_MASK) * TWO32 + ((lo & LO_OFFSET_MASK) >>> 0);
        zero = (lo & LO_ZERO) !== 0;
        if (host !== 0 && !zero) {
          if (direct) this.file.write(buf, bo, n, host + inC);
          else this.emitWrite(bo, n, host + inC);
          return;
        }
      }
      if (!direct) this.endWrite();
      const s = this.scratch;
      if (n !== cs) {
        // the rest of the cluster: zeros, or the base's bytes
        if (zero) s.fill(0);
        else {
          const r = this.base.read(s, 0, cs, c * cs);
          if (r !== undefined) {
            this.scratch = new Uint8Array(cs); // s stays with the base read
            return this.finishStdAfter(r, buf, bo, n, c, inC, s);
          }
        }
      }
      this.finishStd(buf, bo, n, c, inC, s, t);
      return;
    }
    const e = i * 16;
    let zero = 0;
    let alloc = 0;
    const sc = this.sc;
    const j0 = Math.floor(inC / sc);
    const j1 = Math.floor((inC + n - 1) / sc);
    const mask = rangeMask(j0, j1);
    if (t !== undefined) {
      zero = t.dv.getUint32(e + 8);
      alloc = t.dv.getUint32(e + 12);
      if (((alloc & mask) >>> 0) === mask) {
        const host = (t.dv.getUint32(e) & HI_OFFSET_MASK) * TWO32 + ((t.dv.getUint32(e + 4) & LO_OFFSET_MASK) >>> 0);
        if (direct) this.file.write(buf, bo, n, host + inC);
        else this.emitWrite(bo, n, host + inC);
        return;
      }
    }
    if (!direct) this.endWrite();
    // Partial subclusters not yet allocated are completed from what they read as before: the head
    // one into s[0, sc), a different tail one into s[sc, 2sc).
    const from = inC;
    const to = inC + n;
    const headPartial = from % sc !== 0 && !((alloc >>> j0) & 1);
    const tailPartial = to % sc !== 0 && !((alloc >>> j1) & 1);
    const s = this.scratch;
    let r1: Maybe = undefined;
    let r2: Maybe = undefined;
    if (headPartial || (j0 === j1 && tailPartial)) r1 = this.fillSubcluster(s, 0, c, j0, zero);
    if (j0 !== j1 && tailPartial) r2 = this.fillSubcluster(s, sc, c, j1, zero);
    if (r1 === undefined && r2 === undefined) {
      this.finishExt(buf, bo, n, c, inC, s, headPartial, tailPartial, t);
      return;
    }
    this.scratch = new Uint8Array(cs); // s stays with the base reads
    const wait = r1 !== undefined && r2 !== undefined ? settleAll([r1, r2]) : (r1 ?? r2)!;
    return this.finishExtAfter(wait, buf, bo, n, c, inC, s, headPartial, tailPartial);
  }

  // Closures live in these small methods only: a closure in the hot methods above would make the
  // JIT keep their variables in a heap scope, allocated on every call even when nothing waits.

  private writeAfter(buf: Uint8Array, bo: number, n: number, pos: number, c: number, inC: number): Promise<void> {
    return this.locks.after(c, () => this.writeCluster(buf, bo, n, pos, c, inC, true));
  }

  private zeroAfter(pos: number, n: number, c: number, flags: number): Promise<void> {
    return this.locks.after(c, () => this.zeroCluster(pos, n, c, flags, true));
  }

  private finishStdAfter(r: Promise<void>, buf: Uint8Array, bo: number, n: number, c: number, inC: number, s: Uint8Array): Promise<void> {
    return r.then(() => this.finishStd(buf, bo, n, c, inC, s, undefined));
  }

  private finishExtAfter(r: Promise<void>, buf: Uint8Array, bo: number, n: number, c: number, inC: number, s: Uint8Array,
    headPartial: boolean, tailPartial: boolean): Promise<void> {
    return r.then(() => this.finishExt(buf, bo, n, c, inC, s, headPartial, tailPartial, undefined));
  }

  private zeroDataAfter(r: Promise<void>, pos: number, len: number, c: number): Promise<void> {
    return r.then(() => this.zeroData(pos, len, c, true));
  }

  /**
   * The L2 table for guest cluster c, made if missing. After an await it is looked up afresh (pass
   * undefined): another write may have made it, or it may have been evicted and reread.
   */
  private tableFor(c: number, t?: L2Table): L2Table {
    if (t !== undefined) return t;
    const l1i = Math.floor(c / this.l2Entries);
    return this.l1[l1i] ? this.tables.table(l1i)! : this.newTable(l1i);
  }

  /**
   * A new L2 table for L1 index l1i. Its cluster is written with zeros now, although the table
   * itself is written at the next flush: a full disk then fails this request (giving the cluster
   * back) instead of a later flush, which would leave refcounts on disk without the table.
   */
  private newTable(l1i: number): L2Table {
    const host = this.alloc.alloc();
    try {
      this.file.write(this.zeros, 0, this.cs, host);
    } catch (e) {
      this.alloc.free(host);
      throw e;
    }
    return this.tables.newTable(l1i, host);
  }

  /** Standard L2: allocate (or reuse a preallocated zero cluster), write the whole cluster, link it. */
  private finishStd(buf: Uint8Array, bo: number, n: number, c: number, inC: number, s: Uint8Array, known: L2Table | undefined): void {
    const t = this.tableFor(c, known);
    const i = c - Math.floor(c / this.l2Entries) * this.l2Entries;
    // a preallocated zero cluster keeps its host cluster (and refcount); a fresh one is given back
    // if writing it fails (a full disk), so that nothing leaks
    let host = (t.dv.getUint32(i * 8) & HI_OFFSET_MASK) * TWO32 + ((t.dv.getUint32(i * 8 + 4) & LO_OFFSET_MASK) >>> 0);
    const fresh = host === 0;
    if (fresh) host = this.alloc.alloc();
    try {
      if (n === this.cs) {
        this.file.write(buf, bo, n, host);
      } else {
        s.set(buf.subarray(bo, bo + n), inC);
        this.file.write(s, 0, this.cs, host);
      }
    } catch (e) {
      if (fresh) this.alloc.free(host);
      throw e;
    }
    this.tables.setStd(t, i, host, false);
  }

  /** Extended L2: allocate the host cluster if needed, write the touched subclusters, set their bits. */
  private finishExt(buf: Uint8Array, bo: number, n: number, c: number, inC: number, s: Uint8Array,
    headPartial: boolean, tailPartial: boolean, known: L2Table | undefined): void {
    const t = this.tableFor(c, known);
    const e = (c - Math.floor(c / this.l2Entries) * this.l2Entries) * 16;
    let host = (t.dv.getUint32(e) & HI_OFFSET_MASK) * TWO32 + ((t.dv.getUint32(e + 4) & LO_OFFSET_MASK) >>> 0);
    const zero = t.dv.getUint32(e + 8);
    const alloc = t.dv.getUint32(e + 12);
    // (as above: a fresh cluster is given back if writing fails)
    const fresh = host === 0;
    if (fresh) host = this.alloc.alloc();
    const sc = this.sc;
    const from = inC;
    const to = inC + n;
    const j0 = Math.floor(from / sc);
    const j1 = Math.floor((to - 1) / sc);
    let first = from;
    let last = to;
    try {
      if (j0 === j1 && (headPartial || tailPartial)) {
        s.set(buf.subarray(bo, bo + n), from - j0 * sc);
        this.file.write(s, 0, sc, host + j0 * sc);
        first = last = to;
      } else {
        if (headPartial) {
          const k = (j0 + 1) * sc - from;
          s.set(buf.subarray(bo, bo + k), from - j0 * sc);
          this.file.write(s, 0, sc, host + j0 * sc);
          first = (j0 + 1) * sc;
        }
        if (tailPartial) {
          s.set(buf.subarray(bo + (j1 * sc - from), bo + n), sc);
          this.file.write(s, sc, sc, host + j1 * sc);
          last = j1 * sc;
        }
      }
      if (last > first) this.file.write(buf, bo + (first - from), last - first, host + first);
    } catch (err) {
      if (fresh) this.alloc.free(host);
      throw err;
    }
    const mask = rangeMask(j0, j1);
    this.tables.setExt(t, e / 16, host, (zero & ~mask) >>> 0, (alloc | mask) >>> 0);
  }

  /** Fill s[at, at+sc) with what subcluster j of guest cluster c reads as before it is allocated. */
  private fillSubcluster(s: Uint8Array, at: number, c: number, j: number, zeroBits: number): Maybe {
    if ((zeroBits >>> j) & 1) s.fill(0, at, at + this.sc);
    else return this.base.read(s, at, this.sc, c * this.cs + j * this.sc);
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

  // ---- write zeroes --------------------------------------------------------------------------

  /** Zero [pos, pos+n) inside guest cluster c: zero flags or bits for whole units, zero data for partial ones. */
  private zeroCluster(pos: number, n: number, c: number, flags: number, direct: boolean): Maybe {
    const cs = this.cs;
    const inC = pos - c * cs;
    const l1i = Math.floor(c / this.l2Entries);
    const i = c - l1i * this.l2Entries;
    const tailEnd = pos + n === this.virtualSize; // the clipped last cluster counts as whole
    if (!this.extendedL2) {
      if (inC === 0 && (n === cs || tailEnd)) {
        const t = this.tableFor(c);
        const hi = t.dv.getUint32(i * 8);
        const lo = t.dv.getUint32(i * 8 + 4);
        if (!(lo & LO_ZERO)) {
          const host = (hi & HI_OFFSET_MASK) * TWO32 + ((lo & LO_OFFSET_MASK) >>> 0);
          this.tables.setStd(t, i, host, true); // keep a preallocated host cluster: no refcount change
          if (host !== 0 && flags & MAY_TRIM) this.punch(host, cs);
        }
        return;
      }
      if (!this.zeroFlagged(pos)) return this.zeroData(pos, n, c, direct);
      return;
    }
    const sc = this.sc;
    // whole subclusters [j0, j1) get zero bits; partial ends are written as zero data
    const j0 = Math.ceil(inC / sc);
    const j1 = tailEnd ? Math.ceil((inC + n) / sc) : Math.floor((inC + n) / sc);
    let zero = 0;
    if (j1 > j0) {
      const t = this.tableFor(c);
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
      if (!((zero >>> j1) & 1)) return this.zeroData(pos, n, c, direct);
      return;
    }
    const head = inC < j0 * sc && !((zero >>> (j0 - 1)) & 1);
    const tail = inC + n > j1 * sc && !((zero >>> j1) & 1);
    const r = head ? this.zeroData(pos, j0 * sc - inC, c, direct) : undefined;
    if (!tail) return r;
    const tailPos = c * cs + j1 * sc;
    const tailLen = inC + n - j1 * sc;
    // the tail waits for the head when that went asynchronous (both change cluster c)
    if (r !== undefined) return this.zeroDataAfter(r, tailPos, tailLen, c);
    return this.zeroData(tailPos, tailLen, c, direct);
  }

  /** Write zero data over [pos, pos+len) inside guest cluster c. */
  private zeroData(pos: number, len: number, c: number, direct: boolean): Maybe {
    const inC = pos - c * this.cs;
    if (direct) return this.writeCluster(this.zeros, 0, len, pos, c, inC, true);
    const saved = this.runBuf;
    this.runBuf = this.zeros;
    const r = this.writeCluster(this.zeros, 0, len, pos, c, inC, false);
    this.endWrite();
    this.runBuf = saved;
    return r;
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
