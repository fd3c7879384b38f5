// The qcow2 v3 on-disk format, as far as copy-on-write overlays need it: header and header
// extensions (parse, validate, refuse what is not implemented, naming the feature), entry bit
// layouts, and creating a fresh overlay (with, over a device stack, our identity extension). Cold
// code: written for clarity. Facts are from QEMU's docs/interop/qcow2.txt, checked against qemu-img 7.2.
import { closeSync, fdatasyncSync, fstatSync, openSync, readSync, writeSync } from "node:fs";

export const QCOW_MAGIC = 0x514649fb; // "QFI\xfb"

// Header extension types
export const EXT_END = 0;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;
/** Ours: the identity record of a non-raw base (identity.ts); "bnbd". QEMU keeps unknown extensions. */
export const EXT_BASE_IDENTITY = 0x626e6264;
/**
 * The backing format written for non-raw bases: QEMU refuses to open the backing ("Unknown driver
 * 'bun-nbd'") instead of reading the BIN, the .xz or the CUE text as raw bytes.
 */
export const BACKING_FORMAT_BUN = "bun-nbd";

// Incompatible feature bits
export const INCOMPAT_DIRTY = 1 << 0;
export const INCOMPAT_CORRUPT = 1 << 1;
export const INCOMPAT_DATA_FILE = 1 << 2;
export const INCOMPAT_COMPRESSION = 1 << 3;
export const INCOMPAT_EXTL2 = 1 << 4;
const INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/** 2^32: an entry's host offset is hi * TWO32 + lo, exact below 2^53. */
export const TWO32 = 0x100000000;

// L1/L2 entry bits, on the high 32-bit half of the big-endian u64
export const HI_COPIED = 0x80000000;
export const HI_COMPRESSED = 0x40000000;
/** Bits 32..55 of an entry hold the high part of the host offset. */
export const HI_OFFSET_MASK = 0x00ffffff;
/**
 * Bits 9..31 of an entry hold the low part of the host offset (cluster-aligned, so at least 512).
 * `lo & LO_OFFSET_MASK` is a signed 32-bit result: write `(lo & LO_OFFSET_MASK) >>> 0`, or host
 * offsets from 2 GiB (bit 31 set) come out negative.
 */
export const LO_OFFSET_MASK = 0xfffffe00;
/** Standard L2 entries: the cluster reads as zeros. */
export const LO_ZERO = 1;

export const MAX_BACKING_NAME = 1023;
/** QEMU's limits on the L1 table (QCOW_MAX_L1_SIZE) and the refcount table (QCOW_MAX_REFTABLE_SIZE), in bytes. */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
/** File offsets must stay exact (and within what positional I/O accepts): anything at or above is corrupt. */
export const MAX_FILE_OFFSET = 2 ** 53 - 2 ** 21;
/** The header length QEMU 7.2 writes (104 + compression type + padding). */
const HEADER_LENGTH = 112;

/** Names QEMU writes into the feature name table (type 0 incompatible, 1 compatible, 2 autoclear). */
const FEATURE_NAMES: [number, number, string][] = [
  [0, 0, "dirty bit"], [0, 1, "corrupt bit"], [0, 2, "external data file"], [0, 3, "compression type"],
  [0, 4, "extended L2 entries"], [1, 0, "lazy refcounts"], [2, 0, "bitmaps"], [2, 1, "raw external data"],
];

export interface Header {
  version: number;
  backingOffset: number;
  backingSize: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1Offset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  /** Feature words: bits 0..31 (bits 32..63 are unknown to everyone and refused). */
  incompatible: number;
  compatible: number;
  autoclear: number;
  incompatibleHigh: number;
  autoclearHigh: number;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  backingName: string | null;
  backingFormat: string | null;
  /** The base identity extension's bytes (overlays over a device stack), or null. */
  baseIdentity: Uint8Array | null;
  extensions: { type: number; data: Uint8Array }[];
  /** "type:bit" -> name, from the feature name table, for error messages. */
  featureNames: Map<string, string>;
}

/** An Error naming the file and what is wrong; `feature` names an unsupported qcow2 feature. */
export class Qcow2Error extends Error {
  constructor(readonly path: string, message: string, readonly feature?: string) {
    super(`${path}: ${message}`);
    this.name = "Qcow2Error";
  }
}

