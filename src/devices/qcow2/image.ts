// A qcow2 v3 overlay over a raw base, as a BlockDevice. Reads resolve per cluster (or subcluster,
// with extended L2 entries): overlay data, zeros, or the base. Writes copy-on-write into newly
// allocated clusters; metadata (refcounts, L2 entries, L1 entries) is kept in memory and written by
// flush() in two phases so that a crash can only leak clusters, never corrupt the image:
//   phase 1: refcount blocks and brand-new (still unreachable) L2 tables -> fdatasync
//   phase 2: changed L2 entries and L1 entries -> fdatasync
// Data is written in place at write time, so phase 1's fdatasync also makes it durable before
// anything points at it. Refcounts only ever go 0 -> 1 while serving (nothing is freed), so free
// clusters (refcount 0 on disk and in memory) are never referenced by durable metadata and can be
// reused. New refcount blocks are hooked up synchronously (block, sync, table entry, sync).
//
// I/O is synchronous (readSync/writeSync on page-cached files; fdatasync is asynchronous). That
// also serialises allocation: a write runs from lookup to L2 update without yielding, so two
// writes into the same unallocated cluster (from any connection) can never interleave. If data I/O
// is ever made asynchronous, allocation needs a per-cluster lock (see the concurrency test).
import { closeSync, fdatasync, fdatasyncSync, fstatSync, ftruncateSync, writeSync } from "node:fs";
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate, seekData, seekHole } from "../../sys/libc.ts";
import {
  EXTENT_HOLE, EXTENT_ZERO, FAST_ZERO, FUA, MAY_TRIM, REQ_ONE, caps,
  type BlockDevice, type BlockSize, type Capabilities, type ExtentSink, type Maybe, type MetaContextProvider,
} from "../types.ts";
import { QEMU_ALLOCATION_DEPTH } from "../../protocol/constants.ts";
import { eio, enospc, enotsup } from "../../protocol/errors.ts";
import {
  HI_COMPRESSED, HI_COPIED, HI_OFFSET_MASK, INCOMPAT_EXTL2, LO_OFFSET_MASK, LO_ZERO, Qcow2Error,
  putU64, readFull, worstCaseClusters, writeAll, type Header,
} from "./format.ts";

const TWO32 = 0x100000000;

// Kinds of a run of guest bytes
const K_NONE = 0;
const K_DATA = 1; // in the overlay file
const K_BASE = 2; // unallocated: from the base
const K_ZERO = 3; // zero flag / zero bits

interface L2Table {
  l1i: number;
  host: number;
  buf: Uint8Array;
  dv: DataView;
  /** Not on disk yet: written whole in flush phase 1. */
  isNew: boolean;
  /** Dirty entry range (inclusive), -1 when clean. */
  dirtyLo: number;
  dirtyHi: number;
  queued: boolean;
}

interface RefBlock {
  host: number;
  buf: Uint8Array;
  dv: DataView;
  dirtyLo: number;
  dirtyHi: number;
  queued: boolean;
}

interface PendingWrite {
  pos: number;
  data: Uint8Array;
  /** What to mark dirty again if the flush fails. */
  redo: () => void;
}

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

export interface OverlayImageOptions {
  path: string;
  fd: number;
  header: Header;
  readOnly: boolean;
  baseFd: number;
  baseSize: number;
  log: (msg: string) => void;
  /** Called by close() after the files are closed (locks, temp files). */
  onClose?: () => void;
  /** Bytes of L2 tables kept in memory (default 64 MiB); dirty tables are always kept. */
  l2CacheBytes?: number;
}

export class Qcow2Overlay implements BlockDevice {
  readonly path: string;
  readonly header: Header;
  readonly readOnly: boolean;
  readonly extendedL2: boolean;
  readonly clusterSize: number;
  readonly subclusterSize: number;
  private readonly fd: number;
  private readonly baseFd: number;
  readonly baseSize: number;
  private readonly virtualSize: number;
  private readonly cs: number;
  private readonly sc: number;
  private readonly l2Entries: number;
  private readonly rbEntries: number;
  private readonly l1: Float64Array;
  private readonly l2: (L2Table | undefined)[];
  private rt: Float64Array;
  private readonly rb: (RefBlock | undefined)[];
  private freeHint = 0;
  private l1DirtyLo = -1;
  private l1DirtyHi = -1;
  private dirtyL2: L2Table[] = [];
  private dirtyRb: RefBlock[] = [];
  private readonly scratch: Uint8Array;
  private readonly zeros: Uint8Array;
  private cachedL2 = 0;
  private readonly l2Limit: number;
  private running: Promise<void> | null = null;
  private queued: Promise<void> | null = null;
  private closed = false;
  private readonly log: (msg: string) => void;
  private readonly onClose?: () => void;
  // The coalescing run of the current read or write (fields, not closures: hot path).
  private runKind = K_NONE;
  private runOff = 0;
  private runLen = 0;
  private runPos = 0;
  private runBuf: Uint8Array;

