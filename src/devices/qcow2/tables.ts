// The L1 table and the cache of L2 tables: loading and checking tables, entry setters that record
// what flush must write (dirty entry ranges, brand-new tables, changed L1 entries), and a size
// bound that evicts clean tables only.
import type { ImageFile } from "./file.ts";
import {
  HI_COMPRESSED, HI_COPIED, HI_OFFSET_MASK, INCOMPAT_EXTL2, LO_OFFSET_MASK, LO_ZERO, MAX_FILE_OFFSET, Qcow2Error, TWO32,
  type Header,
} from "./format.ts";

// Kinds of a run of guest bytes
export const K_NONE = 0;
export const K_DATA = 1; // in the overlay file
export const K_BASE = 2; // unallocated: from the base
export const K_ZERO = 3; // zero flag / zero bits

export interface L2Table {
  l1i: number;
  host: number;
  buf: Uint8Array;
  dv: DataView;
  /** Not on disk yet: written whole in flush phase 1. */
  isNew: boolean;
  /** Dirty entry range (inclusive), -1 when clean. */
  dirtyLo: number;
  dirtyHi: number;
  /** In `dirty`, the list flush takes. */
  queued: boolean;
}

export class L2Tables {
  readonly extendedL2: boolean;
  /** Cluster and subcluster size (equal without extended L2 entries). */
  readonly cs: number;
  readonly sc: number;
  /** Entries per L2 table. */
  readonly entries: number;
  /** Host offset of each L2 table by L1 index, 0 = unallocated. Filled in place, never replaced. */
  readonly l1: Float64Array;
  /** Cached L2 tables by L1 index. */
  private readonly l2: (L2Table | undefined)[];
  /** Changed L1 entries (inclusive), -1 when clean. */
  l1DirtyLo = -1;
  l1DirtyHi = -1;
  /** Tables with something for the next flush: new, or with dirty entries. */
  dirty: L2Table[] = [];
  private cached = 0;
  private readonly limit: number;

  /** `flushing` says a flush is in flight: its tables must stay cached so a failure can re-mark them. */
  constructor(private readonly file: ImageFile, private readonly path: string, h: Header, l2CacheBytes: number,
    private readonly flushing: () => boolean) {
    this.extendedL2 = (h.incompatible & INCOMPAT_EXTL2) !== 0;
    this.cs = 2 ** h.clusterBits;
    this.sc = this.extendedL2 ? this.cs / 32 : this.cs;
    this.entries = this.cs / (this.extendedL2 ? 16 : 8);
    this.limit = l2CacheBytes;
    const need = Math.ceil(h.size / (this.cs * this.entries));
    if (h.l1Size < need) throw new Qcow2Error(path, `L1 table has ${h.l1Size} entries, ${need} needed for ${h.size} bytes (corrupt image)`);
    const l1raw = new Uint8Array(h.l1Size * 8);
    file.read(l1raw, 0, l1raw.length, h.l1Offset);
    const l1v = new DataView(l1raw.buffer);
    this.l1 = new Float64Array(h.l1Size);
    for (let i = 0; i < h.l1Size; i++) {
      const hi = l1v.getUint32(i * 8);
      const lo = l1v.getUint32(i * 8 + 4);
      const off = (hi & HI_OFFSET_MASK) * TWO32 + ((lo & LO_OFFSET_MASK) >>> 0);
      if (off % this.cs !== 0) throw new Qcow2Error(path, `L1 entry ${i} points at unaligned offset 0x${off.toString(16)} (corrupt image)`);
      if (off > MAX_FILE_OFFSET) throw new Qcow2Error(path, `L1 entry ${i} points beyond any possible file offset (corrupt image)`);
      this.l1[i] = off;
    }
    this.l2 = new Array(h.l1Size).fill(undefined);
  }

  /** The L2 table for L1 index l1i, read (and checked) on a cache miss; undefined if unallocated. */
  table(l1i: number): L2Table | undefined {
    const t = this.l2[l1i];
    if (t !== undefined) return t;
    const host = this.l1[l1i]!;
    if (host === 0) return undefined;
    const buf = new Uint8Array(this.cs);
    this.file.read(buf, 0, this.cs, host);
    const nt: L2Table = { l1i, host, buf, dv: new DataView(buf.buffer), isNew: false, dirtyLo: -1, dirtyHi: -1, queued: false };
    this.checkTable(nt);
    this.evictIfNeeded();
    this.l2[l1i] = nt;
    this.cached++;
    return nt;
  }

