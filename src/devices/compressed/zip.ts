// .zip and .imz archives (PKWARE APPNOTE): the End of Central Directory record (and its Zip64
// form), the central directory (Zip64 extra fields; sizes from the directory, so data descriptors
// need no special case) and the local header of the chosen member. Encrypted, split and
// multi-disk archives, methods other than stored and deflated, and sizes that cannot be true
// (overlapping the directory, or beyond deflate's 1032:1 ratio: a zip bomb) are refused by name.
import { type Input, readAt } from "./input.ts";
import { DeflateError, type Framing, MAX_RATIO } from "./zran.ts";

export const ZIP_MAGIC = [0x50, 0x4b, 0x03, 0x04];

export interface ZipMember {
  name: string;
  method: number;
  flags: number;
  crc: number;
  compressedSize: number;
  size: number;
  localOffset: number;
  /** Filled by locateData(). */
  dataStart: number;
}

export class ZipError extends Error {}


const u16 = (b: Uint8Array, a: number) => b[a]! | (b[a + 1]! << 8);
const u32 = (b: Uint8Array, a: number) => (u16(b, a) | (u16(b, a + 2) << 16)) >>> 0;
const u64 = (b: Uint8Array, a: number) => {
  const v = u32(b, a) + u32(b, a + 4) * 2 ** 32;
  if (v > Number.MAX_SAFE_INTEGER) throw new ZipError("a 64-bit size is beyond 2^53");
  return v;
};

const MULTI_DISK = "multi-disk (split or spanned) zip archives are not supported: join the parts first (zip -s 0 archive.zip --out whole.zip)";

/** The members of a zip archive, from its central directory. */
export function readCentralDirectory(fd: Input): { members: ZipMember[]; cdStart: number } {
  const size = fd.size;
  if (size < 22) throw new ZipError(`too short for a zip archive (${size} bytes)`);
  const tailLen = Math.min(size, 22 + 65535 + 20);
  const tail = readAt(fd, tailLen, size - tailLen);
  let e = -1;
  for (let i = tail.length - 22; i >= 0; i--) {
    if (u32(tail, i) === 0x06054b50 && i + 22 + u16(tail, i + 20) <= tail.length) { e = i; break; }
  }
  if (e < 0) throw new ZipError("no end of central directory record: truncated or not a zip archive");
  const eocdAt = size - tailLen + e;
  let disk = u16(tail, e + 4), cdDisk = u16(tail, e + 6), onDisk = u16(tail, e + 8), total = u16(tail, e + 10);
  let cdSize = u32(tail, e + 12), cdStart = u32(tail, e + 16);
  if (e >= 20 && u32(tail, e - 20) === 0x07064b50) {
    const disks = u32(tail, e - 20 + 16);
    if (u32(tail, e - 20 + 4) !== 0 || disks > 1) throw new ZipError(MULTI_DISK);
    const z = u64(tail, e - 20 + 8);
    const r = readAt(fd, 56, z);
    if (r.length < 56 || u32(r, 0) !== 0x06064b50) throw new ZipError(`the zip64 end of central directory record is not at byte ${z}`);
    disk = u32(r, 16); cdDisk = u32(r, 20); onDisk = u64(r, 24); total = u64(r, 32);
    cdSize = u64(r, 40); cdStart = u64(r, 48);
  }
  if (disk !== 0 || cdDisk !== 0 || onDisk !== total) throw new ZipError(MULTI_DISK);
  if (cdStart + cdSize > eocdAt) throw new ZipError(`the central directory (${cdSize} bytes at ${cdStart}) runs past the end record: truncated or corrupt`);
  if (total > cdSize / 46) throw new ZipError(`the end record claims ${total} members, more than the central directory can hold`);
  if (cdSize > 256 * 1024 * 1024) throw new ZipError(`central directory of ${cdSize} bytes is larger than the limit`);
  const cd = readAt(fd, cdSize, cdStart);
  if (cd.length < cdSize) throw new ZipError("truncated: the central directory is cut off");
  const members: ZipMember[] = [];
  let p = 0;
  for (let i = 0; i < total; i++) {
    if (p + 46 > cd.length || u32(cd, p) !== 0x02014b50) throw new ZipError(`corrupt central directory: entry ${i} has no signature`);
    const flags = u16(cd, p + 8), method = u16(cd, p + 10), crc = u32(cd, p + 16);
    let csize = u32(cd, p + 20), usize = u32(cd, p + 24);
    const nlen = u16(cd, p + 28), xlen = u16(cd, p + 30), clen = u16(cd, p + 32);
    let diskStart = u16(cd, p + 34);
    let local = u32(cd, p + 42);
    if (p + 46 + nlen + xlen + clen > cd.length) throw new ZipError(`corrupt central directory: entry ${i} runs past its end`);
    const nameBytes = cd.subarray(p + 46, p + 46 + nlen);
    const name = new TextDecoder(flags & 0x800 ? "utf-8" : "latin1").decode(nameBytes);
    // Zip64 extended information: only the fields whose 32-bit value is saturated, in this order.
    for (let x = p + 46 + nlen, xe = x + xlen; x + 4 <= xe;) {
      const id = u16(cd, x), len = u16(cd, x + 2);
      if (id === 0x0001) {
        let q = x + 4;
        const take = () => { if (q + 8 > x + 4 + len) throw new ZipError(`corrupt zip64 field for ${name}`); const v = u64(cd, q); q += 8; return v; };
        if (usize === 0xffffffff) usize = take();
        if (csize === 0xffffffff) csize = take();
        if (local === 0xffffffff) local = take();
        if (diskStart === 0xffff) { if (q + 4 > x + 4 + len) throw new ZipError(`corrupt zip64 field for ${name}`); diskStart = u32(cd, q); }
      }
      x += 4 + len;
    }
    if (diskStart !== 0) throw new ZipError(MULTI_DISK);
    members.push({ name, method, flags, crc, compressedSize: csize, size: usize, localOffset: local, dataStart: -1 });
    p += 46 + nlen + xlen + clen;
  }
  return { members, cdStart };
}