  constructor(o: OverlayImageOptions) {
    const h = o.header;
    this.path = o.path;
    this.header = h;
    this.fd = o.fd;
    this.baseFd = o.baseFd;
    this.baseSize = o.baseSize;
    this.readOnly = o.readOnly;
    this.log = o.log;
    this.onClose = o.onClose;
    this.extendedL2 = (h.incompatible & INCOMPAT_EXTL2) !== 0;
    this.cs = this.clusterSize = 2 ** h.clusterBits;
    this.sc = this.subclusterSize = this.extendedL2 ? this.cs / 32 : this.cs;
    this.l2Entries = this.cs / (this.extendedL2 ? 16 : 8);
    this.rbEntries = this.cs / 2;
    this.virtualSize = h.size;
    this.l2Limit = o.l2CacheBytes ?? 64 * 1024 * 1024;
    this.scratch = new Uint8Array(this.cs);
    this.zeros = new Uint8Array(this.cs);
    this.runBuf = this.zeros;

    const need = Math.ceil(h.size / (this.cs * this.l2Entries));
    if (h.l1Size < need) throw new Qcow2Error(o.path, `L1 table has ${h.l1Size} entries, ${need} needed for ${h.size} bytes (corrupt image)`);
    const l1raw = new Uint8Array(h.l1Size * 8);
    readFull(this.fd, l1raw, 0, l1raw.length, h.l1Offset);
    const l1v = new DataView(l1raw.buffer);
    this.l1 = new Float64Array(h.l1Size);
    for (let i = 0; i < h.l1Size; i++) {
      const hi = l1v.getUint32(i * 8);
      const lo = l1v.getUint32(i * 8 + 4);
      const off = (hi & HI_OFFSET_MASK) * TWO32 + (lo & LO_OFFSET_MASK);
      if (off % this.cs !== 0) throw new Qcow2Error(o.path, `L1 entry ${i} points at unaligned offset 0x${off.toString(16)} (corrupt image)`);
      this.l1[i] = off;
    }
    this.l2 = new Array(h.l1Size).fill(undefined);

    const rtBytes = h.refcountTableClusters * this.cs;
    const rtraw = new Uint8Array(rtBytes);
    readFull(this.fd, rtraw, 0, rtBytes, h.refcountTableOffset);
    const rtv = new DataView(rtraw.buffer);
    this.rt = new Float64Array(rtBytes / 8);
    for (let i = 0; i < this.rt.length; i++) {
      const off = (rtv.getUint32(i * 8) * TWO32) + (rtv.getUint32(i * 8 + 4) & LO_OFFSET_MASK);
      if (off % this.cs !== 0) throw new Qcow2Error(o.path, `refcount table entry ${i} is unaligned (corrupt image)`);
      this.rt[i] = off;
    }
    this.rb = new Array(this.rt.length).fill(undefined);
    for (let i = 0; i < this.rt.length; i++) {
      if (this.rt[i] === 0) continue;
      const buf = new Uint8Array(this.cs);
      readFull(this.fd, buf, 0, this.cs, this.rt[i]!);
      this.rb[i] = { host: this.rt[i]!, buf, dv: new DataView(buf.buffer), dirtyLo: -1, dirtyHi: -1, queued: false };
    }
  }

  // ---- BlockDevice --------------------------------------------------------------------------

  size(): number { return this.virtualSize; }

  blockSize(): BlockSize {
    return { minimum: 1, preferred: Math.max(4096, Math.min(this.sc, 65536)), maximum: 32 * 1024 * 1024 };
  }

  capabilities(): Capabilities {
    const w = !this.readOnly;
    return caps({
      canWrite: w, canFlush: w, canFua: w, canTrim: w, canZero: w, canFastZero: w,
      canCache: true, canExtents: true, canMultiConn: true,
    });
  }

