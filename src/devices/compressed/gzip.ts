// .gz images (RFC 1952): member headers and trailers are parsed here (FEXTRA, FNAME, FCOMMENT,
// FHCRC; CRC-32 and ISIZE checked), the deflate data in between is indexed by zran.ts. Several
// members (concatenated .gz files) make one image; zero padding after the last member is allowed.
import { type Input, readAt } from "./input.ts";
import { crc32 } from "../../sys/zlib.ts";
import { DeflateError, type Framing } from "./zran.ts";

export const GZIP_MAGIC = [0x1f, 0x8b];
const FHCRC = 2, FEXTRA = 4, FNAME = 8, FCOMMENT = 16;
/** Header fields longer than this are refused (names and comments are short in practice). */
const MAX_HEADER = 1 << 20;


/** Parse the member header at `pos`; returns where its deflate data starts. */
export function gzipHeader(fd: Input, pos: number, end: number): { dataStart: number; name?: string } {
  const h = readAt(fd, Math.min(MAX_HEADER, end - pos), pos);
  if (h.length < 18) throw new DeflateError(`truncated: gzip member at byte ${pos} is cut off`);
  if (h[0] !== 0x1f || h[1] !== 0x8b) throw new DeflateError(`not a gzip member at byte ${pos}`);
  if (h[2] !== 8) throw new DeflateError(`gzip member at byte ${pos} uses compression method ${h[2]}, not deflate`);
  const flg = h[3]!;
  if (flg & 0xe0) throw new DeflateError(`gzip member at byte ${pos} has reserved flag bits set`);
  let p = 10;
  if (flg & FEXTRA) {
    const xlen = h[p]! | (h[p + 1]! << 8);
    p += 2 + xlen;
  }
  let name: string | undefined;
  const skipZ = () => {
    const z = h.indexOf(0, p);
    if (z < 0) throw new DeflateError(`gzip member at byte ${pos}: header field runs past ${MAX_HEADER} bytes`);
    const s = new TextDecoder("latin1").decode(h.subarray(p, z));
    p = z + 1;
    return s;
  };
  if (flg & FNAME) name = skipZ();
  if (flg & FCOMMENT) skipZ();
  if (flg & FHCRC) {
    if (p + 2 > h.length) throw new DeflateError(`truncated gzip header at byte ${pos}`);
    const want = h[p]! | (h[p + 1]! << 8);
    if ((crc32(0, h, 0, p) & 0xffff) !== want) throw new DeflateError(`gzip member at byte ${pos}: header CRC mismatch`);
    p += 2;
  }
  if (p > h.length) throw new DeflateError(`truncated gzip header at byte ${pos}`);
  return { dataStart: pos + p, name };
}

/** Framing for a .gz file: members one after another. */
export function gzipFraming(fd: Input): Framing {
  const size = fd.size;
  let first = true;
  return {
    limit: Infinity,
    next(pos: number): number | null {
      if (!first) {
        if (pos >= size) return null;
        const rest = readAt(fd, Math.min(size - pos, 2), pos);
        if (rest[0] !== 0x1f || rest[1] !== 0x8b) {
          // Trailing zeros (tape or block padding) are tolerated; anything else is not.
          const tail = readAt(fd, Math.min(size - pos, 1 << 20), pos);
          if (size - pos > tail.length || tail.some((b) => b !== 0)) {
            throw new DeflateError(`unexpected data after the gzip member ending at byte ${pos}`);
          }
          return null;
        }
      }
      first = false;
      return gzipHeader(fd, pos, size).dataStart;
    },
    end(pos: number, crc: number, made: number): number {
      const t = readAt(fd, 8, pos);
      if (t.length < 8) throw new DeflateError(`truncated: the gzip trailer at byte ${pos} is cut off`);
      const wantCrc = (t[0]! | (t[1]! << 8) | (t[2]! << 16) | (t[3]! << 24)) >>> 0;
      const isize = (t[4]! | (t[5]! << 8) | (t[6]! << 16) | (t[7]! << 24)) >>> 0;
      if (wantCrc !== crc) throw new DeflateError(`CRC-32 mismatch in the gzip member ending at byte ${pos} (stored ${wantCrc.toString(16)}, data ${crc.toString(16)})`);
      if (isize !== made % 2 ** 32) throw new DeflateError(`the gzip trailer at byte ${pos} says ${isize} bytes (mod 2^32), the data has ${made}`);
      return pos + 8;
    },
  };
}
