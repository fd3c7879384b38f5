// What the overlay says about guest ranges (cold paths): a walk over L1/L2 as runs of one kind, and
// from it base:allocation extents (overlay data, zeros, the base's own data and holes),
// qemu:allocation-depth extents, and the changed ranges that diff, info and commit use.
import { EXTENT_HOLE, EXTENT_ZERO, REQ_ONE, isPromise, type ExtentSink, type Maybe } from "../types.ts";
import type { BaseImage } from "./base.ts";
import { HI_OFFSET_MASK, LO_OFFSET_MASK, LO_ZERO, TWO32 } from "./format.ts";
import { K_BASE, K_DATA, K_ZERO, type L2Tables } from "./tables.ts";

export type WalkFn = (kind: number, start: number, len: number, host: number) => boolean;

/** Visit [offset, offset+length) (clipped to `size`) as runs of one kind; stop when fn returns false. */
export function walk(t2: L2Tables, size: number, offset: number, length: number, fn: WalkFn): void {
  const cs = t2.cs;
  const sc = t2.sc;
  const entries = t2.entries;
  const end = Math.min(offset + length, size);
  let pos = offset;
  while (pos < end) {
    const c = Math.floor(pos / cs);
    const l1i = Math.floor(c / entries);
    if (!t2.l1[l1i]) {
      // a whole unallocated L2 range
      const stop = Math.min(end, (l1i + 1) * entries * cs);
      if (!fn(K_BASE, pos, stop - pos, 0)) return;
      pos = stop;
      continue;
    }
    const t = t2.table(l1i)!;
    const inC = pos - c * cs;
    const n = Math.min(cs - inC, end - pos);
    const i = c - l1i * entries;
    if (!t2.extendedL2) {
      const hi = t.dv.getUint32(i * 8);
      const lo = t.dv.getUint32(i * 8 + 4);
      const host = (hi & HI_OFFSET_MASK) * TWO32 + ((lo & LO_OFFSET_MASK) >>> 0);
      const kind = lo & LO_ZERO ? K_ZERO : host !== 0 ? K_DATA : K_BASE;
      if (!fn(kind, pos, n, kind === K_DATA ? host + inC : 0)) return;
    } else {
      const hi = t.dv.getUint32(i * 16);
      const lo = t.dv.getUint32(i * 16 + 4);
      const zero = t.dv.getUint32(i * 16 + 8);
      const alloc = t.dv.getUint32(i * 16 + 12);
      const host = (hi & HI_OFFSET_MASK) * TWO32 + ((lo & LO_OFFSET_MASK) >>> 0);
      let p = inC;
      while (p < inC + n) {
        const j = Math.floor(p / sc);
        const e = Math.min((j + 1) * sc, inC + n);
        const kind = (alloc >>> j) & 1 ? K_DATA : (zero >>> j) & 1 ? K_ZERO : K_BASE;
        if (!fn(kind, c * cs + p, e - p, kind === K_DATA ? host + p : 0)) return;
        p = e;
      }
    }
    pos += n;
  }
}

/** Ranges the overlay changes, merged: data (overlay bytes) or zero. */
export function changedRanges(t2: L2Tables, size: number): { offset: number; length: number; kind: "data" | "zero" }[] {
  const out: { offset: number; length: number; kind: "data" | "zero" }[] = [];
  walk(t2, size, 0, size, (kind, start, len) => {
    if (kind === K_BASE) return true;
    const k = kind === K_DATA ? "data" : "zero";
    const last = out[out.length - 1];
    if (last !== undefined && last.kind === k && last.offset + last.length === start) last.length += len;
    else out.push({ offset: start, length: len, kind: k });
    return true;
  });
  return out;
}

/**
 * base:allocation: overlay data is data, zeroed ranges hole+zero, the rest as the base has it. When
 * the base answers asynchronously, the remaining runs are queued and reported in order after it.
 */
export function allocationExtents(t2: L2Tables, base: BaseImage, size: number, offset: number, length: number,
  flags: number, sink: ExtentSink): Maybe {
  let curType = -1;
  let curStart = offset;
  let curLen = 0;
  let more = true;
  const add = (start: number, len: number, type: number) => {
    if (type === curType && start === curStart + curLen) { curLen += len; return; }
    if (curType !== -1) more = sink.add(curStart, curLen, curType) && !(flags & REQ_ONE);
    curType = type; curStart = start; curLen = len;
  };
  let waiting: Promise<unknown> | null = null;
  const queued: number[] = []; // kind, start, len triples after the base went asynchronous
  walk(t2, size, offset, length, (kind, start, len) => {
    if (waiting !== null) { queued.push(kind, start, len); return true; }
    if (kind === K_DATA) add(start, len, 0);
    else if (kind === K_ZERO) add(start, len, EXTENT_HOLE | EXTENT_ZERO);
    else {
      const r = base.extents(start, len, add);
      if (isPromise(r)) waiting = r;
    }
    return more;
  });
  const end = () => { if (more && curType !== -1) sink.add(curStart, curLen, curType); };
  if (waiting === null) { end(); return; }
  return (async () => {
    await waiting;
    for (let k = 0; k < queued.length && more; k += 3) {
      const kind = queued[k]!;
      const start = queued[k + 1]!;
      const len = queued[k + 2]!;
      if (kind === K_DATA) add(start, len, 0);
      else if (kind === K_ZERO) add(start, len, EXTENT_HOLE | EXTENT_ZERO);
      else await base.extents(start, len, add);
    }
    end();
  })();
}

/** qemu:allocation-depth: 1 where the overlay holds the range (data or zero), 2 where the base does. */
export function depthExtents(t2: L2Tables, size: number, offset: number, length: number, flags: number, sink: ExtentSink): void {
  let curType = -1;
  let curStart = offset;
  let curLen = 0;
  let more = true;
  walk(t2, size, offset, length, (kind, start, len) => {
    const type = kind === K_BASE ? 2 : 1;
    if (type === curType) { curLen += len; return more; }
    if (curType !== -1) more = sink.add(curStart, curLen, curType) && !(flags & REQ_ONE);
    curType = type; curStart = start; curLen = len;
    return more;
  });
  if (more && curType !== -1) sink.add(curStart, curLen, curType);
}