  pread(buf: Uint8Array, offset: number, _flags: number): Maybe {
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
      const t = this.l1[l1i] ? this.table(l1i) : undefined;
      if (t === undefined) {
        this.emitRead(K_BASE, bo, n, pos);
      } else if (!this.extendedL2) {
        const i = (c - l1i * this.l2Entries) * 8;
        const hi = t.dv.getUint32(i);
        const lo = t.dv.getUint32(i + 4);
        const host = (hi & HI_OFFSET_MASK) * TWO32 + (lo & LO_OFFSET_MASK);
        if (lo & LO_ZERO) this.emitRead(K_ZERO, bo, n, 0);
        else if (host !== 0) this.emitRead(K_DATA, bo, n, host + inC);
        else this.emitRead(K_BASE, bo, n, pos);
      } else {
        const i = (c - l1i * this.l2Entries) * 16;
        const hi = t.dv.getUint32(i);
        const lo = t.dv.getUint32(i + 4);
        const zero = t.dv.getUint32(i + 8);
        const alloc = t.dv.getUint32(i + 12);
        const host = (hi & HI_OFFSET_MASK) * TWO32 + (lo & LO_OFFSET_MASK);
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

  pwrite(buf: Uint8Array, offset: number, flags: number): Maybe {
    this.writeRange(buf, 0, buf.length, offset);
    if (flags & FUA) return this.flush(0);
  }

  flush(_flags: number): Promise<void> {
    if (this.running === null) return (this.running = this.runFlush());
    if (this.queued === null) {
      this.queued = this.running.then(noop, noop).then(() => {
        this.queued = null;
        return (this.running = this.runFlush());
      });
    }
    return this.queued;
  }

  trim(offset: number, length: number, flags: number): Maybe {
    // A trimmed range reads as zeros: never let the base's old bytes resurface under a guest
    // filesystem that believes the blocks are free.
    return this.zero(offset, length, (flags & FUA) | MAY_TRIM);
  }

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
          const t = this.l1[l1i] ? this.table(l1i)! : this.newTable(l1i);
          const hi = t.dv.getUint32(i * 8);
          const lo = t.dv.getUint32(i * 8 + 4);
          if (!(lo & LO_ZERO)) {
            const host = (hi & HI_OFFSET_MASK) * TWO32 + (lo & LO_OFFSET_MASK);
            this.setStd(t, i, host, true); // keep a preallocated host cluster: no refcount change
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
          const t = this.l1[l1i] ? this.table(l1i)! : this.newTable(l1i);
          const e = i * 16;
          const hi = t.dv.getUint32(e);
          const lo = t.dv.getUint32(e + 4);
          zero = t.dv.getUint32(e + 8);
          const alloc = t.dv.getUint32(e + 12);
          const host = (hi & HI_OFFSET_MASK) * TWO32 + (lo & LO_OFFSET_MASK);
          const mask = rangeMask(j0, j1 - 1);
          const wasAlloc = (alloc & mask) >>> 0;
          zero = (zero | mask) >>> 0;
          this.setExt(t, i, host, zero, (alloc & ~mask) >>> 0);
          if (wasAlloc !== 0 && flags & MAY_TRIM) this.punch(host + j0 * sc, (j1 - j0) * sc);
        } else if (this.l1[l1i]) {
          zero = this.table(l1i)!.dv.getUint32(i * 16 + 8);
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
    if (flags & FUA) return this.flush(0);
  }

  extents(offset: number, length: number, flags: number, sink: ExtentSink): Maybe {
    let curType = -1;
    let curStart = offset;
    let curLen = 0;
    let more = true;
    const add = (start: number, len: number, type: number) => {
      if (type === curType && start === curStart + curLen) { curLen += len; return; }
      if (curType !== -1) more = sink.add(curStart, curLen, curType) && !(flags & REQ_ONE);
      curType = type; curStart = start; curLen = len;
    };
    this.walk(offset, length, (kind, start, len) => {
      if (kind === K_DATA) add(start, len, 0);
      else if (kind === K_ZERO) add(start, len, EXTENT_HOLE | EXTENT_ZERO);
      else this.baseExtents(start, len, add);
      return more;
    });
    if (more && curType !== -1) sink.add(curStart, curLen, curType);
  }

  cache(offset: number, length: number, _flags: number): Maybe {
    const chunk = new Uint8Array(Math.min(length, 1024 * 1024));
    for (let p = offset; p < offset + length; p += chunk.length) {
      const n = Math.min(chunk.length, offset + length - p);
      this.pread(n === chunk.length ? chunk : chunk.subarray(0, n), p, 0);
    }
  }

  metaContexts(): MetaContextProvider[] {
    return [{
      name: QEMU_ALLOCATION_DEPTH,
      // 1: allocated (data or zero) in the overlay; 2: from the base (the first backing layer).
      extents: (offset, length, flags, sink) => {
        let curType = -1;
        let curStart = offset;
        let curLen = 0;
        let more = true;
        this.walk(offset, length, (kind, start, len) => {
          const type = kind === K_BASE ? 2 : 1;
          if (type === curType) { curLen += len; return more; }
          if (curType !== -1) more = sink.add(curStart, curLen, curType) && !(flags & REQ_ONE);
          curType = type; curStart = start; curLen = len;
          return more;
        });
        if (more && curType !== -1) sink.add(curStart, curLen, curType);
      },
    }];
  }

  async close(): Promise<void> {
    if (this.closed) return;
    if (!this.readOnly) await this.flush(0);
    this.closed = true;
    try {
      closeSync(this.fd);
      closeSync(this.baseFd);
    } finally {
      this.onClose?.();
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
    if (kind === K_DATA) readFull(this.fd, this.runBuf, this.runOff, this.runLen, this.runPos);
    else if (kind === K_BASE) this.readBase(this.runBuf, this.runOff, this.runLen, this.runPos);
    else this.runBuf.fill(0, this.runOff, this.runOff + this.runLen);
  }

  private readBase(buf: Uint8Array, off: number, len: number, pos: number): void {
    const avail = Math.max(0, Math.min(len, this.baseSize - pos));
    if (avail > 0) readFull(this.baseFd, buf, off, avail, pos);
    if (avail < len) buf.fill(0, off + avail, off + len);
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
      let t = this.l1[l1i] ? this.table(l1i) : undefined;
      if (!this.extendedL2) {
        let host = 0;
        let zero = false;
        if (t !== undefined) {
          const hi = t.dv.getUint32(i * 8);
          const lo = t.dv.getUint32(i * 8 + 4);
          host = (hi & HI_OFFSET_MASK) * TWO32 + (lo & LO_OFFSET_MASK);
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
        if (host === 0) host = this.allocCluster();
        if (n === cs) {
          writeRangeAll(this.fd, buf, bo, n, host);
        } else {
          const s = this.scratch;
          if (zero) s.fill(0);
          else this.readBase(s, 0, cs, c * cs);
          s.set(buf.subarray(bo, bo + n), inC);
          writeRangeAll(this.fd, s, 0, cs, host);
        }
        this.setStd(t, i, host, false);
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
          host = (hi & HI_OFFSET_MASK) * TWO32 + (lo & LO_OFFSET_MASK);
          if (((alloc & mask) >>> 0) === mask) {
            this.emitWrite(bo, n, host + inC);
            pos += n; bo += n;
            continue;
          }
        }
        this.endWrite();
        if (t === undefined) t = this.newTable(l1i);
        if (host === 0) host = this.allocCluster();
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
          writeRangeAll(this.fd, s, 0, sc, host + j0 * sc);
          first = last = to;
        } else {
          if (headPartial) {
            this.fillSubcluster(s, c, j0, zero);
            const k = (j0 + 1) * sc - from;
            s.set(buf.subarray(bo, bo + k), from - j0 * sc);
            writeRangeAll(this.fd, s, 0, sc, host + j0 * sc);
            first = (j0 + 1) * sc;
          }
          if (tailPartial) {
            this.fillSubcluster(s, c, j1, zero);
            const k = to - j1 * sc;
            s.set(buf.subarray(bo + (j1 * sc - from), bo + n), 0);
            writeRangeAll(this.fd, s, 0, sc, host + j1 * sc);
            last = j1 * sc;
          }
        }
        if (last > first) writeRangeAll(this.fd, buf, bo + (first - from), last - first, host + first);
        this.setExt(t, i, host, (zero & ~mask) >>> 0, (alloc | mask) >>> 0);
      }
      pos += n;
      bo += n;
    }
    this.endWrite();
    this.runBuf = this.zeros;
  }

  /** Fill scratch with what subcluster j of guest cluster c reads as before it is allocated. */
  private fillSubcluster(s: Uint8Array, c: number, j: number, zeroBits: number): void {
    if ((zeroBits >>> j) & 1) s.fill(0, 0, this.sc);
    else this.readBase(s, 0, this.sc, c * this.cs + j * this.sc);
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
    writeRangeAll(this.fd, this.runBuf, this.runOff, this.runLen, this.runPos);
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
    const t = this.table(l1i)!;
    const i = c - l1i * this.l2Entries;
    if (!this.extendedL2) return (t.dv.getUint32(i * 8 + 4) & LO_ZERO) !== 0;
    return ((t.dv.getUint32(i * 16 + 8) >>> Math.floor(inC / this.sc)) & 1) === 1;
  }

  private punch(host: number, len: number): void {
    try {
      fallocate(this.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, host, len);
    } catch {
      // space reclamation is optional: the zero flags already make the range read as zeros
    }
  }

  // ---- metadata --------------------------------------------------------------------------------

  private table(l1i: number): L2Table | undefined {
    const t = this.l2[l1i];
    if (t !== undefined) return t;
    const host = this.l1[l1i]!;
    if (host === 0) return undefined;
    const buf = new Uint8Array(this.cs);
    readFull(this.fd, buf, 0, this.cs, host);
    const nt: L2Table = { l1i, host, buf, dv: new DataView(buf.buffer), isNew: false, dirtyLo: -1, dirtyHi: -1, queued: false };
    this.checkTable(nt);
    this.evictIfNeeded();
    this.l2[l1i] = nt;
    this.cachedL2++;
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
      const host = (hi & HI_OFFSET_MASK) * TWO32 + (lo & LO_OFFSET_MASK);
      if (host % this.cs !== 0) throw new Qcow2Error(this.path, `L2 table at 0x${t.host.toString(16)} has an unaligned cluster offset 0x${host.toString(16)} (corrupt image)`);
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
    if ((this.cachedL2 + 1) * this.cs <= this.l2Limit || this.running !== null) return;
    // Evict clean tables only; a table whose entries are being flushed counts as dirty (running).
    for (let k = 0; k < this.l2.length && (this.cachedL2 + 1) * this.cs > this.l2Limit; k++) {
      const t = this.l2[k];
      if (t !== undefined && !t.isNew && t.dirtyLo === -1) {
        this.l2[k] = undefined;
        this.cachedL2--;
      }
    }
  }

  private newTable(l1i: number): L2Table {
    const host = this.allocCluster();
    const buf = new Uint8Array(this.cs);
    const t: L2Table = { l1i, host, buf, dv: new DataView(buf.buffer), isNew: true, dirtyLo: -1, dirtyHi: -1, queued: false };
    this.l2[l1i] = t;
    this.cachedL2++;
    this.l1[l1i] = host;
    if (this.l1DirtyLo === -1 || l1i < this.l1DirtyLo) this.l1DirtyLo = l1i;
    if (l1i > this.l1DirtyHi) this.l1DirtyHi = l1i;
    t.queued = true;
    this.dirtyL2.push(t);
    return t;
  }

  private setStd(t: L2Table, i: number, host: number, zero: boolean): void {
    const hi = host !== 0 ? (HI_COPIED | Math.floor(host / TWO32)) >>> 0 : 0;
    t.dv.setUint32(i * 8, hi);
    t.dv.setUint32(i * 8 + 4, ((host >>> 0) | (zero ? LO_ZERO : 0)) >>> 0);
    this.markL2(t, i);
  }

  private setExt(t: L2Table, i: number, host: number, zero: number, alloc: number): void {
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
    if (!t.queued) { t.queued = true; this.dirtyL2.push(t); }
  }

  refcount(c: number): number {
    const ti = Math.floor(c / this.rbEntries);
    const b = ti < this.rb.length ? this.rb[ti] : undefined;
    if (b === undefined) return 0;
    return b.dv.getUint16((c - ti * this.rbEntries) * 2);
  }

  private setRefcount(c: number, v: number): void {
    const ti = Math.floor(c / this.rbEntries);
    const b = this.rb[ti]!;
    const k = c - ti * this.rbEntries;
    b.dv.setUint16(k * 2, v);
    if (b.dirtyLo === -1 || k < b.dirtyLo) b.dirtyLo = k;
    if (k > b.dirtyHi) b.dirtyHi = k;
    if (!b.queued) { b.queued = true; this.dirtyRb.push(b); }
  }

  /** Allocate one host cluster (refcount 0 -> 1 in memory) and return its file offset. */
  private allocCluster(): number {
    for (;;) {
      const c = this.freeHint;
      const ti = Math.floor(c / this.rbEntries);
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
   * Hook up a new refcount block for table entry ti, placed at the free cluster c inside its own
   * range so that it describes itself. Committed synchronously: block, sync, table entry, sync.
   */
  private newRefBlock(ti: number, c: number): void {
    const buf = new Uint8Array(this.cs);
    const dv = new DataView(buf.buffer);
    dv.setUint16((c - ti * this.rbEntries) * 2, 1);
    const host = c * this.cs;
    writeAll(this.fd, buf, host);
    fdatasyncSync(this.fd);
    const ent = new Uint8Array(8);
    putU64(new DataView(ent.buffer), 0, host);
    writeAll(this.fd, ent, this.header.refcountTableOffset + ti * 8);
    fdatasyncSync(this.fd);
    this.rt[ti] = host;
    this.rb[ti] = { host, buf, dv, dirtyLo: -1, dirtyHi: -1, queued: false };
    this.freeHint = c + 1;
  }

  // ---- flush -----------------------------------------------------------------------------------

  private async runFlush(): Promise<void> {
    try {
      await this.flushNow();
    } finally {
      this.running = null;
    }
  }

  private async flushNow(): Promise<void> {
    const phase1: PendingWrite[] = [];
    const phase2: PendingWrite[] = [];
    for (const b of this.dirtyRb) {
      const lo = b.dirtyLo;
      const hi = b.dirtyHi;
      b.queued = false; b.dirtyLo = -1; b.dirtyHi = -1;
      if (lo === -1) continue;
      phase1.push({ pos: b.host + lo * 2, data: b.buf.slice(lo * 2, (hi + 1) * 2), redo: () => this.remarkRb(b, lo, hi) });
    }
    const es = this.extendedL2 ? 16 : 8;
    for (const t of this.dirtyL2) {
      const lo = t.dirtyLo;
      const hi = t.dirtyHi;
      t.queued = false; t.dirtyLo = -1; t.dirtyHi = -1;
      if (t.isNew) {
        t.isNew = false;
        phase1.push({ pos: t.host, data: t.buf.slice(), redo: () => { t.isNew = true; this.requeueL2(t); } });
      } else if (lo !== -1) {
        phase2.push({ pos: t.host + lo * es, data: t.buf.slice(lo * es, (hi + 1) * es), redo: () => this.remarkL2(t, lo, hi) });
      }
    }
    if (this.l1DirtyLo !== -1) {
      const lo = this.l1DirtyLo;
      const hi = this.l1DirtyHi;
      this.l1DirtyLo = this.l1DirtyHi = -1;
      const data = new Uint8Array((hi - lo + 1) * 8);
      const dv = new DataView(data.buffer);
      for (let k = lo; k <= hi; k++) {
        const off = this.l1[k]!;
        if (off !== 0) { dv.setUint32((k - lo) * 8, (HI_COPIED | Math.floor(off / TWO32)) >>> 0); dv.setUint32((k - lo) * 8 + 4, off >>> 0); }
      }
      phase2.push({ pos: this.header.l1Offset + lo * 8, data, redo: () => this.remarkL1(lo, hi) });
    }
    this.dirtyRb = [];
    this.dirtyL2 = [];
    let stage = 1;
    try {
      if (phase1.length > 0 || phase2.length > 0) {
        for (const w of phase1) writeAll(this.fd, w.data, w.pos);
        await datasync(this.fd);
      }
      stage = 2;
      for (const w of phase2) writeAll(this.fd, w.data, w.pos);
      await datasync(this.fd);
    } catch (err) {
      if (stage === 1) for (const w of phase1) w.redo();
      for (const w of phase2) w.redo();
      this.log(`overlay ${this.path}: flush failed: ${(err as Error).message}`);
      throw err;
    }
  }

  private remarkRb(b: RefBlock, lo: number, hi: number): void {
    if (b.dirtyLo === -1 || lo < b.dirtyLo) b.dirtyLo = lo;
    if (hi > b.dirtyHi) b.dirtyHi = hi;
    if (!b.queued) { b.queued = true; this.dirtyRb.push(b); }
  }

  private remarkL2(t: L2Table, lo: number, hi: number): void {
    this.markL2(t, lo);
    this.markL2(t, hi);
  }

  private requeueL2(t: L2Table): void {
    if (!t.queued) { t.queued = true; this.dirtyL2.push(t); }
  }

  private remarkL1(lo: number, hi: number): void {
    if (this.l1DirtyLo === -1 || lo < this.l1DirtyLo) this.l1DirtyLo = lo;
    if (hi > this.l1DirtyHi) this.l1DirtyHi = hi;
  }

  // ---- traversal (cold paths: extents, diff, commit) ------------------------------------------

  /** Visit [offset, offset+length) as runs of one kind; stop when fn returns false. */
  walk(offset: number, length: number, fn: (kind: number, start: number, len: number, host: number) => boolean): void {
    const cs = this.cs;
    const end = Math.min(offset + length, this.virtualSize);
    let pos = offset;
    while (pos < end) {
      const c = Math.floor(pos / cs);
      const l1i = Math.floor(c / this.l2Entries);
      if (!this.l1[l1i]) {
        // a whole unallocated L2 range
        const stop = Math.min(end, (l1i + 1) * this.l2Entries * cs);
        if (!fn(K_BASE, pos, stop - pos, 0)) return;
        pos = stop;
        continue;
      }
      const t = this.table(l1i)!;
      const inC = pos - c * cs;
      const n = Math.min(cs - inC, end - pos);
      const i = c - l1i * this.l2Entries;
      if (!this.extendedL2) {
        const hi = t.dv.getUint32(i * 8);
        const lo = t.dv.getUint32(i * 8 + 4);
        const host = (hi & HI_OFFSET_MASK) * TWO32 + (lo & LO_OFFSET_MASK);
        const kind = lo & LO_ZERO ? K_ZERO : host !== 0 ? K_DATA : K_BASE;
        if (!fn(kind, pos, n, kind === K_DATA ? host + inC : 0)) return;
      } else {
        const hi = t.dv.getUint32(i * 16);
        const lo = t.dv.getUint32(i * 16 + 4);
        const zero = t.dv.getUint32(i * 16 + 8);
        const alloc = t.dv.getUint32(i * 16 + 12);
        const host = (hi & HI_OFFSET_MASK) * TWO32 + (lo & LO_OFFSET_MASK);
        let p = inC;
        while (p < inC + n) {
          const j = Math.floor(p / this.sc);
          const e = Math.min((j + 1) * this.sc, inC + n);
          const kind = (alloc >>> j) & 1 ? K_DATA : (zero >>> j) & 1 ? K_ZERO : K_BASE;
          if (!fn(kind, c * cs + p, e - p, kind === K_DATA ? host + p : 0)) return;
          p = e;
        }
      }
      pos += n;
    }
  }

  /** Ranges the overlay changes, merged: data (overlay bytes) or zero. */
  changedRanges(): { offset: number; length: number; kind: "data" | "zero" }[] {
    const out: { offset: number; length: number; kind: "data" | "zero" }[] = [];
    this.walk(0, this.virtualSize, (kind, start, len) => {
      if (kind === K_BASE) return true;
      const k = kind === K_DATA ? "data" : "zero";
      const last = out[out.length - 1];
      if (last !== undefined && last.kind === k && last.offset + last.length === start) last.length += len;
      else out.push({ offset: start, length: len, kind: k });
      return true;
    });
    return out;
  }

  private baseExtents(start: number, len: number, add: (s: number, l: number, t: number) => void): void {
    const end = start + len;
    let p = start;
    if (p < this.baseSize) {
      const stop = Math.min(end, this.baseSize);
      while (p < stop) {
        let d: number;
        try {
          d = seekData(this.baseFd, p);
        } catch {
          add(p, stop - p, 0);
          p = stop;
          break;
        }
        if (d === -1 || d >= stop) { add(p, stop - p, EXTENT_HOLE | EXTENT_ZERO); p = stop; break; }
        if (d > p) add(p, d - p, EXTENT_HOLE | EXTENT_ZERO);
        let h: number;
        try { h = seekHole(this.baseFd, d); } catch { h = stop; }
        if (h === -1 || h > stop) h = stop;
        add(d, h - d, 0);
        p = h;
      }
    }
    if (p < end) add(p, end - p, EXTENT_HOLE | EXTENT_ZERO);
  }

  // ---- consistency check, leak repair, reset ----------------------------------------------------

  /**
   * Count references to every host cluster and compare them with the refcounts. With `repair`,
   * leaked clusters (refcount above references) are freed and the refcount blocks synced. Throws
   * Qcow2Error for unsupported content (compressed clusters).
   */
  scan(repair: boolean): ScanResult {
    const cs = this.cs;
    const fileClusters = Math.ceil(fstatSync(this.fd).size / cs);
    let maxRc = 0;
    for (let ti = 0; ti < this.rb.length; ti++) {
      const b = this.rb[ti];
      if (b === undefined) continue;
      for (let k = this.rbEntries - 1; k >= 0; k--) {
        if (b.dv.getUint16(k * 2) !== 0) { maxRc = Math.max(maxRc, ti * this.rbEntries + k + 1); break; }
      }
    }
    let n = Math.max(fileClusters, maxRc);
    const errors: string[] = [];
    let refs = new Uint16Array(n + 1);
    const ref = (off: number, count: number, what: string) => {
      for (let k = 0; k < count; k++) {
        const c = off / cs + k;
        if (c >= refs.length) {
          const bigger = new Uint16Array(Math.max(c + 1, refs.length * 2));
          bigger.set(refs);
          refs = bigger;
        }
        if (refs[c]! < 0xffff) refs[c]!++;
        if (c + 1 > n) { n = c + 1; errors.push(`${what} at cluster ${c} lies past the end of the file`); }
      }
    };
    ref(0, 1, "header");
    ref(this.header.refcountTableOffset, this.header.refcountTableClusters, "refcount table");
    for (let ti = 0; ti < this.rt.length; ti++) if (this.rt[ti]) ref(this.rt[ti]!, 1, "refcount block");
    ref(this.header.l1Offset, Math.max(1, Math.ceil((this.l1.length * 8) / cs)), "L1 table");
    let dataClusters = 0;
    const es = this.extendedL2 ? 16 : 8;
    for (let l1i = 0; l1i < this.l1.length; l1i++) {
      if (!this.l1[l1i]) continue;
      ref(this.l1[l1i]!, 1, "L2 table");
      const t = this.table(l1i)!;
      for (let e = 0; e < cs; e += es) {
        const hi = t.dv.getUint32(e);
        const lo = t.dv.getUint32(e + 4);
        const host = (hi & HI_OFFSET_MASK) * TWO32 + (lo & LO_OFFSET_MASK);
        if (host !== 0) { ref(host, 1, "data cluster"); dataClusters++; }
      }
    }
    let leaks = 0;
    let repaired = 0;
    for (let c = 0; c < Math.max(n, refs.length); c++) {
      const r = c < refs.length ? refs[c]! : 0;
      const rc = this.refcount(c);
      if (rc < r) errors.push(`cluster ${c}: refcount ${rc}, referenced ${r} times`);
      else if (rc > r) {
        leaks++;
        if (repair && !this.readOnly) { this.setRefcount(c, r); repaired++; }
      }
    }
    if (repaired > 0) {
      for (const b of this.dirtyRb) {
        if (b.dirtyLo !== -1) writeAll(this.fd, b.buf.subarray(b.dirtyLo * 2, (b.dirtyHi + 1) * 2), b.host + b.dirtyLo * 2);
        b.dirtyLo = b.dirtyHi = -1;
        b.queued = false;
      }
      this.dirtyRb = [];
      fdatasyncSync(this.fd);
      this.freeHint = 0;
    }
    return { leaks, errors, dataClusters, fileClusters, repaired };
  }

  /** For read-write opens: refuse images whose refcount table would have to grow. */
  checkRefcountCoverage(): void {
    const covered = this.rt.length * this.rbEntries;
    const fileClusters = Math.ceil(fstatSync(this.fd).size / this.cs);
    const worst = worstCaseClusters(this.virtualSize, this.header.clusterBits, this.extendedL2).total;
    if (covered < Math.max(worst, fileClusters)) {
      throw new Qcow2Error(this.path,
        `unsupported qcow2 feature: refcount table growth (the table covers ${covered} clusters, ` +
        `writing could need ${Math.max(worst, fileClusters)}); convert with qemu-img convert -O qcow2 -o cluster_size=65536`,
        "refcount table growth");
    }
  }

  /**
   * Drop every change: L1 entries cleared and synced first, then the refcounts of everything but
   * the header, refcount structures and L1 table, synced; then the file is truncated. A crash in
   * between can only leak clusters.
   */
  discardAll(): void {
    if (this.readOnly) throw eio(`${this.path}: opened read-only`);
    if (this.running !== null) throw eio(`${this.path}: a flush is in progress`);
    this.l1.fill(0);
    writeAll(this.fd, new Uint8Array(this.l1.length * 8), this.header.l1Offset);
    fdatasyncSync(this.fd);
    this.l2.fill(undefined);
    this.cachedL2 = 0;
    this.dirtyL2 = [];
    this.l1DirtyLo = this.l1DirtyHi = -1;
    const cs = this.cs;
    const keep = new Set<number>();
    keep.add(0);
    for (let k = 0; k < this.header.refcountTableClusters; k++) keep.add(this.header.refcountTableOffset / cs + k);
    for (let ti = 0; ti < this.rt.length; ti++) if (this.rt[ti]) keep.add(this.rt[ti]! / cs);
    const l1Clusters = Math.max(1, Math.ceil((this.l1.length * 8) / cs));
    for (let k = 0; k < l1Clusters; k++) keep.add(this.header.l1Offset / cs + k);
    for (let ti = 0; ti < this.rb.length; ti++) {
      const b = this.rb[ti];
      if (b === undefined) continue;
      for (let k = 0; k < this.rbEntries; k++) {
        const c = ti * this.rbEntries + k;
        if (b.dv.getUint16(k * 2) !== 0 && !keep.has(c)) this.setRefcount(c, 0);
      }
    }
    for (const b of this.dirtyRb) {
      if (b.dirtyLo !== -1) writeAll(this.fd, b.buf.subarray(b.dirtyLo * 2, (b.dirtyHi + 1) * 2), b.host + b.dirtyLo * 2);
      b.dirtyLo = b.dirtyHi = -1;
      b.queued = false;
    }
    this.dirtyRb = [];
    fdatasyncSync(this.fd);
    let last = 0;
    for (const c of keep) last = Math.max(last, c);
    // like qemu-img create: a trailing L1 table occupies only l1_size * 8 bytes
    const endOff = last === this.header.l1Offset / cs + l1Clusters - 1
      ? this.header.l1Offset + this.l1.length * 8
      : (last + 1) * cs;
    if (fstatSync(this.fd).size > endOff) {
      ftruncateSync(this.fd, endOff);
      fdatasyncSync(this.fd);
    }
    this.freeHint = 0;
  }

  /** Clear autoclear feature bits we do not maintain (bitmaps become stale), before any write. */
  clearAutoclear(): void {
    if (this.header.autoclear === 0 && this.header.autoclearHigh === 0) return;
    writeAll(this.fd, new Uint8Array(8), 88);
    fdatasyncSync(this.fd);
    this.header.autoclear = 0;
    this.header.autoclearHigh = 0;
  }
}

function noop(): void {}

function datasync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fdatasync(fd, (err) => (err ? reject(err) : resolve())));
}

/** Bits j0..j1 (inclusive) of a 32-bit subcluster bitmap. */
function rangeMask(j0: number, j1: number): number {
  return (2 ** (j1 + 1) - 2 ** j0) >>> 0;
}

function writeRangeAll(fd: number, buf: Uint8Array, off: number, len: number, pos: number): void {
  let done = 0;
  while (done < len) {
    const n = writeSync(fd, buf, off + done, len - done, pos + done);
    if (n <= 0) throw eio("short write to the overlay");
    done += n;
  }
}
