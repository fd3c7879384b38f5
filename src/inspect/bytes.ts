// Little helpers every parser in src/inspect shares: little/big-endian integers out of a byte
// array, fixed-width text fields (ASCII, UTF-16), and the exact UUID and serial spellings blkid
// prints. Pure functions; no I/O.

export const le16 = (b: Uint8Array, o: number): number => (b[o] ?? 0) | ((b[o + 1] ?? 0) << 8);
export const le32 = (b: Uint8Array, o: number): number => (le16(b, o) + le16(b, o + 2) * 0x10000);
/** A 64-bit little-endian value as a number (exact below 2^53, which every size we use is). */
export const le64 = (b: Uint8Array, o: number): number => le32(b, o) + le32(b, o + 4) * 2 ** 32;
export const be16 = (b: Uint8Array, o: number): number => ((b[o] ?? 0) << 8) | (b[o + 1] ?? 0);
export const be32 = (b: Uint8Array, o: number): number => be16(b, o) * 0x10000 + be16(b, o + 2);
export const be64 = (b: Uint8Array, o: number): number => be32(b, o) * 2 ** 32 + be32(b, o + 4);

/** True if `b[o..]` holds the ASCII text `s`. */
export function hasText(b: Uint8Array, o: number, s: string): boolean {
  if (o < 0 || o + s.length > b.length) return false;
  for (let i = 0; i < s.length; i++) if (b[o + i] !== s.charCodeAt(i)) return false;
  return true;
}

/** A fixed-width text field: bytes up to the first NUL, trailing spaces and NULs trimmed. */
export function fixedText(b: Uint8Array, o: number, len: number): string {
  let end = o;
  const max = Math.min(b.length, o + len);
  while (end < max && b[end] !== 0) end++;
  let s = "";
  for (let i = o; i < end; i++) s += String.fromCharCode(b[i]!);
  return latin1ToUtf8Safe(s).replace(/[ \t\r\n]+$/, "");
}

// A label's bytes are taken as UTF-8 when they decode as such (what mkfs tools write), else as
// Latin-1 code points, so no byte is ever lost or turned into U+FFFD silently.
function latin1ToUtf8Safe(s: string): string {
  if (!/[\x80-\xff]/.test(s)) return s;
  const bytes = Uint8Array.from(s, (c) => c.charCodeAt(0));
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    return s;
  }
}

function utf16(b: Uint8Array, o: number, len: number, unit: (b: Uint8Array, o: number) => number): string {
  let s = "";
  for (let i = o; i + 1 < Math.min(b.length, o + len); i += 2) {
    const c = unit(b, i);
    if (c === 0) break;
    s += String.fromCharCode(c);
  }
  return s.replace(/\s+$/, "");
}

/** UTF-16LE text of `len` bytes, stopping at a NUL code unit; trailing spaces trimmed. */
export const utf16le = (b: Uint8Array, o: number, len: number): string => utf16(b, o, len, le16);

/** UTF-16BE text (Joliet, UDF), the same way. */
export const utf16be = (b: Uint8Array, o: number, len: number): string => utf16(b, o, len, be16);

const HEX = (n: number, w: number) => n.toString(16).padStart(w, "0");

export function hex(b: Uint8Array, o: number, len: number): string {
  let s = "";
  for (let i = 0; i < len; i++) s += HEX(b[o + i] ?? 0, 2);
  return s;
}

/** A UUID stored as 16 bytes in order (ext, xfs, btrfs, swap): lowercase 8-4-4-4-12. */
export function uuidBytes(b: Uint8Array, o: number): string {
  const h = hex(b, o, 16);
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** A GUID as stored by Microsoft (GPT): the first three fields little-endian; lowercase. */
export function guid(b: Uint8Array, o: number): string {
  const d1 = HEX(le32(b, o), 8), d2 = HEX(le16(b, o + 4), 4), d3 = HEX(le16(b, o + 6), 4);
  return `${d1}-${d2}-${d3}-${hex(b, o + 8, 2)}-${hex(b, o + 10, 6)}`;
}

export function isZero(b: Uint8Array, o = 0, len = b.length - o): boolean {
  for (let i = o; i < o + len && i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}

export const isPowerOfTwo = (n: number): boolean => n > 0 && Number.isInteger(n) && (n & (n - 1)) === 0;

/** CRC-32 (IEEE, as GPT uses), computed by Bun's native zlib-compatible hasher. */
export function crc32(b: Uint8Array): number {
  return Bun.hash.crc32(b) >>> 0;
}
