// What the payload of a structured reply chunk does to its request, once the receiver has it
// whole: OFFSET_HOLE fills (or views) zeros, BLOCK_STATUS(_EXT) adds a context's extents, an error
// chunk sets the request's error. A payload that breaks the protocol comes back as [code, message].
import { NBD_EIO } from "../protocol/constants.ts";
import { NbdRequestError } from "./errors.ts";
import type { Extent, Req } from "./requests.ts";
import { u16, u32, u64 } from "./wire.ts";

/** A protocol violation found in a chunk payload: [code, message]; null when the chunk is fine. */
export type ChunkProblem = readonly [code: string, message: string] | null;

/** OFFSET_HOLE (12 bytes: offset, length) for a READ. */
export function holeChunk(r: Req, p: Buffer): ChunkProblem {
  const offset = u64(p, 0);
  const n = u32(p, 8);
  if (n === 0 || !(offset >= r.offset && offset + n <= r.offset + r.length)) {
    return ["HOLE_OUT_OF_RANGE", `OFFSET_HOLE at ${offset} (+${n}) outside READ at ${r.offset} (+${r.length})`];
  }
  if (r.views) {
    const z = zeroView(n);
    for (let pos = 0; pos < n; pos += z.length) {
      r.views.push(pos + z.length <= n ? z : z.subarray(0, n - pos));
      r.viewPos!.push(offset - r.offset + pos);
    }
  } else r.buf!.fill(0, offset - r.offset, offset - r.offset + n);
  r.got += n;
  return null;
}

/** BLOCK_STATUS (context id, then 32-bit length and flags per extent) for a BLOCK_STATUS request. */
export function blockStatusChunk(r: Req, p: Buffer, contextNames: ReadonlyMap<number, string>): ChunkProblem {
  const name = contextNames.get(u32(p, 0));
  if (name === undefined) return ["UNKNOWN_CONTEXT", `block status for unknown meta context id ${u32(p, 0)}`];
  const list: Extent[] = [];
  let pos = r.offset;
  for (let o = 4; o < p.length; o += 8) {
    const length = u32(p, o);
    if (length === 0) return ["BAD_BLOCK_STATUS", "zero-length extent"];
    list.push({ offset: pos, length, flags: u32(p, o + 4) });
    pos += length;
  }
  (r.extents ??= new Map()).set(name, list);
  return null;
}

/**
 * BLOCK_STATUS_EXT (extended headers: context id, descriptor count, then 64-bit length and status
 * per extent). Statuses must fit in a number exactly (every known context's are 32-bit).
 */
export function blockStatusExtChunk(r: Req, p: Buffer, contextNames: ReadonlyMap<number, string>): ChunkProblem {
  const name = contextNames.get(u32(p, 0));
  if (name === undefined) return ["UNKNOWN_CONTEXT", `block status for unknown meta context id ${u32(p, 0)}`];
  const count = u32(p, 4);
  if (count * 16 + 8 !== p.length) return ["BAD_BLOCK_STATUS", `descriptor count ${count} in a ${p.length}-byte BLOCK_STATUS_EXT chunk`];
  const list: Extent[] = [];
  let pos = r.offset;
  for (let o = 8; o < p.length; o += 16) {
    const length = u64(p, o);
    const flags = u64(p, o + 8);
    if (!(length > 0) || !Number.isFinite(flags)) return ["BAD_BLOCK_STATUS", "zero-length extent, or a length or status of 2^53 or more"];
    list.push({ offset: pos, length, flags });
    pos += length;
  }
  (r.extents ??= new Map()).set(name, list);
  return null;
}

/** An error chunk (ERROR, ERROR_OFFSET, or an unknown type with the error bit): the request fails with the first. */
export function errorChunk(r: Req, p: Buffer, type: number): ChunkProblem {
  let errno = u32(p, 0);
  const msgLen = u16(p, 4);
  if (6 + msgLen > p.length) return ["BAD_CHUNK", `error chunk message of ${msgLen} bytes in a ${p.length}-byte chunk`];
  if (errno === 0) errno = NBD_EIO;
  const msg = p.toString("utf8", 6, 6 + msgLen);
  let off = r.offset;
  if (type === 0x8002 && p.length >= 6 + msgLen + 8) off = u64(p, 6 + msgLen);
  r.error ??= new NbdRequestError(errno, r.type, off, r.length, msg || undefined);
  return null;
}

/** A shared zero buffer for holes read by views (never written to). */
let zeroes: Uint8Array | null = null;
function zeroView(n: number): Uint8Array {
  zeroes ??= new Uint8Array(1024 * 1024);
  return n < zeroes.length ? zeroes.subarray(0, n) : zeroes;
}
