// The VHD on-disk structures (Microsoft's Virtual Hard Disk Image Format Specification): the
// 512-byte footer at the end of every VHD (and its copy at the start of dynamic ones), and the
// dynamic disk header. Big-endian fields, one's-complement checksums. Pure parsing: the caller
// reads the bytes.

export const VHD_COOKIE = "conectix";
export const FOOTER_SIZE = 512;
export const DISK_FIXED = 2;
export const DISK_DYNAMIC = 3;
export const DISK_DIFFERENCING = 4;
const TYPES: Record<number, string> = { 2: "fixed", 3: "dynamic", 4: "differencing" };

export class VhdError extends Error {}

export interface Footer {
  diskType: number;
  typeName: string;
  /** Offset of the dynamic disk header (dynamic and differencing disks). */
  dataOffset: number;
  currentSize: number;
  originalSize: number;
  creatorApp: string;
  creatorHost: string;
  geometry: { cylinders: number; heads: number; sectors: number };
}

const u32 = (b: Uint8Array, a: number) => ((b[a]! << 24) | (b[a + 1]! << 16) | (b[a + 2]! << 8) | b[a + 3]!) >>> 0;
const u64 = (b: Uint8Array, a: number) => u32(b, a) * 2 ** 32 + u32(b, a + 4);
const text = (b: Uint8Array, a: number, n: number) => new TextDecoder("latin1").decode(b.subarray(a, a + n));

/** One's complement of the byte sum, with the 4 checksum bytes at `at` counted as zero. */
export function vhdChecksum(b: Uint8Array, at: number): number {
  let sum = 0;
  for (let i = 0; i < b.length; i++) if (i < at || i >= at + 4) sum += b[i]!;
  return ~sum >>> 0;
}

export function isFooter(b: Uint8Array): boolean {
  return b.length >= 8 && text(b, 0, 8) === VHD_COOKIE;
}

/** Parse and check a footer. `where` names it in errors. */
export function parseFooter(b: Uint8Array, where: string): Footer {
  if (!isFooter(b)) throw new VhdError(`${where}: no "conectix" cookie: not a VHD footer`);
  const stored = u32(b, 64), computed = vhdChecksum(b, 64);
  if (stored !== computed) {
    throw new VhdError(`${where}: VHD footer checksum mismatch (stored 0x${stored.toString(16).padStart(8, "0")}, computed 0x${computed.toString(16).padStart(8, "0")}): the footer is damaged`);
  }
  const version = u32(b, 12);
  if (version >>> 16 !== 1) throw new VhdError(`${where}: unsupported VHD format version ${(version >>> 16)}.${version & 0xffff}`);
  const diskType = u32(b, 60);
  if (!(diskType in TYPES)) throw new VhdError(`${where}: unknown VHD disk type ${diskType}`);
  const hi = u32(b, 16), lo = u32(b, 20);
  const currentSize = u64(b, 48);
  if (currentSize > Number.MAX_SAFE_INTEGER) throw new VhdError(`${where}: size ${currentSize} beyond 2^53`);
  const host = text(b, 36, 4);
  return {
    diskType, typeName: TYPES[diskType]!,
    dataOffset: hi === 0xffffffff && lo === 0xffffffff ? -1 : hi * 2 ** 32 + lo,
    currentSize, originalSize: u64(b, 40),
    creatorApp: text(b, 28, 4).replace(/\0/g, "").trim(),
    creatorHost: host === "Wi2k" ? "Windows" : host === "Mac " ? "Macintosh" : host.replace(/\0/g, "").trim(),
    geometry: { cylinders: (b[56]! << 8) | b[57]!, heads: b[58]!, sectors: b[59]! },
  };
}

export interface DynamicHeader {
  tableOffset: number;
  maxEntries: number;
  blockSize: number;
  parentName: string;
}

export function parseDynamicHeader(b: Uint8Array, where: string): DynamicHeader {
  if (text(b, 0, 8) !== "cxsparse") throw new VhdError(`${where}: no "cxsparse" cookie: the dynamic disk header is missing or damaged`);
  const stored = u32(b, 36), computed = vhdChecksum(b, 36);
  if (stored !== computed) {
    throw new VhdError(`${where}: VHD dynamic header checksum mismatch (stored 0x${stored.toString(16).padStart(8, "0")}, computed 0x${computed.toString(16).padStart(8, "0")})`);
  }
  const blockSize = u32(b, 32);
  if (blockSize < 512 || blockSize > 256 * 1024 * 1024 || (blockSize & (blockSize - 1)) !== 0) {
    throw new VhdError(`${where}: block size ${blockSize} is not a power of two between 512 bytes and 256 MiB`);
  }
  const nameBytes = b.subarray(64, 64 + 512);
  let parentName = "";
  for (let i = 0; i + 1 < nameBytes.length; i += 2) {
    const c = (nameBytes[i]! << 8) | nameBytes[i + 1]!;
    if (c === 0) break;
    parentName += String.fromCharCode(c);
  }
  return { tableOffset: u64(b, 16), maxEntries: u32(b, 28), blockSize, parentName };
}
