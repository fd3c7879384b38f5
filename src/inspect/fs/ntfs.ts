// NTFS: the boot sector's BPB checked as blkid checks it, the volume serial (16 uppercase hex
// digits) and the label from the $VOLUME_NAME attribute of MFT record 3, with the record's update
// sequence fixups applied and its attribute walk bounded by the record size.
import { hasText, hex, le16, le32, le64 } from "../bytes.ts";
import type { Reader } from "../reader.ts";
import type { FsInfo } from "../types.ts";

const MAX_CLUSTER = 2 * 1024 * 1024;

/** The NTFS boot-sector checks; returns what locating the MFT needs, or null. */
export function ntfsBootSector(s: Uint8Array): { sectorSize: number; clusterSize: number; recordSize: number; mftOffset: number; sectors: number } | null {
  if (!hasText(s, 3, "NTFS    ")) return null;
  const ss = le16(s, 0x0b);
  if (ss < 256 || ss > 4096) return null;
  const spcByte = s[0x0d]!;
  let spc: number;
  if ([1, 2, 4, 8, 16, 32, 64, 128].includes(spcByte)) spc = spcByte;
  else if (spcByte >= 240 && spcByte <= 249) spc = 2 ** (256 - spcByte);
  else return null;
  if (ss * spc > MAX_CLUSTER) return null;
  if (le16(s, 0x0e) || le16(s, 0x11) || le16(s, 0x13) || le16(s, 0x16) || le32(s, 0x20) || s[0x10]) return null;
  const cpr = s[0x40]!;
  let recordSize: number;
  if (cpr >= 0xe1 && cpr <= 0xf7) recordSize = 2 ** (256 - cpr);
  else if ([1, 2, 4, 8, 16, 32, 64].includes(cpr)) recordSize = cpr * spc * ss;
  else return null;
  const sectors = le64(s, 0x28);
  const clusters = Math.floor(sectors / spc);
  const mft = le64(s, 0x30), mirr = le64(s, 0x38);
  if (mft > clusters || mirr > clusters) return null;
  if (recordSize < 4 || recordSize > 65536) return null;
  return { sectorSize: ss, clusterSize: ss * spc, recordSize, mftOffset: mft * ss * spc, sectors };
}

/** Undo the update sequence fixups of a multi-sector record in place; false if they do not match. */
function applyFixups(rec: Uint8Array): boolean {
  const usaOfs = le16(rec, 4), usaCount = le16(rec, 6);
  if (usaCount === 0) return true;
  if (usaOfs + usaCount * 2 > rec.length) return false;
  const usn = le16(rec, usaOfs);
  for (let i = 1; i < usaCount; i++) {
    const end = i * 512 - 2;
    if (end + 2 > rec.length) break;
    if (le16(rec, end) !== usn) return false;
    rec[end] = rec[usaOfs + i * 2]!;
    rec[end + 1] = rec[usaOfs + i * 2 + 1]!;
  }
  return true;
}

export async function probeNtfs(r: Reader): Promise<FsInfo | null> {
  if (r.size < 512) return null;
  const s = await r.read(0, 512);
  const bs = ntfsBootSector(s);
  if (!bs) return null;
  const first = await r.read(bs.mftOffset, bs.recordSize);
  if (!hasText(first, 0, "FILE")) return null;
  const rec = await r.read(bs.mftOffset + 3 * bs.recordSize, bs.recordSize);
  if (!hasText(rec, 0, "FILE")) return null;
  let label: string | undefined;
  if (applyFixups(rec)) {
    let off = le16(rec, 0x14);
    const allocated = le32(rec, 0x1c);
    for (let n = 0; n < 64 && off + 16 <= rec.length && off <= allocated; n++) {
      const type = le32(rec, off), len = le32(rec, off + 4);
      if (len === 0 || type === 0xffffffff) break;
      if (type === 0x60) {
        const vlen = le32(rec, off + 16), voff = le16(rec, off + 20);
        if (off + voff + vlen <= rec.length) {
          let t = "";
          for (let i = 0; i + 1 < vlen; i += 2) t += String.fromCharCode(le16(rec, off + voff + i));
          label = t.replace(/\s+$/, "");
        }
        break;
      }
      off += len;
    }
  }
  // blkid prints the serial as one 64-bit number: most significant byte first
  const serial = hex(Uint8Array.from(s.subarray(0x48, 0x50)).reverse(), 0, 8).toUpperCase();
  const info: FsInfo = { type: "ntfs", uuid: serial, size: bs.sectors * bs.sectorSize };
  if (label) info.label = label;
  return info;
}