function u64(dv: DataView, off: number): number {
  const hi = dv.getUint32(off);
  const lo = dv.getUint32(off + 4);
  return hi * 0x100000000 + lo;
}

function putU64(dv: DataView, off: number, v: number): void {
  dv.setUint32(off, Math.floor(v / 0x100000000));
  dv.setUint32(off + 4, v >>> 0);
}

/** Read and parse cluster 0 of a qcow2 file. Throws Qcow2Error for anything not a qcow2 image. */
export function readHeader(fd: number, path: string): Header {
  // (our own header, extensions and backing name always fit in 4 KiB: see writeNewImage)
  const head = new Uint8Array(4096);
  const got = readSync(fd, head, 0, head.length, 0);
  const dv = new DataView(head.buffer);
  if (got < 72 || dv.getUint32(0) !== QCOW_MAGIC) throw new Qcow2Error(path, "not a qcow2 image (bad magic)");
  const version = dv.getUint32(4);
  if (version !== 2 && version !== 3) throw new Qcow2Error(path, `unsupported qcow2 version ${version}`, `qcow2 version ${version}`);
  const clusterBits = dv.getUint32(20);
  if (clusterBits < 9 || clusterBits > 21) throw new Qcow2Error(path, `invalid cluster_bits ${clusterBits} (9..21 allowed)`);
  const h: Header = {
    version,
    backingOffset: u64(dv, 8),
    backingSize: dv.getUint32(16),
    clusterBits,
    size: u64(dv, 24),
    cryptMethod: dv.getUint32(32),
    l1Size: dv.getUint32(36),
    l1Offset: u64(dv, 40),
    refcountTableOffset: u64(dv, 48),
    refcountTableClusters: dv.getUint32(56),
    nbSnapshots: dv.getUint32(60),
    incompatible: 0, compatible: 0, autoclear: 0, incompatibleHigh: 0, autoclearHigh: 0,
    refcountOrder: 4,
    headerLength: 72,
    compressionType: 0,
    backingName: null,
    backingFormat: null,
    baseIdentity: null,
    extensions: [],
    featureNames: new Map(),
  };
  if (version === 3) {
    if (got < 104) throw new Qcow2Error(path, "truncated qcow2 v3 header");
    h.incompatibleHigh = dv.getUint32(72);
    h.incompatible = dv.getUint32(76);
    h.compatible = dv.getUint32(84);
    h.autoclearHigh = dv.getUint32(88);
    h.autoclear = dv.getUint32(92);
    h.refcountOrder = dv.getUint32(96);
    h.headerLength = dv.getUint32(100);
    if (h.headerLength < 104 || h.headerLength % 8 !== 0 || h.headerLength > 4096 - 8) {
      throw new Qcow2Error(path, `invalid header_length ${h.headerLength}`);
    }
    if (h.headerLength > 104) h.compressionType = head[104]!;
  }
  // Header extensions, from header_length to the end marker (both versions may carry them).
  const clusterSize = 2 ** clusterBits;
  const extLimit = Math.min(got, clusterSize, h.backingOffset > 0 ? h.backingOffset : clusterSize);
  let p = h.headerLength;
  while (p + 8 <= extLimit) {
    const type = dv.getUint32(p);
    const len = dv.getUint32(p + 4);
    if (type === EXT_END) break;
    if (p + 8 + len > extLimit) throw new Qcow2Error(path, `header extension 0x${type.toString(16)} runs past the header`);
    const data = head.slice(p + 8, p + 8 + len);
    h.extensions.push({ type, data });
    if (type === EXT_BACKING_FORMAT) h.backingFormat = new TextDecoder().decode(data);
    if (type === EXT_BASE_IDENTITY) h.baseIdentity = data;
    if (type === EXT_FEATURE_TABLE) {
      for (let e = 0; e + 48 <= len; e += 48) {
        const name = new TextDecoder().decode(data.subarray(e + 2, e + 48)).replace(/\0+$/, "");
        h.featureNames.set(`${data[e]}:${data[e + 1]}`, name);
      }
    }
    p += 8 + Math.ceil(len / 8) * 8;
  }
  if (h.backingOffset > 0) {
    if (h.backingSize > MAX_BACKING_NAME || h.backingOffset + h.backingSize > Math.min(got, clusterSize)) {
      throw new Qcow2Error(path, `invalid backing file name (offset ${h.backingOffset}, length ${h.backingSize})`);
    }
    h.backingName = new TextDecoder().decode(head.subarray(h.backingOffset, h.backingOffset + h.backingSize));
  }
  return h;
}

