// The crash-safe flush: dirty metadata goes to disk in two phases so that a crash can only leak
// clusters, never leave a reference to something not yet durable; one flush runs at a time, and
// callers that arrive during it share the next one.
import type { Allocator } from "./allocator.ts";
import type { ImageFile } from "./file.ts";
import { HI_COPIED, TWO32 } from "./format.ts";
import type { L2Tables } from "./tables.ts";

interface PendingWrite {
  pos: number;
  data: Uint8Array;
  /** What to mark dirty again if the flush fails. */
  redo: () => void;
}

/**
 * The ordering:
 *   phase 1: refcount blocks and brand-new (still unreachable) L2 tables -> fdatasync
 *   phase 2: changed L2 entries and L1 entries -> fdatasync
 * Guest data is written in place at write time, so phase 1's fdatasync also makes it durable
 * before anything points at it, and no refcount is ever lower than its number of durable
 * references. New refcount blocks are committed when they are made (see Allocator). On failure
 * every range not known durable is marked dirty again, for the next flush.
 */
export class Flusher {
  private running: Promise<void> | null = null;
  private queued: Promise<void> | null = null;

  constructor(private readonly file: ImageFile, private readonly tables: L2Tables, private readonly alloc: Allocator,
    private readonly l1Offset: number, private readonly path: string, private readonly log: (msg: string) => void,
    /** Throws when an earlier sync or write failed: then nothing more may be written (fsyncgate). */
    private readonly refuseIfFailed: () => void) {}

  /** A flush is in flight (it holds the dirty state it took; cached tables must stay). */
  get busy(): boolean {
    return this.running !== null;
  }

  flush(): Promise<void> {
    if (this.running === null) return (this.running = this.runFlush());
    if (this.queued === null) {
      this.queued = this.running.then(noop, noop).then(() => {
        this.queued = null;
        return (this.running = this.runFlush());
      });
    }
    return this.queued;
  }

  private async runFlush(): Promise<void> {
    try {
      await this.flushNow();
    } finally {
      this.running = null;
    }
  }

  private async flushNow(): Promise<void> {
    this.refuseIfFailed();
    const phase1: PendingWrite[] = [];
    const phase2: PendingWrite[] = [];
    const { tables, alloc } = this;
    for (const b of alloc.takeDirty()) {
      const lo = b.dirtyLo;
      const hi = b.dirtyHi;
      b.queued = false; b.dirtyLo = -1; b.dirtyHi = -1;
      if (lo === -1) continue;
      phase1.push({ pos: b.host + lo * 2, data: b.buf.slice(lo * 2, (hi + 1) * 2), redo: () => alloc.remark(b, lo, hi) });
    }
    const es = tables.extendedL2 ? 16 : 8;
    for (const t of tables.takeDirty()) {
      const lo = t.dirtyLo;
      const hi = t.dirtyHi;
      t.queued = false; t.dirtyLo = -1; t.dirtyHi = -1;
      if (t.isNew) {
        t.isNew = false;
        phase1.push({ pos: t.host, data: t.buf.slice(), redo: () => { t.isNew = true; tables.requeue(t); } });
      } else if (lo !== -1) {
        phase2.push({ pos: t.host + lo * es, data: t.buf.slice(lo * es, (hi + 1) * es), redo: () => tables.remarkL2(t, lo, hi) });
      }
    }
    if (tables.l1DirtyLo !== -1) {
      const lo = tables.l1DirtyLo;
      const hi = tables.l1DirtyHi;
      tables.l1DirtyLo = tables.l1DirtyHi = -1;
      const data = new Uint8Array((hi - lo + 1) * 8);
      const dv = new DataView(data.buffer);
      for (let k = lo; k <= hi; k++) {
        const off = tables.l1[k]!;
        if (off !== 0) { dv.setUint32((k - lo) * 8, (HI_COPIED | Math.floor(off / TWO32)) >>> 0); dv.setUint32((k - lo) * 8 + 4, off >>> 0); }
      }
      phase2.push({ pos: this.l1Offset + lo * 8, data, redo: () => tables.remarkL1(lo, hi) });
    }
    let stage = 1;
    try {
      if (phase1.length > 0 || phase2.length > 0) {
        for (const w of phase1) this.file.writeAll(w.data, w.pos);
        await this.file.sync();
      }
      stage = 2;
      for (const w of phase2) this.file.writeAll(w.data, w.pos);
      await this.file.sync();
    } catch (err) {
      if (stage === 1) for (const w of phase1) w.redo();
      for (const w of phase2) w.redo();
      this.log(`overlay ${this.path}: flush failed: ${(err as Error).message}`);
      throw err;
    }
  }
}

function noop(): void {}
