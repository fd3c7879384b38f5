// The guest read path (hot path): each request resolved per cluster or subcluster into overlay
// data, zeros or the base, coalesced into runs (one file read per run). Base reads may complete
// later (an asynchronous device): they are collected and settled together.
import type { Maybe } from "../types.ts";
import { settleAll, type BaseImage } from "./base.ts";
import type { ImageFile } from "./file.ts";
import { HI_OFFSET_MASK, LO_OFFSET_MASK, LO_ZERO, TWO32 } from "./format.ts";
import { K_BASE, K_DATA, K_NONE, K_ZERO, type L2Tables } from "./tables.ts";

export class ReadPath {
  private readonly cs: number;
  private readonly sc: number;
  private readonly l2Entries: number;
  private readonly extendedL2: boolean;
  private readonly l1: Float64Array;
  private readonly none = new Uint8Array(0);
  // The coalescing run of the current read (fields, not closures: hot path).
  private runKind = K_NONE;
  private runOff = 0;
  private runLen = 0;
  private runPos = 0;
  private runBuf: Uint8Array;
  /** Base reads still in flight in the current read() call. */
  private readPending: Promise<unknown>[] | null = null;

  constructor(private readonly file: ImageFile, private readonly base: BaseImage, private readonly tables: L2Tables) {
    this.cs = tables.cs;
    this.sc = tables.sc;
    this.l2Entries = tables.entries;
    this.extendedL2 = tables.extendedL2;
    this.l1 = tables.l1;
    this.runBuf = this.none;
  }

  read(buf: Uint8Array, offset: number): Maybe {
    this.runBuf = buf;
    this.runKind = K_NONE; // (a read that threw may have left a run
    this.readPending = null; // and pending base reads behind)
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
    this.runBuf = this.none;
    const pending = this.readPending;
    if (pending === null) return;
    this.readPending = null;
    return settleAll(pending);
  }

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
    else if (kind === K_BASE) {
      const r = this.base.read(this.runBuf, this.runOff, this.runLen, this.runPos);
      if (r !== undefined) (this.readPending ??= []).push(r);
    } else this.runBuf.fill(0, this.runOff, this.runOff + this.runLen);
  }
}