/**
 * Refuse what this implementation does not handle, naming the feature. `write` adds the checks
 * that only matter for read-write opens (dirty and corrupt bits, version 2).
 */
export function validateHeader(h: Header, path: string, write: boolean): void {
  const refuse = (feature: string, hint = "") =>
    new Qcow2Error(path, `unsupported qcow2 feature: ${feature}${hint ? ` (${hint})` : ""}`, feature);
  if (h.cryptMethod !== 0) throw refuse("encryption", `crypt_method ${h.cryptMethod}`);
  if (h.extensions.some((e) => e.type === EXT_CRYPTO)) throw refuse("encryption", "full disk encryption header");
  if (h.incompatible & INCOMPAT_DATA_FILE || h.extensions.some((e) => e.type === EXT_DATA_FILE)) throw refuse("external data file");
  const unknown = (h.incompatible & ~INCOMPAT_KNOWN) >>> 0;
  if (unknown !== 0 || h.incompatibleHigh !== 0) {
    const names: string[] = [];
    for (let bit = 0; bit < 64; bit++) {
      const set = bit < 32 ? (unknown >>> bit) & 1 : (h.incompatibleHigh >>> (bit - 32)) & 1;
      if (set) names.push(h.featureNames.get(`0:${bit}`) ?? `unknown incompatible feature bit ${bit}`);
    }
    throw refuse(names.join(", "));
  }
  if (h.refcountOrder !== 4) throw refuse(`${2 ** h.refcountOrder}-bit refcounts`, "only 16-bit refcounts are supported");
  if (h.nbSnapshots !== 0) throw refuse("internal snapshots", `${h.nbSnapshots} snapshot(s); use qemu-img snapshot -d or qemu-img convert`);
  if (h.incompatible & INCOMPAT_EXTL2 && h.clusterBits < 14) throw new Qcow2Error(path, "extended L2 entries with clusters smaller than 16 KiB");
  if (h.backingName === null) throw new Qcow2Error(path, "has no backing file: not an overlay", "no backing file");
  if (h.backingName.startsWith("json:")) throw refuse("json: backing file specification");
  if (h.backingFormat === BACKING_FORMAT_BUN) {
    if (h.baseIdentity === null) throw new Qcow2Error(path, `backing format ${BACKING_FORMAT_BUN} without a base identity record (corrupt image)`);
  } else if (h.backingFormat !== null && h.backingFormat !== "raw") {
    throw refuse(`backing format ${h.backingFormat}`, "only raw bases (and bun-nbd device stacks) are supported");
  }
  if (h.size <= 0 || h.size > 2 ** 53) throw new Qcow2Error(path, `invalid virtual size ${h.size}`);
  if (h.l1Offset % 2 ** h.clusterBits !== 0 || h.refcountTableOffset % 2 ** h.clusterBits !== 0) {
    throw new Qcow2Error(path, "L1 or refcount table offset is not cluster-aligned (corrupt image)");
  }
  // QEMU's own limits; they also bound what opening allocates and reads before anything is checked.
  if (h.l1Size > MAX_L1_BYTES / 8) throw new Qcow2Error(path, `L1 table of ${h.l1Size} entries is above the ${MAX_L1_BYTES / 8} QEMU allows (corrupt image)`);
  if (h.refcountTableClusters * 2 ** h.clusterBits > MAX_REFTABLE_BYTES) {
    throw new Qcow2Error(path, `refcount table of ${h.refcountTableClusters} clusters is above the ${MAX_REFTABLE_BYTES} bytes QEMU allows (corrupt image)`);
  }
  if (h.l1Offset + h.l1Size * 8 > MAX_FILE_OFFSET || h.refcountTableOffset + h.refcountTableClusters * 2 ** h.clusterBits > MAX_FILE_OFFSET) {
    throw new Qcow2Error(path, "L1 or refcount table lies beyond any possible file offset (corrupt image)");
  }
  if (write) {
    if (h.version !== 3) throw refuse(`qcow2 version ${h.version} for writing`, "convert with qemu-img amend -o compat=1.1");
    if (h.incompatible & INCOMPAT_DIRTY) throw refuse("dirty bit set (lazy refcounts not written back)", "repair with qemu-img check -r all");
    if (h.incompatible & INCOMPAT_CORRUPT) throw refuse("corrupt bit set", "the image was marked corrupt; repair with qemu-img check -r all");
  }
}