const NOT_IMAGES = /\.(txt|md|nfo|diz|pdf|html?|sha(1|256|512)(sums?)?|md5(sums?)?|sums|sig|asc|gpg|url|ini|json|xml|log|jpe?g|png|gif|rtf|doc|readme)$|(^|\/)(readme|license|copying|changelog)[^/]*$/i;

/** The member to serve: the one named, or the only file (or the only file that is not documentation). */
export function chooseMember(members: ZipMember[], want: string | undefined, label: string): ZipMember {
  const files = members.filter((m) => !m.name.endsWith("/"));
  if (want !== undefined) {
    const w = want.replace(/^\/+/, "");
    const hit = files.find((m) => m.name === w) ?? files.find((m) => m.name.toLowerCase() === w.toLowerCase());
    if (!hit) throw new ZipError(`${label} has no member "${want}" (members: ${list(files)})`);
    return hit;
  }
  if (files.length === 1) return files[0]!;
  const images = files.filter((m) => !NOT_IMAGES.test(m.name));
  if (images.length === 1) return images[0]!;
  if (files.length === 0) throw new ZipError(`${label} holds no files`);
  throw new ZipError(`${label} holds ${files.length} files (${list(files)}): name one, as ${label}/MEMBER`);
}

function list(ms: ZipMember[]): string {
  const names = ms.slice(0, 8).map((m) => m.name);
  return names.join(", ") + (ms.length > 8 ? `, ... (${ms.length} in all)` : "");
}

const METHODS: Record<number, string> = { 1: "shrunk", 6: "imploded", 9: "deflate64", 12: "bzip2", 14: "LZMA", 93: "zstd", 95: "xz", 98: "PPMd", 99: "AES encryption" };

/** Check the member can be served and find where its data starts (after the local header). */
export function locateData(fd: Input, m: ZipMember, cdStart: number, label: string): void {
  const what = `${label} member ${m.name}`;
  if (m.flags & 0x41 || m.method === 99) throw new ZipError(`${what} is encrypted; bun-nbd cannot decrypt it (extract it with unzip first)`);
  if (m.method !== 0 && m.method !== 8) throw new ZipError(`${what} is compressed with ${METHODS[m.method] ?? `method ${m.method}`}; only stored and deflated members can be served`);
  const h = readAt(fd, 30, m.localOffset);
  if (h.length < 30 || u32(h, 0) !== 0x04034b50) throw new ZipError(`${what}: no local header at byte ${m.localOffset} (corrupt or truncated archive)`);
  const start = m.localOffset + 30 + u16(h, 26) + u16(h, 28);
  if (start + m.compressedSize > cdStart) {
    throw new ZipError(`${what}: its ${m.compressedSize} bytes at ${start} run into the central directory at ${cdStart} (corrupt, truncated or overlapping)`);
  }
  if (m.method === 0 && m.compressedSize !== m.size) {
    throw new ZipError(`${what} is stored, but its declared sizes disagree (${m.compressedSize} stored, ${m.size} uncompressed)`);
  }
  if (m.method === 8 && m.size > m.compressedSize * MAX_RATIO + 65536) {
    throw new ZipError(`${what} declares ${m.size} bytes from ${m.compressedSize} compressed: beyond deflate's ${MAX_RATIO}:1 limit (a zip bomb?)`);
  }
  if (m.size === 0) throw new ZipError(`${what} is empty`);
  m.dataStart = start;
}

/** Framing for a deflated member: one raw deflate stream, checked against the directory's CRC and size. */
export function memberFraming(m: ZipMember, label: string): Framing {
  let first = true;
  return {
    limit: m.size,
    next(): number | null {
      if (!first) return null;
      first = false;
      return m.dataStart;
    },
    end(pos: number, crc: number, made: number): number {
      if (made !== m.size) throw new DeflateError(`${label} member ${m.name} decodes to ${made} bytes, the archive declares ${m.size}`);
      if (crc !== m.crc) throw new DeflateError(`${label} member ${m.name}: CRC-32 mismatch (declared ${m.crc.toString(16)}, data ${crc.toString(16)})`);
      if (pos > m.dataStart + m.compressedSize) throw new DeflateError(`${label} member ${m.name}: deflate data runs past its declared compressed size`);
      return pos;
    },
  };
}
