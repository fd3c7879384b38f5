// ISO 9660 (with Joliet) and its El Torito boot catalog: the volume descriptors from sector 16
// (at most 16 of them, as blkid reads), the label merged from the PVD and Joliet as blkid merges
// them, the UUID made of the modification (else creation) date, and the boot catalog's entries
// (validation entry checked, at most MAX_CATALOG_ENTRIES read).
import { be16, fixedText, hasText, le16, le32, utf16be } from "../bytes.ts";
import type { Reader } from "../reader.ts";
import type { ElToritoEntry, FsInfo } from "../types.ts";

const SECTOR = 2048;
const FIRST = 16 * SECTOR;
const MAX_DESCRIPTORS = 16;
export const MAX_CATALOG_ENTRIES = 256;

export interface IsoResult { fs: FsInfo; catalogLba?: number }

export async function probeIso9660(r: Reader): Promise<IsoResult | null> {
  if (r.size < FIRST + SECTOR) return null;
  let pvd: Uint8Array | null = null, joliet: Uint8Array | null = null, boot: Uint8Array | null = null;
  for (let i = 0; i < MAX_DESCRIPTORS && (!pvd || !joliet || !boot); i++) {
    const d = await r.read(FIRST + i * SECTOR, SECTOR);
    if (!hasText(d, 1, "CD001")) { if (i === 0) return null; break; }
    const type = d[0]!;
    if (type === 0xff) break;
    if (type === 0 && !boot) boot = d;
    else if (type === 1 && !pvd) pvd = d;
    else if (type === 2 && !joliet) {
      const esc = String.fromCharCode(d[88]!, d[89]!, d[90]!);
      if (esc === "%/@" || esc === "%/C" || esc === "%/E") joliet = d;
    }
  }
  if (!pvd) return null;
  const fs: FsInfo = { type: "iso9660", size: le32(pvd, 80) * le16(pvd, 128) };
  if (joliet) fs.version = "Joliet Extension";
  const uuid = dateUuid(pvd, 830) ?? dateUuid(pvd, 813);
  if (uuid) fs.uuid = uuid;
  const label = joliet ? (mergeLabel(joliet.subarray(40, 72), pvd.subarray(40, 72)) ?? utf16be(joliet, 40, 32)) : fixedText(pvd, 40, 32);
  if (label) fs.label = label;
  const out: IsoResult = { fs };
  if (boot && hasText(boot, 7, "EL TORITO SPECIFICATION")) out.catalogLba = le32(boot, 0x47);
  return out;
}

function dateUuid(pvd: Uint8Array, o: number): string | null {
  const d = String.fromCharCode(...pvd.subarray(o, o + 16));
  if (/^0{16}$/.test(d) && pvd[o + 16] === 0) return null;
  return `${d.slice(0, 4)}-${d.slice(4, 6)}-${d.slice(6, 8)}-${d.slice(8, 10)}-${d.slice(10, 12)}-${d.slice(12, 14)}-${d.slice(14, 16)}`;
}

/**
 * Joliet holds at most 16 characters of the label, the PVD up to 32 in a restricted ASCII ('_'
 * for what it cannot represent). When the Joliet label is a prefix of the PVD one (ignoring '_'
 * and case), the full label is Joliet's characters followed by the rest of the PVD's; otherwise
 * null (and Joliet's own label is used). This is how blkid reconstructs it.
 */
function mergeLabel(utf16: Uint8Array, ascii: Uint8Array): string | null {
  let out = "";
  let a = 0;
  for (let u = 0; u + 1 < 32 && a < 32; u += 2, a++) {
    const hi = utf16[u]!, lo = utf16[u + 1]!;
    if (hi >= 0xd8 && hi <= 0xdb && u + 3 < 32 && utf16[u + 2]! >= 0xdc && utf16[u + 2]! <= 0xdf) {
      out += String.fromCharCode(be16(utf16, u));
      u += 2;
    }
    const c = ascii[a]!;
    const unit = be16(utf16, u);
    if (c === 0x5f) out += String.fromCharCode(unit);
    else if (hi === 0 && lo === 0x5f) out += String.fromCharCode(c);
    else if (hi === 0 && upper(c) === upper(lo)) out += String.fromCharCode(isUpper(c) ? lo : c);
    else return null;
  }
  for (; a < 32; a++) out += String.fromCharCode(ascii[a]!);
  const nul = out.indexOf("\0");
  return (nul >= 0 ? out.slice(0, nul) : out).replace(/\s+$/, "");
}
const isUpper = (c: number) => c >= 0x41 && c <= 0x5a;
const upper = (c: number) => (c >= 0x61 && c <= 0x7a ? c - 32 : c);

const PLATFORMS: Record<number, string> = { 0: "x86 BIOS", 1: "PowerPC", 2: "Mac", 0xef: "UEFI" };
const MEDIA = ["no emulation", "1.2M floppy", "1.44M floppy", "2.88M floppy", "hard disk"];

/** Read the El Torito boot catalog at `lba` (2048-byte sectors). */
export async function elTorito(r: Reader, lba: number, warn: (m: string) => void): Promise<ElToritoEntry[]> {
  if (!r.within(lba * SECTOR, 32)) { warn(`El Torito boot catalog at LBA ${lba} lies past the end of the image`); return []; }
  const cat = await r.read(lba * SECTOR, SECTOR * 4);
  if (cat[0] !== 1 || cat[30] !== 0x55 || cat[31] !== 0xaa) { warn("El Torito boot catalog has no valid validation entry"); return []; }
  let sum = 0;
  for (let i = 0; i < 32; i += 2) sum = (sum + le16(cat, i)) & 0xffff;
  if (sum !== 0) warn("El Torito validation entry checksum is wrong");
  const out: ElToritoEntry[] = [];
  let platform = cat[1]!;
  const entry = (o: number) => {
    const e: ElToritoEntry = {
      platform: PLATFORMS[platform] ?? `platform 0x${platform.toString(16)}`,
      emulation: MEDIA[cat[o + 1]! & 0x0f] ?? `media type ${cat[o + 1]! & 0x0f}`,
      bootable: cat[o] === 0x88, loadRba: le32(cat, o + 8), sectors: le16(cat, o + 6),
    };
    out.push(e);
  };
  entry(32); // initial/default entry
  let o = 64;
  let n = 1;
  while (o + 32 <= cat.length && n < MAX_CATALOG_ENTRIES) {
    const h = cat[o]!;
    if (h !== 0x90 && h !== 0x91) break; // no further section header
    platform = cat[o + 1]!;
    const count = le16(cat, o + 2);
    o += 32;
    for (let k = 0; k < count && o + 32 <= cat.length && n < MAX_CATALOG_ENTRIES; k++, n++) {
      if (cat[o] === 0x88 || cat[o] === 0x00) entry(o);
      o += 32;
      while (o + 32 <= cat.length && cat[o] === 0x44) o += 32; // section entry extensions
    }
    if (h === 0x91) break;
  }
  if (n >= MAX_CATALOG_ENTRIES) warn(`El Torito catalog has more than ${MAX_CATALOG_ENTRIES} entries; the rest were not read`);
  return out;
}
