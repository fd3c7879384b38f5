// Whole-image maintenance (cold): the consistency scan that counts references to every host
// cluster against the refcounts and repairs leaks (what a crash leaves), and the reset that drops
// every change in an order that a crash can only turn into leaks.
import type { Allocator } from "./allocator.ts";
import type { ImageFile } from "./file.ts";
import { HI_OFFSET_MASK, LO_OFFSET_MASK, TWO32, type Header } from "./format.ts";
import type { L2Tables } from "./tables.ts";

export interface ScanResult {
  /** Clusters with a refcount above their number of references (repairable). */
  leaks: number;
  /** Clusters with a refcount below their number of references, and other corruptions. */
  errors: string[];
  /** Referenced data clusters (guest data held by the overlay). */
  dataClusters: number;
  /** Host clusters the image file spans. */
  fileClusters: number;
  repaired: number;
}

/**
 * Count references to every host cluster and compare them with the refcounts. With `repair`,
 * leaked clusters (refcount above references) are freed and the refcount blocks synced. Throws
 * Qcow2Error for unsupported content (compressed clusters).
 */
export function scan(file: ImageFile, header: Header, tables: L2Tables, alloc: Allocator, repair: boolean): ScanResult {
  const cs = tables.cs;
  const fileClusters = Math.ceil(file.size() / cs);
  const n = Math.max(fileClusters, alloc.usedEnd());
  const errors: string[] = [];
  // References past the file (and past every refcount) are corrupt: reported, not counted, so a
  // hostile offset cannot make the scan allocate or loop over clusters that do not exist.
  const refs = new Uint16Array(n + 1);
  const ref = (off: number, count: number, what: string) => {
    for (let k = 0; k < count; k++) {
      const c = off / cs + k;
      if (c >= n) {
        if (errors.length < 100) errors.push(`${what} at cluster ${c} lies past the end of the file`);
        return;
      }
      if (refs[c]! < 0xffff) refs[c]!++;
    }
  };
  const l1 = tables.l1;
  ref(0, 1, "header");
  ref(header.refcountTableOffset, header.refcountTableClusters, "refcount table");
  for (let ti = 0; ti < alloc.rt.length; ti++) if (alloc.rt[ti]) ref(alloc.rt[ti]!, 1, "refcount block");
  ref(header.l1Offset, Math.max(1, Math.ceil((l1.length * 8) / cs)), "L1 table");
  let dataClusters = 0;
  const es = tables.extendedL2 ? 16 : 8;
  for (let l1i = 0; l1i < l1.length; l1i++) {
    if (!l1[l1i]) continue;
    ref(l1[l1i]!, 1, "L2 table");
    const t = tables.table(l1i)!;
    for (let e = 0; e < cs; e += es) {
      const hi = t.dv.getUint32(e);
      const lo = t.dv.getUint32(e + 4);
      const host = (hi & HI_OFFSET_MASK) * TWO32 + ((lo & LO_OFFSET_MASK) >>> 0);
      if (host !== 0) { ref(host, 1, "data cluster"); dataClusters++; }
    }
  }
  let leaks = 0;
  let repaired = 0;
  for (let c = 0; c < Math.max(n, refs.length); c++) {
    const r = c < refs.length ? refs[c]! : 0;
    const rc = alloc.refcount(c);
    if (rc < r) { if (errors.length < 100) errors.push(`cluster ${c}: refcount ${rc}, referenced ${r} times`); }
    else if (rc > r) {
      leaks++;
      if (repair) { alloc.setRefcount(c, r); repaired++; }
    }
  }
  if (repaired > 0) {
    alloc.commitNow();
    alloc.rewind();
  }
  return { leaks, errors, dataClusters, fileClusters, repaired };
}

/**
 * Drop every change: L1 entries cleared and synced first, then the refcounts of everything but
 * the header, refcount structures and L1 table, synced; then the file is truncated. A crash in
 * between can only leak clusters.
 */
export function discardAll(file: ImageFile, header: Header, tables: L2Tables, alloc: Allocator): void {
  const l1 = tables.l1;
  l1.fill(0);
  file.writeAll(new Uint8Array(l1.length * 8), header.l1Offset);
  file.syncNow();
  tables.forgetAll();
  const cs = tables.cs;
  const keep = new Set<number>();
  keep.add(0);
  for (let k = 0; k < header.refcountTableClusters; k++) keep.add(header.refcountTableOffset / cs + k);
  for (let ti = 0; ti < alloc.rt.length; ti++) if (alloc.rt[ti]) keep.add(alloc.rt[ti]! / cs);
  const l1Clusters = Math.max(1, Math.ceil((l1.length * 8) / cs));
  for (let k = 0; k < l1Clusters; k++) keep.add(header.l1Offset / cs + k);
  for (let ti = 0; ti < alloc.rb.length; ti++) {
    const b = alloc.rb[ti];
    if (b === undefined) continue;
    for (let k = 0; k < alloc.entries; k++) {
      const c = ti * alloc.entries + k;
      if (b.dv.getUint16(k * 2) !== 0 && !keep.has(c)) alloc.setRefcount(c, 0);
    }
  }
  alloc.commitNow();
  let last = 0;
  for (const c of keep) last = Math.max(last, c);
  // like qemu-img create: a trailing L1 table occupies only l1_size * 8 bytes
  const endOff = last === header.l1Offset / cs + l1Clusters - 1
    ? header.l1Offset + l1.length * 8
    : (last + 1) * cs;
  if (file.size() > endOff) {
    file.truncate(endOff);
    file.syncNow();
  }
  alloc.rewind();
}
