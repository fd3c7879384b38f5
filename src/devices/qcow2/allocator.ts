// Host cluster allocation and 16-bit refcounts (a table of refcount blocks). Changed blocks stay
// dirty in memory for flush phase 1; new blocks are hooked up synchronously. While serving,
// refcounts only go 0 -> 1: nothing is freed, so no free cluster is referenced by durable metadata.
import type { ImageFile } from "./file.ts";
import { LO_OFFSET_MASK, Qcow2Error, TWO32, putU64, worstCaseClusters, type Header } from "./format.ts";
import { enospc } from "../../protocol/errors.ts";

export interface RefBlock {
  host: number;
  buf: Uint8Array;
  dv: DataView;
  /** Dirty entry range (inclusive), -1 when clean. */
  dirtyLo: number;
  dirtyHi: number;
  /** In `dirty`, the list flush takes. */
  queued: boolean;
}

export class Allocator {
  /** Refcounts per block. */
  readonly entries: number;
  /** Host offset of each refcount block, 0 = none yet (all its counts are 0). */
  readonly rt: Float64Array;
  readonly rb: (RefBlock | undefined)[];
  /** Blocks with changed counts, for the next flush. */
  dirty: RefBlock[] = [];
  /** Where the search for a free cluster starts: no cluster below it is free. */
  private freeHint = 0;
  private readonly cs: number;

  constructor(private readonly file: ImageFile, private readonly path: string, private readonly header: Header) {
    const cs = this.cs = 2 ** header.clusterBits;
    this.entries = cs / 2;
    const rtBytes = header.refcountTableClusters * cs;
    const fileSize = file.size();
    const rtraw = new Uint8Array(rtBytes);
    file.read(rtraw, 0, rtBytes, header.refcountTableOffset);
    const rtv = new DataView(rtraw.buffer);
    this.rt = new Float64Array(rtBytes / 8);
    for (let i = 0; i < this.rt.length; i++) {
      const off = (rtv.getUint32(i * 8) * TWO32) + ((rtv.getUint32(i * 8 + 4) & LO_OFFSET_MASK) >>> 0);
      if (off % cs !== 0) throw new Qcow2Error(path, `refcount table entry ${i} is unaligned (corrupt image)`);
      // A block past the end of the file was never written: refuse it (reading it would also cost a cluster each).
      if (off !== 0 && off + cs > fileSize) throw new Qcow2Error(path, `refcount table entry ${i} points past the end of the file (corrupt image)`);
      this.rt[i] = off;
    }
    this.rb = new Array(this.rt.length).fill(undefined);
    for (let i = 0; i < this.rt.length; i++) {
      if (this.rt[i] === 0) continue;
      const buf = new Uint8Array(cs);
      file.read(buf, 0, cs, this.rt[i]!);
      this.rb[i] = { host: this.rt[i]!, buf, dv: new DataView(buf.buffer), dirtyLo: -1, dirtyHi: -1, queued: false };
    }
  }

  refcount(c: number): number {
    const ti = Math.floor(c / this.entries);
    const b = ti < this.rb.length ? this.rb[ti] : undefined;
    if (b === undefined) return 0;
    return b.dv.getUint16((c - ti * this.entries) * 2);
  }

  /** Set the count of cluster c (whose block exists) in memory and mark it for the next flush. */
  setRefcount(c: number, v: number): void {
    const ti = Math.floor(c / this.entries);
    const b = this.rb[ti]!;
    const k = c - ti * this.entries;
    b.dv.setUint16(k * 2, v);
    this.remark(b, k, k);
  }

  /**
   * Allocate one host cluster (refcount 0 -> 1 in memory) and return its file offset; free() is
   * the inverse, for a write that fails after allocating.
   */
  alloc(): number {
    for (;;) {
      const c = this.freeHint;
      const ti = Math.floor(c / this.entries);
      if (ti >= this.rt.length) throw enospc(`${this.path}: the refcount table is full`);
      if (this.rb[ti] === undefined) {
        this.newRefBlock(ti, c);
        continue;
      }
      if (this.refcount(c) !== 0) { this.freeHint = c + 1; continue; }
      this.setRefcount(c, 1);
      this.freeHint = c + 1;
      return c * this.cs;
    }
  }

