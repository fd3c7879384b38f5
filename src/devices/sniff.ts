// What an image file holds, from its content (magic numbers, sizes, sync patterns, CD001) rather
// than its extension alone: the first step of opening. Pure over a probe of the file's first and
// last bytes, so it applies equally to a file and to the decompressed bytes of a container.
import { hasSync, RAW_SECTOR } from "./cd/sector.ts";
import { CD001_OFFSET, hasCd001, ISO_SECTOR } from "./iso.ts";

export type Kind = "xz" | "gzip" | "zip" | "vhd" | "qcow2" | "iso" | "cue" | "ccd" | "rawcd" | "raw";

/** What the sniffer needs: the first HEAD_BYTES (fewer if the image is smaller), the last 512 (or none), the size and a name. */
export interface Probe { head: Uint8Array; tail: Uint8Array; size: number; name: string }
export const HEAD_BYTES = CD001_OFFSET + 2048;

const starts = (b: Uint8Array, m: number[], at = 0) => b.length >= at + m.length && m.every((x, i) => b[at + i] === x);
const ascii = (s: string) => [...s].map((c) => c.charCodeAt(0));

export const MAGIC = {
  xz: [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00],
  gzip: [0x1f, 0x8b, 0x08],
  zip: [0x50, 0x4b, 0x03, 0x04],
  zipEmpty: [0x50, 0x4b, 0x05, 0x06],
  zipSpanned: [0x50, 0x4b, 0x07, 0x08],
  qcow2: [0x51, 0x46, 0x49, 0xfb],
  vhd: ascii("conectix"),
};

const CUE_WORDS = /^(FILE|REM|TITLE|PERFORMER|SONGWRITER|CATALOG|CDTEXTFILE|TRACK|FLAGS|INDEX|ISRC|PREGAP|POSTGAP)\b/i;

/** The first line of text, if the head looks like text (no NUL, no other control bytes but tab/CR/LF/^Z). */
function textStart(head: Uint8Array): string | null {
  let b = head;
  if (starts(b, [0xef, 0xbb, 0xbf])) b = b.subarray(3);
  const n = Math.min(b.length, 4096);
  for (let i = 0; i < n; i++) {
    const c = b[i]!;
    if (c < 32 && c !== 9 && c !== 10 && c !== 13 && c !== 26) return null;
  }
  return new TextDecoder("latin1").decode(b.subarray(0, n)).trimStart();
}

/** True for a CUE sheet's text (a UTF-16 sheet counts too: its BOM says so). */
export function looksLikeCue(head: Uint8Array): boolean {
  if (starts(head, [0xff, 0xfe]) || starts(head, [0xfe, 0xff])) return true;
  const t = textStart(head);
  return t !== null && CUE_WORDS.test(t);
}

export function looksLikeCcd(head: Uint8Array): boolean {
  const t = textStart(head);
  return t !== null && /^\[CloneCD\]/i.test(t);
}

/** An ISO 9660 image: CD001 at byte 32769 and a size that is a whole number of 2048-byte sectors. */
export function looksLikeIso(p: Probe): boolean {
  return p.size % ISO_SECTOR === 0 && hasCd001(p.head);
}

/** Raw 2352-byte CD sectors: the sync pattern at byte 0 and a whole number of sectors. */
export function looksLikeRawCd(p: Probe): boolean {
  return p.size > 0 && p.size % RAW_SECTOR === 0 && p.head.length >= 16 && hasSync(p.head, 0);
}

export function sniff(p: Probe): Kind {
  const h = p.head;
  if (starts(h, MAGIC.xz)) return "xz";
  if (starts(h, MAGIC.gzip)) return "gzip";
  if (starts(h, MAGIC.zip) || starts(h, MAGIC.zipEmpty) || starts(h, MAGIC.zipSpanned)) return "zip";
  if (starts(h, MAGIC.qcow2)) return "qcow2";
  if (p.size >= 512 && ((p.tail.length >= 512 && starts(p.tail, MAGIC.vhd, p.tail.length - 512)) || (starts(h, MAGIC.vhd) && starts(h, ascii("cxsparse"), 512)))) return "vhd";
  if (looksLikeRawCd(p)) return "rawcd";
  if (looksLikeIso(p)) return "iso";
  if (p.size <= 1024 * 1024 && looksLikeCcd(h)) return "ccd";
  if (p.size <= 1024 * 1024 && looksLikeCue(h)) return "cue";
  return "raw";
}
