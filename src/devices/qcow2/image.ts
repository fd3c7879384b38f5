// A qcow2 v3 overlay over a raw file or any device stack, as a BlockDevice: composes the overlay file
// (file.ts), the base (base.ts), L1/L2 (tables.ts), allocation (allocator.ts), reads (read.ts),
// writes (data.ts), the flush (flush.ts), extents (extents.ts) and maintenance (check.ts).
import {
  FUA, MAY_TRIM, caps, isPromise,
  type BlockDevice, type BlockSize, type Capabilities, type ExtentSink, type Maybe, type MetaContextProvider,
} from "../types.ts";
import { QEMU_ALLOCATION_DEPTH } from "../../protocol/constants.ts";
import { eio } from "../../protocol/errors.ts";
import { Allocator } from "./allocator.ts";
import type { BaseImage, OverlayBase } from "./base.ts";
import { discardAll, scan, type ScanResult } from "./check.ts";
import { WritePath } from "./data.ts";
import { ReadPath } from "./read.ts";
import { allocationExtents, changedRanges, depthExtents, walk, type WalkFn } from "./extents.ts";
import { FailureLatch } from "../failure.ts";
import { FdFile, WatchedFile, type ImageFile } from "./file.ts";
import { Flusher } from "./flush.ts";
import type { Header } from "./format.ts";
import { L2Tables } from "./tables.ts";

export type { ScanResult } from "./check.ts";

export interface OverlayImageOptions {
  path: string;
  fd: number;
  header: Header;
  readOnly: boolean;
  /** The base, with a reference taken for this overlay (given back at close). */
  base: OverlayBase;
  log: (msg: string) => void;
  /** Called by close() after the files are closed (locks, temp files). */
  onClose?: () => void;
  /** Bytes of L2 tables kept in memory (default 64 MiB); dirty tables are always kept. */
  l2CacheBytes?: number;
  /** Wraps the overlay file's plain positional I/O: tests hand in recording or failing layers. */
  wrapFile?: (f: ImageFile) => ImageFile;
}

/**
 * Reads resolve per cluster (or subcluster, with extended L2 entries): overlay data, zeros, or the
 * base. Writes copy-on-write into newly allocated clusters; metadata stays in memory until flush()
 * writes it in two phases, so that a crash can only leak clusters, never corrupt the image.
 * All I/O on the overlay file goes through one ImageFile (made in the constructor: the place to
 * hand in another, e.g. a recording file for power-loss tests), all reads of the base through the
 * shared OverlayBase handed in (synchronous for a raw file; a device's reads may be asynchronous).
 */
export class Qcow2Overlay implements BlockDevice {
  readonly path: string;
  readonly header: Header;
  readonly readOnly: boolean;
  readonly extendedL2: boolean;
  readonly clusterSize: number;
  readonly subclusterSize: number;
  readonly baseSize: number;
  /** The base handle (shared; this overlay holds one reference until close). */
  readonly base: OverlayBase;
  private readonly virtualSize: number;
  private readonly file: WatchedFile;
  /** The first failed write or sync (fsyncgate): then writes and flushes are refused. */
  private readonly latch: FailureLatch;
  private readonly baseImage: BaseImage;
  private readonly tables: L2Tables;
  private readonly alloc: Allocator;
  private readonly reader: ReadPath;
  private readonly data: WritePath;
  private readonly flusher: Flusher;
  private closing: Promise<void> | null = null;
  private readonly onClose?: () => void;

  constructor(o: OverlayImageOptions) {
    const h = o.header;
    this.path = o.path;
    this.header = h;
    this.readOnly = o.readOnly;
    this.onClose = o.onClose;
    this.virtualSize = h.size;
    const fdFile = new FdFile(o.fd);
    this.latch = new FailureLatch(`overlay ${o.path}`, o.log);
    this.file = new WatchedFile(o.wrapFile ? o.wrapFile(fdFile) : fdFile, this.latch);
    this.base = o.base;
    this.baseImage = o.base.image;
    this.baseSize = this.baseImage.size;
    this.tables = new L2Tables(this.file, o.path, h, o.l2CacheBytes ?? 64 * 1024 * 1024, () => this.flusher.busy);
    this.extendedL2 = this.tables.extendedL2;
    this.clusterSize = this.tables.cs;
    this.subclusterSize = this.tables.sc;
    this.alloc = new Allocator(this.file, o.path, h);
    this.reader = new ReadPath(this.file, this.baseImage, this.tables);
    this.data = new WritePath(this.file, this.baseImage, this.tables, this.alloc, h.size);
    this.flusher = new Flusher(this.file, this.tables, this.alloc, h.l1Offset, o.path, o.log, () => this.latch.refuse());
  }

  // ---- BlockDevice --------------------------------------------------------------------------

  size(): number { return this.virtualSize; }

  blockSize(): BlockSize {
    return { minimum: 1, preferred: Math.max(4096, Math.min(this.subclusterSize, 65536)), maximum: 32 * 1024 * 1024 };
  }

  capabilities(): Capabilities {
    const w = !this.readOnly;
    return caps({
      canWrite: w, canFlush: w, canFua: w, canTrim: w, canZero: w, canFastZero: w,
      canCache: true, canExtents: true, canMultiConn: true,
    });
  }