  /**
   * Give back a cluster that alloc() returned to a write that then failed (a full disk): count
   * 1 -> 0, and the next search starts at it again. Nothing references it yet, and since the
   * allocation and the failed write ran in one synchronous step, no flush has written the count 1.
   */
  free(host: number): void {
    const c = host / this.cs;
    this.setRefcount(c, 0);
    if (c < this.freeHint) this.freeHint = c;
  }

  /**
   * Hook up a new refcount block for table entry ti, placed at the free cluster c inside its own
   * range so that it describes itself. Committed synchronously: block, sync, table entry, sync.
   */
  private newRefBlock(ti: number, c: number): void {
    const buf = new Uint8Array(this.cs);
    const dv = new DataView(buf.buffer);
    dv.setUint16((c - ti * this.entries) * 2, 1);
    const host = c * this.cs;
    this.file.writeAll(buf, host);
    this.file.syncNow();
    const ent = new Uint8Array(8);
    putU64(new DataView(ent.buffer), 0, host);
    this.file.writeAll(ent, this.header.refcountTableOffset + ti * 8);
    this.file.syncNow();
    this.rt[ti] = host;
    this.rb[ti] = { host, buf, dv, dirtyLo: -1, dirtyHi: -1, queued: false };
    this.freeHint = c + 1;
  }

  /** Start the next search for a free cluster from the beginning (after counts went down). */
  rewind(): void {
    this.freeHint = 0;
  }

  // ---- for flush: hand over what is dirty, take it back if writing it failed ----------------------

  /** The dirty blocks, leaving the list empty (their ranges are cleared by the caller). */
  takeDirty(): RefBlock[] {
    const d = this.dirty;
    this.dirty = [];
    return d;
  }

  /** Mark entries lo..hi of block b dirty (again). */
  remark(b: RefBlock, lo: number, hi: number): void {
    if (b.dirtyLo === -1 || lo < b.dirtyLo) b.dirtyLo = lo;
    if (hi > b.dirtyHi) b.dirtyHi = hi;
    if (!b.queued) { b.queued = true; this.dirty.push(b); }
  }

  /**
   * Write every dirty block now and sync, outside the two-phase flush: for repairs and resets that
   * only lower counts of clusters nothing durable references any more.
   */
  commitNow(): void {
    for (const b of this.dirty) {
      if (b.dirtyLo !== -1) this.file.writeAll(b.buf.subarray(b.dirtyLo * 2, (b.dirtyHi + 1) * 2), b.host + b.dirtyLo * 2);
      b.dirtyLo = b.dirtyHi = -1;
      b.queued = false;
    }
    this.dirty = [];
    this.file.syncNow();
  }

  /** One past the highest cluster with a nonzero count (0 when none). */
  usedEnd(): number {
    let maxRc = 0;
    for (let ti = 0; ti < this.rb.length; ti++) {
      const b = this.rb[ti];
      if (b === undefined) continue;
      for (let k = this.entries - 1; k >= 0; k--) {
        if (b.dv.getUint16(k * 2) !== 0) { maxRc = Math.max(maxRc, ti * this.entries + k + 1); break; }
      }
    }
    return maxRc;
  }

  /** For read-write opens: refuse images whose refcount table would have to grow. */
  checkCoverage(virtualSize: number, extendedL2: boolean): void {
    const covered = this.rt.length * this.entries;
    const fileClusters = Math.ceil(this.file.size() / this.cs);
    const worst = worstCaseClusters(virtualSize, this.header.clusterBits, extendedL2).total;
    if (covered < Math.max(worst, fileClusters)) {
      throw new Qcow2Error(this.path,
        `unsupported qcow2 feature: refcount table growth (the table covers ${covered} clusters, ` +
        `writing could need ${Math.max(worst, fileClusters)}); convert with qemu-img convert -O qcow2 -o cluster_size=65536`,
        "refcount table growth");
    }
  }
}
