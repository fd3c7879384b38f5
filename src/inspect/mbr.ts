// The DOS (MBR) partition table: four primary entries in sector 0 and a chain of extended boot
// records for logical partitions, numbered as Linux and sfdisk number them (logicals from 5).
// Accepted and refused as blkid does (55AA, boot flags 0 or 0x80, no GPT protective entry); the
// EBR chain is followed with a visited set and a hard cap, so a loop or an absurd chain ends in a
// warning, never a hang.
import { le32 } from "./bytes.ts";
import { isExtendedType, mbrTypeName } from "./ptypes.ts";
import type { Reader } from "./reader.ts";
import type { Partition, PartitionTable } from "./types.ts";

const SECTOR = 512;
/** More logical partitions than this is not a disk anyone made on purpose. */
export const MAX_LOGICAL = 128;

export interface MbrEntry { boot: number; type: number; lba: number; sectors: number }

export function mbrEntries(s0: Uint8Array): MbrEntry[] {
  const out: MbrEntry[] = [];
  for (let i = 0; i < 4; i++) {
    const o = 446 + 16 * i;
    out.push({ boot: s0[o]!, type: s0[o + 4]!, lba: le32(s0, o + 8), sectors: le32(s0, o + 12) });
  }
  return out;
}

export const hasBootSignature = (s: Uint8Array): boolean => s[510] === 0x55 && s[511] === 0xaa;

/** Sector 0 looks like an MBR by blkid's rules (the FAT/NTFS/exFAT exclusions are the caller's). */
export function looksLikeMbr(s0: Uint8Array): boolean {
  if (!hasBootSignature(s0)) return false;
  const e = mbrEntries(s0);
  if (e.some((p) => p.boot !== 0 && p.boot !== 0x80)) return false;
  return true;
}

/** True if one of the four entries is a GPT protective (0xEE) entry. */
export const hasProtectiveEntry = (s0: Uint8Array): boolean => mbrEntries(s0).some((p) => p.type === 0xee);

/** Parse the MBR table of sector 0 (already known to look like one). */
export async function parseMbr(r: Reader, s0: Uint8Array, warn: (m: string) => void): Promise<PartitionTable> {
  const id = le32(s0, 440);
  const parts: Partition[] = [];
  const entries = mbrEntries(s0);
  let extended: { start: number; size: number } | null = null;
  entries.forEach((p, i) => {
    if (p.sectors === 0) return; // Linux keeps the number of an empty primary unused
    const kind = isExtendedType(p.type) ? "extended" : "primary";
    parts.push(entry(i + 1, kind, p, p.lba * SECTOR));
    if (kind === "extended") {
      if (extended) warn(`more than one extended partition (p${i + 1} ignored for logical partitions)`);
      else extended = { start: p.lba * SECTOR, size: p.sectors * SECTOR };
    }
  });
  if (extended) parts.push(...await logicals(r, extended, warn));
  return { type: "dos", id: id ? id.toString(16).padStart(8, "0") : undefined, partitions: parts };
}

function entry(number: number, kind: Partition["kind"], p: MbrEntry, start: number): Partition {
  const t: Partition = {
    number, kind, start, size: p.sectors * SECTOR, type: p.type.toString(16), typeName: mbrTypeName(p.type),
    bootable: p.boot === 0x80,
  };
  if (p.type === 0xef) t.esp = true;
  return t;
}

/** Follow the EBR chain inside the extended partition `ext` (byte offsets). */
async function logicals(r: Reader, ext: { start: number; size: number }, warn: (m: string) => void): Promise<Partition[]> {
  const out: Partition[] = [];
  if (ext.start === 0) { warn("extended partition starts at sector 0; logical partitions ignored"); return out; }
  const seen = new Set<number>();
  const starts = new Set<number>();
  let cur = ext.start;
  let curSize = ext.size;
  let number = 5;
  for (let hops = 0; ; hops++) {
    if (seen.has(cur)) { warn(`extended boot records form a loop (EBR at sector ${cur / SECTOR} seen twice); stopped`); break; }
    if (hops >= MAX_LOGICAL) { warn(`more than ${MAX_LOGICAL} extended boot records; stopped`); break; }
    if (!r.within(cur, SECTOR)) { warn(`extended boot record at sector ${cur / SECTOR} lies past the end of the disk`); break; }
    seen.add(cur);
    const s = await r.read(cur, SECTOR);
    if (!hasBootSignature(s)) { if (hops > 0) warn(`extended boot record at sector ${cur / SECTOR} has no 55AA signature; chain ends there`); break; }
    const es = mbrEntries(s);
    es.forEach((p, i) => {
      if (p.sectors === 0 || isExtendedType(p.type)) return;
      const rel = p.lba * SECTOR, len = p.sectors * SECTOR;
      const abs = cur + rel;
      if (i >= 2 && (rel + len > curSize || abs < ext.start || abs + len > ext.start + ext.size)) return; // as blkid: junk
      if (starts.has(abs)) { warn(`EBR at sector ${cur / SECTOR} repeats the logical partition at sector ${abs / SECTOR}; ignored`); return; }
      starts.add(abs);
      if (abs + len > ext.start + ext.size) warn(`logical partition ${number} ends past its extended partition`);
      out.push(entry(number++, "logical", p, abs));
    });
    const link = es.find((p) => p.sectors !== 0 && isExtendedType(p.type));
    if (!link || link.lba === 0) break;
    cur = ext.start + link.lba * SECTOR;
    curSize = link.sectors * SECTOR;
  }
  return out;
}