/** Number of L1 entries needed for `size` bytes. */
export function l1SizeFor(size: number, clusterBits: number, extendedL2: boolean): number {
  const l2Entries = 2 ** clusterBits / (extendedL2 ? 16 : 8);
  return Math.ceil(size / (2 ** clusterBits * l2Entries));
}

/**
 * The refcount table size (in clusters) that covers the largest file this image can grow to:
 * header, L1, every L2 table, every data cluster, the refcount blocks and the table itself.
 */
export function worstCaseClusters(size: number, clusterBits: number, extendedL2: boolean): { total: number; tableClusters: number } {
  const cs = 2 ** clusterBits;
  const l1Size = l1SizeFor(size, clusterBits, extendedL2);
  const fixed = 1 + Math.ceil((l1Size * 8) / cs) + l1Size + Math.ceil(size / cs);
  const perBlock = cs / 2;
  let tableClusters = 1;
  let blocks = 0;
  for (;;) {
    const total = fixed + blocks + tableClusters;
    const nb = Math.ceil(total / perBlock);
    const nt = Math.ceil((nb * 8) / cs);
    if (nb === blocks && nt === tableClusters) return { total, tableClusters };
    blocks = nb;
    tableClusters = Math.max(nt, 1);
  }
}

export interface CreateOptions {
  /** Virtual size in bytes (rounded up to 512 like qemu-img). */
  size: number;
  /** Backing file name written into the header (relative to the overlay's directory, or absolute). */
  backingName: string;
  /** Standard L2 entries instead of extended (for QEMU older than 5.2). */
  compat?: boolean;
  /** Cluster size as a power of two; default 16 (64 KiB). */
  clusterBits?: number;
  /** Backing format written (default "raw"; BACKING_FORMAT_BUN over a device stack). */
  backingFormat?: string;
  /** The base identity extension's bytes (with BACKING_FORMAT_BUN). */
  baseIdentity?: Uint8Array;
  /** fdatasync before returning (default true; a throw-away overlay has nothing to keep). */
  sync?: boolean;
}

/**
 * Write a fresh, empty overlay into `fd` (an empty file): header with the backing format and
 * feature name extensions, the backing name, a refcount table sized for the worst case, one
 * refcount block and the L1 table. Synced before returning (unless `sync: false`).
 */
