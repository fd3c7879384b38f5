// The block device interface shared by plugins (which own bytes: raw file, memory, CD image) and
// filters (which wrap another device: overlay, CD track view, offset). Shaped like nbdkit's
// callbacks. Methods may complete synchronously (return void) or return a Promise; callers await
// only when given a Promise (`isPromise`).
//
// Offsets and lengths are plain numbers (exact up to 2^53). Flags are our own internal bits (below),
// translated from wire flags once, in dispatch.

export type Maybe<T = void> = T | Promise<T>;

/** Internal request flags (not wire values). */
export const FUA = 1;        // make this write durable before completing
export const MAY_TRIM = 2;   // zero(): the range may be deallocated (wire: NO_HOLE not set)
export const FAST_ZERO = 4;  // zero(): fail with ENOTSUP unless zeroing is fast
export const REQ_ONE = 8;    // extents(): one extent is enough

export interface BlockSize {
  /** Smallest addressable unit (power of two, 1..65536). */
  minimum: number;
  /** Preferred I/O size (power of two, >= max(minimum, 512)). */
  preferred: number;
  /** Largest payload accepted. */
  maximum: number;
}

export interface Capabilities {
  canWrite: boolean;
  canFlush: boolean;
  /** The device honours FUA itself; if false but canFlush, FUA is emulated with a flush. */
  canFua: boolean;
  canTrim: boolean;
  /** The device has an efficient zero(); if false (and writable), zero is emulated with writes. */
  canZero: boolean;
  /** zero() with FAST_ZERO can succeed quickly (some ranges at least). */
  canFastZero: boolean;
  canCache: boolean;
  /** extents() reports real allocation (otherwise everything is reported as data). */
  canExtents: boolean;
  /** A flush on one connection is visible to all (no per-connection cache). */
  canMultiConn: boolean;
  isRotational: boolean;
}

/** Extent type bits, the same as NBD_STATE_HOLE / NBD_STATE_ZERO of base:allocation. */
export const EXTENT_HOLE = 1;
export const EXTENT_ZERO = 2;

/**
 * Receives extents in increasing offset order. A device adds contiguous extents starting at (or
 * before) the requested offset; the collector clips, merges neighbours with the same type and
 * stops early when told.
 */
export interface ExtentSink {
  /** Add [offset, offset+length) with `type` bits. Returns false when no more are wanted. */
  add(offset: number, length: number, type: number): boolean;
}

/** Where a byte range lives in a file (see BlockDevice.fileRange). */
export interface FileRange {
  fd: number;
  offset: number;
  /**
   * Set by a device whose file can change under a sendfile still queued (a cache that evicts):
   * called once the bytes have left, or will not be sent. The server calls it exactly once for
   * every fileRange() that returned true.
   */
  release?: (() => void) | null;
}

/** An extra metadata context a device offers (e.g. "qemu:allocation-depth"). */
export interface MetaContextProvider {
  readonly name: string;
  /** Like extents(), but `type` is the context's own 32-bit status value. */
  extents(offset: number, length: number, flags: number, sink: ExtentSink): Maybe;
}

export interface BlockDevice {
  /** Export size in bytes. Fixed while the device is open. */
  size(): number;
  /** Block size constraints; undefined means the defaults (1 / 4096 / 32 MiB). */
  blockSize?(): BlockSize | undefined;
  /** Asked once after open; the result is frozen by the checked wrapper. */
  capabilities(): Capabilities;

  pread(buf: Uint8Array, offset: number, flags: number): Maybe;
  pwrite?(buf: Uint8Array, offset: number, flags: number): Maybe;
  flush?(flags: number): Maybe;
  trim?(offset: number, length: number, flags: number): Maybe;
  zero?(offset: number, length: number, flags: number): Maybe;
  extents?(offset: number, length: number, flags: number, sink: ExtentSink): Maybe;
  cache?(offset: number, length: number, flags: number): Maybe;
  /**
   * Zero-copy source for reads: if [offset, offset+length) is stored verbatim in a file, set
   * `out.fd` and `out.offset` and return true, so the server can send it with sendfile(2). Only
   * plugins that own plain files implement this; filters must not forward it (Passthrough does
   * not) unless they pass bytes through unchanged.
   */
  fileRange?(offset: number, length: number, out: FileRange): boolean;
  /**
   * For a device that fills a file as it goes (a remote image's cache): a promise that settles
   * once [offset, offset+length) has been put in that file, so that fileRange() can name it; null
   * when it will not be (then the server reads as usual). Rejects as a read would.
   */
  whenInFile?(offset: number, length: number): Promise<void> | null;
  /** Extra metadata contexts (base:allocation is always offered, from extents()). */
  metaContexts?(): MetaContextProvider[];
  /**
   * This stack as plain data another thread can rebuild it from (recipe.ts), sharing its open
   * files; null or absent when it cannot be (state kept in memory, a test's seams). Like
   * fileRange, filters must not forward it unless they pass bytes through unchanged.
   */
  recipe?(): DeviceRecipe | null;
  /** Release files and resources. Called once at shutdown, after a final flush. */
  close?(): Maybe;
}

/**
 * A device stack as plain data (BlockDevice.recipe; rebuilt by recipe.ts in another thread): a
 * raw file shared with the thread that opened it, the stateless views over one, and a CD's
 * cooked data track.
 */
export type DeviceRecipe =
  | { kind: "file"; path: string; fd: number; size: number; readOnly: boolean; failed: SharedArrayBuffer }
  | { kind: "partition"; start: number; length: number; inner: DeviceRecipe }
  | { kind: "iso"; inner: DeviceRecipe }
  /** A CD's cooked data track (cd/views.ts): its BIN, shared, and the track as laid out (a cd/disc.ts Track without its file). */
  | { kind: "cooked"; source: string; file: { path: string; label: string; size: number; fd: number }; track: object };

/** An export as the server sees it: a name, a description and a device stack. */
export interface ExportSpec {
  name: string;
  description?: string;
  device: BlockDevice;
}

export function isPromise(x: unknown): x is Promise<unknown> {
  return x !== undefined && x !== null && typeof (x as Promise<unknown>).then === "function";
}

/** Everything false except canWrite/canFlush as given; convenient base for plugins. */
export function caps(partial: Partial<Capabilities>): Capabilities {
  return {
    canWrite: false, canFlush: false, canFua: false, canTrim: false, canZero: false,
    canFastZero: false, canCache: false, canExtents: false, canMultiConn: true, isRotational: false,
    ...partial,
  };
}