  pread(buf: Uint8Array, offset: number, _flags: number): Maybe {
    return this.reader.read(buf, offset);
  }

  pwrite(buf: Uint8Array, offset: number, flags: number): Maybe {
    if (this.latch.failure !== null) this.latch.refuse();
    const r = this.data.write(buf, offset);
    if (r !== undefined) return flags & FUA ? this.flushAfter(r) : r;
    if (flags & FUA) return this.flush(0);
  }

  flush(_flags: number): Promise<void> {
    return this.flusher.flush();
  }

  /** (A method of its own: a closure inside pwrite would cost an allocation per call.) */
  private flushAfter(r: Promise<void>): Promise<void> {
    return r.then(() => this.flush(0));
  }

  trim(offset: number, length: number, flags: number): Maybe {
    // A trimmed range reads as zeros: never let the base's old bytes resurface under a guest
    // filesystem that believes the blocks are free.
    return this.zero(offset, length, (flags & FUA) | MAY_TRIM);
  }

  zero(offset: number, length: number, flags: number): Maybe {
    if (this.latch.failure !== null) this.latch.refuse();
    const r = this.data.zero(offset, length, flags);
    if (r !== undefined) return flags & FUA ? this.flushAfter(r) : r;
    if (flags & FUA) return this.flush(0);
  }

  extents(offset: number, length: number, flags: number, sink: ExtentSink): Maybe {
    return allocationExtents(this.tables, this.baseImage, this.virtualSize, offset, length, flags, sink);
  }

  cache(offset: number, length: number, _flags: number): Maybe {
    const chunk = new Uint8Array(Math.min(length, 1024 * 1024));
    const from = (start: number): Maybe => {
      for (let p = start; p < offset + length; p += chunk.length) {
        const n = Math.min(chunk.length, offset + length - p);
        const r = this.pread(n === chunk.length ? chunk : chunk.subarray(0, n), p, 0);
        if (isPromise(r)) return r.then(() => from(p + n));
      }
    };
    return from(offset);
  }

  metaContexts(): MetaContextProvider[] {
    return [{
      name: QEMU_ALLOCATION_DEPTH,
      // 1: allocated (data or zero) in the overlay; 2: from the base (the first backing layer).
      extents: (offset, length, flags, sink) => depthExtents(this.tables, this.virtualSize, offset, length, flags, sink),
    }];
  }

  /** Flush and close, once: a second caller (a shutdown racing a last release) waits for the first. */
  close(): Promise<void> {
    return (this.closing ??= this.closeNow());
  }

  private async closeNow(): Promise<void> {
    // After a failed sync nothing more is written: the file keeps the state of the last good flush.
    if (!this.readOnly && this.latch.failure === null) await this.flush(0);
    try {
      this.file.close();
    } finally {
      try {
        await this.base.release();
      } finally {
        this.onClose?.();
      }
    }
  }

  /** The first failed write or sync, if any (then writes and flushes are refused). */
  get failure(): Error | null {
    return this.latch.failure;
  }

  // ---- traversal (cold paths: extents, diff, commit) ------------------------------------------

  /** Visit [offset, offset+length) as runs of one kind; stop when fn returns false. */
  walk(offset: number, length: number, fn: WalkFn): void {
    walk(this.tables, this.virtualSize, offset, length, fn);
  }

  /** Ranges the overlay changes, merged: data (overlay bytes) or zero. */
  changedRanges(): { offset: number; length: number; kind: "data" | "zero" }[] {
    return changedRanges(this.tables, this.virtualSize);
  }

  // ---- consistency check, leak repair, reset ----------------------------------------------------

  refcount(c: number): number {
    return this.alloc.refcount(c);
  }

  /**
   * Count references to every host cluster and compare them with the refcounts. With `repair`
   * (ignored read-only), leaked clusters are freed and the refcount blocks synced.
   */
  scan(repair: boolean): ScanResult {
    return scan(this.file, this.header, this.tables, this.alloc, repair && !this.readOnly);
  }

  /** For read-write opens: refuse images whose refcount table would have to grow. */
  checkRefcountCoverage(): void {
    this.alloc.checkCoverage(this.virtualSize, this.extendedL2);
  }

  /** Drop every change (see check.ts for the crash-safe order). */
  discardAll(): void {
    if (this.readOnly) throw eio(`${this.path}: opened read-only`);
    if (this.flusher.busy) throw eio(`${this.path}: a flush is in progress`);
    if (this.data.locks.size !== 0) throw eio(`${this.path}: writes are in progress`);
    this.latch.refuse();
    discardAll(this.file, this.header, this.tables, this.alloc);
  }

  /** Clear autoclear feature bits we do not maintain (bitmaps become stale), before any write. */
  clearAutoclear(): void {
    if (this.header.autoclear === 0 && this.header.autoclearHigh === 0) return;
    this.file.writeAll(new Uint8Array(8), 88);
    this.file.syncNow();
    this.header.autoclear = 0;
    this.header.autoclearHigh = 0;
  }
}