  /** Refuse entries this implementation cannot serve (compressed clusters, corrupt entries). */
  private checkTable(t: L2Table): void {
    const step = this.extendedL2 ? 16 : 8;
    for (let e = 0; e < this.cs; e += step) {
      const hi = t.dv.getUint32(e);
      const lo = t.dv.getUint32(e + 4);
      if (hi === 0 && lo === 0) continue;
      if (hi & HI_COMPRESSED) {
        throw new Qcow2Error(this.path, "unsupported qcow2 feature: compressed clusters (decompress with qemu-img convert)", "compressed clusters");
      }
      const host = (hi & HI_OFFSET_MASK) * TWO32 + ((lo & LO_OFFSET_MASK) >>> 0);
      if (host % this.cs !== 0) throw new Qcow2Error(this.path, `L2 table at 0x${t.host.toString(16)} has an unaligned cluster offset 0x${host.toString(16)} (corrupt image)`);
      if (host > MAX_FILE_OFFSET) throw new Qcow2Error(this.path, `L2 table at 0x${t.host.toString(16)} points beyond any possible file offset (corrupt image)`);
      if (this.extendedL2) {
        if (lo & LO_ZERO) throw new Qcow2Error(this.path, "extended L2 entry with the standard zero flag set (corrupt image)");
        const zero = t.dv.getUint32(e + 8);
        const alloc = t.dv.getUint32(e + 12);
        if ((zero & alloc) !== 0) throw new Qcow2Error(this.path, "extended L2 entry with subclusters both allocated and zero (corrupt image)");
        if (alloc !== 0 && host === 0) throw new Qcow2Error(this.path, "extended L2 entry with allocated subclusters but no cluster (corrupt image)");
      }
    }
  }

  private evictIfNeeded(): void {
    if ((this.cached + 1) * this.cs <= this.limit || this.flushing()) return;
    // Evict clean tables only; a table whose entries are being flushed counts as dirty (flushing).
    for (let k = 0; k < this.l2.length && (this.cached + 1) * this.cs > this.limit; k++) {
      const t = this.l2[k];
      if (t !== undefined && !t.isNew && t.dirtyLo === -1) {
        this.l2[k] = undefined;
        this.cached--;
      }
    }
  }

  /** Hook a brand-new, empty L2 table at the freshly allocated cluster `host` into L1 index l1i. */
  newTable(l1i: number, host: number): L2Table {
    const buf = new Uint8Array(this.cs);
    const t: L2Table = { l1i, host, buf, dv: new DataView(buf.buffer), isNew: true, dirtyLo: -1, dirtyHi: -1, queued: false };
    this.l2[l1i] = t;
    this.cached++;
    this.l1[l1i] = host;
    this.remarkL1(l1i, l1i);
    t.queued = true;
    this.dirty.push(t);
    return t;
  }

  /** Set standard entry i: host cluster (0 = none), COPIED when there is one, and the zero flag. */
  setStd(t: L2Table, i: number, host: number, zero: boolean): void {
    const hi = host !== 0 ? (HI_COPIED | Math.floor(host / TWO32)) >>> 0 : 0;
    t.dv.setUint32(i * 8, hi);
    t.dv.setUint32(i * 8 + 4, ((host >>> 0) | (zero ? LO_ZERO : 0)) >>> 0);
    this.markL2(t, i);
  }

  /** Set extended entry i: host cluster, zero bits and allocation bits. */
  setExt(t: L2Table, i: number, host: number, zero: number, alloc: number): void {
    const e = i * 16;
    t.dv.setUint32(e, host !== 0 ? (HI_COPIED | Math.floor(host / TWO32)) >>> 0 : 0);
    t.dv.setUint32(e + 4, host >>> 0);
    t.dv.setUint32(e + 8, zero);
    t.dv.setUint32(e + 12, alloc);
    this.markL2(t, i);
  }

  private markL2(t: L2Table, i: number): void {
    if (t.dirtyLo === -1 || i < t.dirtyLo) t.dirtyLo = i;
    if (i > t.dirtyHi) t.dirtyHi = i;
    this.requeue(t);
  }

  // ---- for flush: hand over what is dirty, take it back if writing it failed ----------------------

  /** The dirty tables, leaving the list empty (their ranges are cleared by the caller). */
  takeDirty(): L2Table[] {
    const d = this.dirty;
    this.dirty = [];
    return d;
  }

  remarkL2(t: L2Table, lo: number, hi: number): void {
    this.markL2(t, lo);
    this.markL2(t, hi);
  }

  requeue(t: L2Table): void {
    if (!t.queued) { t.queued = true; this.dirty.push(t); }
  }

  remarkL1(lo: number, hi: number): void {
    if (this.l1DirtyLo === -1 || lo < this.l1DirtyLo) this.l1DirtyLo = lo;
    if (hi > this.l1DirtyHi) this.l1DirtyHi = hi;
  }

  /** After L1 was cleared on disk (reset): forget every cached table and pending change. */
  forgetAll(): void {
    this.l2.fill(undefined);
    this.cached = 0;
    this.dirty = [];
    this.l1DirtyLo = this.l1DirtyHi = -1;
  }
}