export function writeNewImage(fd: number, path: string, o: CreateOptions): void {
  const clusterBits = o.clusterBits ?? 16;
  const extendedL2 = !o.compat;
  if (extendedL2 && clusterBits < 14) throw new Qcow2Error(path, "extended L2 entries need clusters of at least 16 KiB");
  const cs = 2 ** clusterBits;
  const size = Math.ceil(o.size / 512) * 512;
  if (size <= 0) throw new Qcow2Error(path, "cannot create an overlay of an empty base");
  const name = new TextEncoder().encode(o.backingName);
  if (name.length > MAX_BACKING_NAME) throw new Qcow2Error(path, `backing file name longer than ${MAX_BACKING_NAME} bytes`);

  const l1Size = l1SizeFor(size, clusterBits, extendedL2);
  const l1Clusters = Math.max(1, Math.ceil((l1Size * 8) / cs));
  const { tableClusters } = worstCaseClusters(size, clusterBits, extendedL2);
  const perBlock = cs / 2;
  // Clusters: 0 header, 1.. refcount table, then refcount blocks for the initial clusters, then L1.
  let blocks = 1;
  while (Math.ceil((1 + tableClusters + blocks + l1Clusters) / perBlock) > blocks) blocks++;
  const rtOffset = cs;
  const rbOffset = rtOffset + tableClusters * cs;
  const l1Offset = rbOffset + blocks * cs;
  const used = 1 + tableClusters + blocks + l1Clusters;

  const h0 = new Uint8Array(cs);
  const dv = new DataView(h0.buffer);
  dv.setUint32(0, QCOW_MAGIC);
  dv.setUint32(4, 3);
  dv.setUint32(20, clusterBits);
  putU64(dv, 24, size);
  dv.setUint32(36, l1Size);
  putU64(dv, 40, l1Offset);
  putU64(dv, 48, rtOffset);
  dv.setUint32(56, tableClusters);
  dv.setUint32(76, extendedL2 ? INCOMPAT_EXTL2 : 0);
  dv.setUint32(96, 4);
  dv.setUint32(100, HEADER_LENGTH);
  let p = HEADER_LENGTH;
  const fmt = new TextEncoder().encode(o.backingFormat ?? "raw");
  dv.setUint32(p, EXT_BACKING_FORMAT); dv.setUint32(p + 4, fmt.length);
  h0.set(fmt, p + 8);
  p += 8 + Math.ceil(fmt.length / 8) * 8;
  if (o.baseIdentity !== undefined) {
    dv.setUint32(p, EXT_BASE_IDENTITY); dv.setUint32(p + 4, o.baseIdentity.length);
    h0.set(o.baseIdentity, p + 8);
    p += 8 + Math.ceil(o.baseIdentity.length / 8) * 8;
  }
  if (cs >= 8192) {
    dv.setUint32(p, EXT_FEATURE_TABLE); dv.setUint32(p + 4, FEATURE_NAMES.length * 48);
    p += 8;
    for (const [type, bit, fname] of FEATURE_NAMES) {
      h0[p] = type; h0[p + 1] = bit;
      h0.set(new TextEncoder().encode(fname), p + 2);
      p += 48;
    }
  }
  p += 8; // end marker (zeros)
  // readHeader reads 4 KiB: 112 header + 16 format + 8+2048 identity + 8+384 names + 8 + 1023 fit
  if (p + name.length > Math.min(cs, 4096)) throw new Qcow2Error(path, "backing file name does not fit in the header");
  putU64(dv, 8, p);
  dv.setUint32(16, name.length);
  h0.set(name, p);

  const rt = new Uint8Array(tableClusters * cs);
  const rtv = new DataView(rt.buffer);
  for (let b = 0; b < blocks; b++) putU64(rtv, b * 8, rbOffset + b * cs);
  const rb = new Uint8Array(blocks * cs);
  const rbv = new DataView(rb.buffer);
  for (let c = 0; c < used; c++) rbv.setUint16(c * 2, 1);

  if (fstatSync(fd).size !== 0) throw new Qcow2Error(path, "refusing to create an overlay over a non-empty file");
  writeAll(fd, h0, 0);
  writeAll(fd, rt, rtOffset);
  writeAll(fd, rb, rbOffset);
  writeAll(fd, new Uint8Array(l1Size * 8), l1Offset); // like qemu-img: only l1_size*8 bytes
  if (o.sync ?? true) fdatasyncSync(fd);
}

/** Create the overlay file `path` (must not exist). */
export function createImageFile(path: string, o: CreateOptions): void {
  const fd = openSync(path, "wx", 0o644);
  try {
    writeNewImage(fd, path, o);
  } finally {
    closeSync(fd);
  }
}

export function writeAll(fd: number, buf: Uint8Array, pos: number): void {
  let done = 0;
  while (done < buf.length) {
    const n = writeSync(fd, buf, done, buf.length - done, pos + done);
    if (n <= 0) throw Object.assign(new Error("short write"), { code: "EIO" });
    done += n;
  }
}

/** Read exactly `len` bytes at `pos`, zero-filling past the end of the file. */
export function readFull(fd: number, buf: Uint8Array, off: number, len: number, pos: number): void {
  let done = 0;
  while (done < len) {
    const n = readSync(fd, buf, off + done, len - done, pos + done);
    if (n <= 0) { buf.fill(0, off + done, off + len); return; }
    done += n;
  }
}

export { putU64, u64 };
