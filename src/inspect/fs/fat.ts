// FAT12/16/32 (blkid's "vfat") and exFAT: boot-sector checks as blkid makes them, the volume label
// from the root directory (walking FAT32 and exFAT cluster chains a bounded number of steps), the
// serial number as blkid spells it (XXXX-XXXX, uppercase).
import { fixedText, hasText, isPowerOfTwo, le16, le32, le64, utf16le } from "../bytes.ts";
import type { Reader } from "../reader.ts";
import type { FsInfo } from "../types.ts";

const FAT12_MAX = 0xff4, FAT16_MAX = 0xfff4, FAT32_MAX = 0x0ffffff6;
const NO_NAME = "NO NAME    ";
/** Clusters of a FAT32 root directory searched for the label (blkid stops after 99). */
const MAX_ROOT_CLUSTERS = 99;

export interface FatGeometry { version: "FAT12" | "FAT16" | "FAT32"; sectorSize: number; sectorsPerTrack: number; heads: number; totalSectors: number }

/** The FAT boot-sector checks of blkid (magic strings, or a jump opcode / 55AA with a sane BPB). */
export function fatBootSector(s: Uint8Array): { clusters: number; fatSize: number; geometry: FatGeometry } | null {
  const strongMagic = hasText(s, 0x52, "MSWIN") || hasText(s, 0x52, "FAT32   ") || hasText(s, 0x36, "MSDOS")
    || hasText(s, 0x36, "FAT16   ") || hasText(s, 0x36, "FAT12   ") || hasText(s, 0x36, "FAT     ");
  if (!strongMagic) {
    const weak = s[0] === 0xeb || s[0] === 0xe9 || (s[510] === 0x55 && s[511] === 0xaa);
    if (!weak || s[510] !== 0x55 || s[511] !== 0xaa) return null;
    if (hasText(s, 0x36, "JFS     ") || hasText(s, 0x36, "HPFS    ")) return null;
  }
  if (hasText(s, 3, "EXFAT   ") || hasText(s, 3, "NTFS    ") || hasText(s, 3, "-FVE-FS-")) return null;
  const fats = s[0x10]!, reserved = le16(s, 0x0e), media = s[0x15]!, spc = s[0x0d]!;
  if (fats === 0 || reserved === 0 || !(media >= 0xf8 || media === 0xf0) || !isPowerOfTwo(spc)) return null;
  const ss = le16(s, 0x0b);
  if (!isPowerOfTwo(ss) || ss < 512 || ss > 4096) return null;
  const dirEntries = le16(s, 0x11);
  const total = le16(s, 0x13) || le32(s, 0x20);
  const fat16len = le16(s, 0x16);
  const fatLen = fat16len || le32(s, 0x24);
  const fatSize = fatLen * fats;
  const dirSectors = Math.ceil((dirEntries * 32) / ss);
  const used = reserved + fatSize + dirSectors;
  // blkid computes this in unsigned 32-bit arithmetic: a negative count wraps to a huge one
  const clusters = Math.floor((((total - used) >>> 0)) / spc);
  const max = !fat16len && le32(s, 0x24) ? FAT32_MAX : clusters > FAT12_MAX ? FAT16_MAX : FAT12_MAX;
  if (clusters > max) return null;
  const version = fat16len ? (clusters < FAT12_MAX ? "FAT12" : "FAT16") : "FAT32";
  return { clusters, fatSize, geometry: { version, sectorSize: ss, sectorsPerTrack: le16(s, 0x18), heads: le16(s, 0x1a), totalSectors: total } };
}

/** The first volume-label entry of `n` directory entries in `dir` (blkid's rules), or null. */
function labelEntry(dir: Uint8Array, n: number): string | null {
  for (let i = 0; i < n && (i + 1) * 32 <= dir.length; i++) {
    const e = i * 32;
    if (dir[e] === 0) break;
    const attr = dir[e + 11]!;
    if (dir[e] === 0xe5 || le16(dir, e + 20) !== 0 || le16(dir, e + 26) !== 0 || (attr & 0x3f) === 0x0f) continue;
    if ((attr & 0x18) === 0x08) {
      const name = dir.slice(e, e + 11);
      if (name[0] === 0x05) name[0] = 0xe5;
      return fixedText(name, 0, 11);
    }
  }
  return null;
}

