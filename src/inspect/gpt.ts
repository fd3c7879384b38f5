// The GUID partition table: header at LBA 1 (the backup at the last LBA when the primary is
// damaged), entries checked against their CRC-32 and the usable area. Counts and entry sizes are
// bounded before anything is read, so an absurd header costs one warning, not gigabytes of reads.
import { crc32, guid, hasText, le32, le64, utf16le } from "./bytes.ts";
import { GPT_ESP, gptTypeName } from "./ptypes.ts";
import { MAX_READ, type Reader } from "./reader.ts";
import type { Partition, PartitionTable } from "./types.ts";

/** Entries past this many are not read (the spec's minimum array holds 128). */
export const MAX_GPT_ENTRIES = 4096;

interface Header {
  lba: number; altLba: number; firstLba: number; lastLba: number; disk: string;
  entriesLba: number; count: number; entrySize: number; entriesCrc: number;
}

/** Read and check the header at `lba`; a reason string when it is not a valid header. */
async function header(r: Reader, lba: number, ss: number): Promise<Header | string> {
  if (!r.within(lba * ss, ss)) return `LBA ${lba} lies past the end of the disk`;
  const b = await r.read(lba * ss, ss);
  if (!hasText(b, 0, "EFI PART")) return "no EFI PART signature";
  const size = le32(b, 12);
  if (size < 92 || size > ss) return `header size ${size} is out of range`;
  const copy = b.slice(0, size);
  copy.fill(0, 16, 20);
  if (crc32(copy) !== le32(b, 16)) return "header CRC mismatch";
  const h: Header = {
    lba: le64(b, 24), altLba: le64(b, 32), firstLba: le64(b, 40), lastLba: le64(b, 48), disk: guid(b, 56),
    entriesLba: le64(b, 72), count: le32(b, 80), entrySize: le32(b, 84), entriesCrc: le32(b, 88),
  };
  if (h.lba !== lba) return `header says it is at LBA ${h.lba}, found at ${lba}`;
  if (h.entrySize < 128 || h.entrySize % 8 !== 0 || h.entrySize > 4096) return `partition entry size ${h.entrySize} is invalid`;
  if (h.firstLba > h.lastLba) return `first usable LBA ${h.firstLba} is after the last ${h.lastLba}`;
  return h;
}

/**
 * Parse the GPT of a disk whose sector 0 holds a protective MBR (or that has "EFI PART" at LBA 1).
 * Returns null when neither header is valid; problems are reported through `warn`.
 */
export async function parseGpt(r: Reader, warn: (m: string) => void, ss = 512): Promise<PartitionTable | null> {
  const primary = await header(r, 1, ss);
  let h: Header;
  if (typeof primary === "string") {
    const last = Math.floor(r.size / ss) - 1;
    const backup = last > 1 ? await header(r, last, ss) : "disk too small";
    if (typeof backup === "string") {
      warn(`GPT primary header invalid (${primary}) and no valid backup header (${backup})`);
      return null;
    }
    warn(`GPT primary header invalid (${primary}); using the backup header at LBA ${last}`);
    h = backup;
  } else {
    h = primary;
    const last = Math.floor(r.size / ss) - 1;
    if (h.altLba > last) warn(`GPT backup header (LBA ${h.altLba}) lies past the end of the disk (last LBA ${last}): truncated image?`);
    else if (h.altLba < last) warn(`GPT backup header is at LBA ${h.altLba}, not at the last LBA ${last}: the disk grew after partitioning`);
  }
  const totalLbas = Math.floor(r.size / ss);
  if (h.lastLba >= totalLbas) warn(`GPT last usable LBA ${h.lastLba} lies past the end of the disk (${totalLbas} sectors)`);
  let count = h.count;
  if (count > MAX_GPT_ENTRIES || count * h.entrySize > MAX_READ) {
    warn(`GPT claims ${h.count} entries of ${h.entrySize} bytes; only the first ${Math.min(MAX_GPT_ENTRIES, Math.floor(MAX_READ / h.entrySize))} read`);
    count = Math.min(MAX_GPT_ENTRIES, Math.floor(MAX_READ / h.entrySize));
  }
  const bytes = count * h.entrySize;
  if (!r.within(h.entriesLba * ss, bytes)) warn(`GPT entry array at LBA ${h.entriesLba} runs past the end of the disk`);
  const arr = await r.read(h.entriesLba * ss, bytes);
  if (count === h.count && crc32(arr) !== h.entriesCrc) warn("GPT partition entry array CRC mismatch");
  const parts: Partition[] = [];
  for (let i = 0; i < count; i++) {
    const o = i * h.entrySize;
    if (arr.subarray(o, o + 16).every((x) => x === 0)) continue;
    const type = guid(arr, o).toUpperCase();
    const first = le64(arr, o + 32), last = le64(arr, o + 40);
    const n = i + 1;
    if (last < first) { warn(`GPT partition ${n} ends (LBA ${last}) before it starts (LBA ${first}); ignored`); continue; }
    if (first < h.firstLba || last > h.lastLba) { warn(`GPT partition ${n} (LBA ${first}-${last}) lies outside the usable area ${h.firstLba}-${h.lastLba}; ignored`); continue; }
    if ((last + 1) * ss > r.size) { warn(`GPT partition ${n} (LBA ${first}-${last}) runs past the end of the disk; ignored`); continue; }
    const attrs = arr[o + 48]!;
    const p: Partition = {
      number: n, kind: "gpt", start: first * ss, size: (last - first + 1) * ss, type, typeName: gptTypeName(type),
      uuid: guid(arr, o + 16).toUpperCase(), bootable: (attrs & 4) !== 0,
    };
    const name = utf16le(arr, o + 56, Math.min(72, h.entrySize - 56));
    if (name) p.name = name;
    if (type === GPT_ESP) p.esp = true;
    parts.push(p);
  }
  return { type: "gpt", id: h.disk, partitions: parts, firstLba: h.firstLba, lastLba: h.lastLba };
}