export async function probeVfat(r: Reader): Promise<FsInfo | null> {
  if (r.size < 512) return null;
  const s = await r.read(0, 512);
  const bs = fatBootSector(s);
  if (!bs) return null;
  const ss = bs.geometry.sectorSize;
  const reserved = le16(s, 0x0e);
  let label: string | null = null;
  let serial: Uint8Array | null = null;
  if (bs.geometry.version !== "FAT32") {
    const entries = le16(s, 0x11);
    const dir = await r.read((reserved + bs.fatSize) * ss, Math.min(entries * 32, 1 << 20));
    label = labelEntry(dir, entries);
    if (s[0x26] === 0x28 || s[0x26] === 0x29) serial = s.subarray(0x27, 0x2b);
  } else {
    const spc = s[0x0d]!;
    const clusterBytes = spc * ss;
    const dataStart = reserved + bs.fatSize;
    const fatEntries = Math.floor((le32(s, 0x24) * ss) / 4);
    let next = le32(s, 0x2c);
    const seen = new Set<number>();
    for (let loops = 0; next && next < fatEntries && loops < MAX_ROOT_CLUSTERS && !seen.has(next); loops++) {
      seen.add(next);
      const off = (dataStart + (next - 2) * spc) * ss;
      if (off < 0 || clusterBytes > 1 << 20) break;
      label = labelEntry(await r.read(off, clusterBytes), clusterBytes / 32);
      if (label !== null) break;
      next = le32(await r.read(reserved * ss + next * 4, 4), 0) & 0x0fffffff;
    }
    serial = s.subarray(0x43, 0x47);
    const fsinfo = le16(s, 0x30);
    if (fsinfo) {
      const fi = await r.read(fsinfo * ss, 512);
      const sig1 = le32(fi, 0), sig2 = le32(fi, 0x1e4);
      if (sig1 !== 0x41615252 && sig1 !== 0x41645252 && sig1 !== 0) return null;
      if (sig2 !== 0x61417272 && sig2 !== 0) return null;
    }
  }
  const info: FsInfo = { type: "vfat", version: bs.geometry.version, size: bs.geometry.totalSectors * ss };
  if (label) info.label = label;
  if (serial) info.uuid = serialString(serial);
  return info;
}

/** XXXX-XXXX from a little-endian 32-bit serial number (FAT, exFAT). */
function serialString(b: Uint8Array): string {
  const h = (x: number) => x.toString(16).toUpperCase().padStart(2, "0");
  return `${h(b[3]!)}${h(b[2]!)}-${h(b[1]!)}${h(b[0]!)}`;
}

/** Directory entries of an exFAT root directory searched for the label (blkid: 10000). */
const EXFAT_MAX_ENTRIES = 10000;

export async function probeExfat(r: Reader): Promise<FsInfo | null> {
  if (r.size < 512) return null;
  const s = await r.read(0, 512);
  if (!hasText(s, 3, "EXFAT   ")) return null;
  const blockBits = s[0x6c]!, bpcBits = s[0x6d]!;
  if (blockBits < 9 || blockBits > 12 || blockBits + bpcBits > 25) return null;
  const block = 2 ** blockBits;
  const clusterSize = block * 2 ** bpcBits;
  const fatStart = le32(s, 0x50) * block;
  const heapStart = le32(s, 0x58);
  const clusterOffset = (c: number) => (heapStart + (c - 2) * 2 ** bpcBits) * block;
  let cluster = le32(s, 0x60);
  let off = clusterOffset(cluster);
  let label: string | undefined;
  const seen = new Set<number>([cluster]);
  for (let i = 0; i < EXFAT_MAX_ENTRIES; i++) {
    if (off < 0 || off >= r.size) break;
    const e = await r.read(off, 32);
    if (e[0] === 0x00) break;
    if (e[0] === 0x83) { label = utf16le(e, 2, Math.min(e[1]! * 2, 22)); break; }
    off += 32;
    if (off % clusterSize === 0) {
      cluster = le32(await r.read(fatStart + cluster * 4, 4), 0);
      if (cluster < 2 || cluster > 0x0ffffff6 || seen.has(cluster)) break;
      seen.add(cluster);
      off = clusterOffset(cluster);
    }
  }
  const info: FsInfo = { type: "exfat", version: `${s[0x69]}.${s[0x68]}`, uuid: serialString(s.subarray(0x64, 0x68)), size: le64(s, 0x48) * block };
  if (label) info.label = label;
  return info;
}
