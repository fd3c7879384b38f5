// The NBD wire codec: pure functions over Uint8Array with explicit offsets. No I/O, no runtime
// APIs, no timers. Hot-path functions (request headers, reply headers) write into caller-owned
// buffers with plain byte arithmetic: no DataView, no BigInt, no allocation. Handshake helpers are
// cold and written for clarity.
import {
  IHAVEOPT_HI, IHAVEOPT_LO, MAX_SAFE_OFFSET, NBDMAGIC_HI, NBDMAGIC_LO, NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES,
  NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC, NBD_STRUCTURED_REPLY_MAGIC, OPT_REPLY_MAGIC_HI, OPT_REPLY_MAGIC_LO,
  EXPORT_NAME_PADDING, NBD_MAX_STRING, NBD_EXTENDED_REQUEST_MAGIC, NBD_EXTENDED_REPLY_MAGIC,
} from "./constants.ts";

// ---- big-endian primitives -------------------------------------------------------------------

export function getU16(b: Uint8Array, p: number): number {
  return (b[p]! << 8) | b[p + 1]!;
}
export function getU32(b: Uint8Array, p: number): number {
  return ((b[p]! << 24) | (b[p + 1]! << 16) | (b[p + 2]! << 8) | b[p + 3]!) >>> 0;
}
/** A u64 as a number; exact below 2^53. Callers that must reject larger values check getU32(b, p) first. */
export function getU64(b: Uint8Array, p: number): number {
  return getU32(b, p) * 4294967296 + getU32(b, p + 4);
}
export function putU16(b: Uint8Array, p: number, v: number): void {
  b[p] = v >>> 8; b[p + 1] = v;
}
export function putU32(b: Uint8Array, p: number, v: number): void {
  b[p] = v >>> 24; b[p + 1] = v >>> 16; b[p + 2] = v >>> 8; b[p + 3] = v;
}
/** Write a non-negative integer below 2^53 as a u64. */
export function putU64(b: Uint8Array, p: number, v: number): void {
  const hi = Math.floor(v / 4294967296);
  putU32(b, p, hi);
  putU32(b, p + 4, v - hi * 4294967296);
}

const utf8 = new TextEncoder();
const utf8dec = new TextDecoder("utf-8", { fatal: false });
export function encodeString(s: string): Uint8Array { return utf8.encode(s); }
export function decodeString(b: Uint8Array): string { return utf8dec.decode(b); }

// ---- transmission: requests ------------------------------------------------------------------

/** A parsed request header. One instance is reused per session. */
export interface RequestHeader {
  flags: number;
  type: number;
  cookieHi: number;
  cookieLo: number;
  /** Exact when < 2^53; `offsetTooBig` says when it is not. */
  offset: number;
  /** The offset (or, in an extended request, the 64-bit length) is 2^53 or more: not exact, the request fails. */
  offsetTooBig: boolean;
  length: number;
  /** Extended requests only: the offset's exact halves (extended replies echo them). */
  offsetHi: number;
  offsetLo: number;
}

export function newRequestHeader(): RequestHeader {
  return { flags: 0, type: 0, cookieHi: 0, cookieLo: 0, offset: 0, offsetTooBig: false, length: 0, offsetHi: 0, offsetLo: 0 };
}

/** Parse the 28-byte compact request at b[p]. Returns false on a bad magic. */
export function parseRequest(b: Uint8Array, p: number, out: RequestHeader): boolean {
  if (getU32(b, p) !== NBD_REQUEST_MAGIC) return false;
  out.flags = getU16(b, p + 4);
  out.type = getU16(b, p + 6);
  out.cookieHi = getU32(b, p + 8);
  out.cookieLo = getU32(b, p + 12);
  const hi = getU32(b, p + 16);
  out.offsetTooBig = hi >= MAX_SAFE_OFFSET / 4294967296;
  out.offset = hi * 4294967296 + getU32(b, p + 20);
  out.length = getU32(b, p + 24);
  return true;
}

/** Encode a compact request (client side, and tests). */
export function encodeRequest(b: Uint8Array, p: number, flags: number, type: number, cookieHi: number, cookieLo: number, offset: number, length: number): void {
  putU32(b, p, NBD_REQUEST_MAGIC);
  putU16(b, p + 4, flags);
  putU16(b, p + 6, type);
  putU32(b, p + 8, cookieHi);
  putU32(b, p + 12, cookieLo);
  putU64(b, p + 16, offset);
  putU32(b, p + 24, length);
}

/**
 * Parse the 32-byte extended request at b[p] (extended headers negotiated): the length is 64 bits,
 * a payload length with NBD_CMD_FLAG_PAYLOAD_LEN and an effect length without. Returns false on a
 * bad magic.
 */
export function parseExtendedRequest(b: Uint8Array, p: number, out: RequestHeader): boolean {
  if (getU32(b, p) !== NBD_EXTENDED_REQUEST_MAGIC) return false;
  out.flags = getU16(b, p + 4);
  out.type = getU16(b, p + 6);
  out.cookieHi = getU32(b, p + 8);
  out.cookieLo = getU32(b, p + 12);
  const hi = getU32(b, p + 16);
  const lo = getU32(b, p + 20);
  const lenHi = getU32(b, p + 24);
  out.offsetHi = hi;
  out.offsetLo = lo;
  out.offsetTooBig = hi >= MAX_SAFE_OFFSET / 4294967296 || lenHi >= MAX_SAFE_OFFSET / 4294967296;
  out.offset = hi * 4294967296 + lo;
  out.length = lenHi * 4294967296 + getU32(b, p + 28);
  return true;
}

/** Encode an extended request (client side, and tests); `length` below 2^53. */
export function encodeExtendedRequest(b: Uint8Array, p: number, flags: number, type: number, cookieHi: number, cookieLo: number, offset: number, length: number): void {
  putU32(b, p, NBD_EXTENDED_REQUEST_MAGIC);
  putU16(b, p + 4, flags);
  putU16(b, p + 6, type);
  putU32(b, p + 8, cookieHi);
  putU32(b, p + 12, cookieLo);
  putU64(b, p + 16, offset);
  putU64(b, p + 24, length);
}

/** The payload form of BLOCK_STATUS (extended headers): an effect length and the context ids wanted. */
export interface StatusPayload { length: number; ids: number[] }

/**
 * Parse a BLOCK_STATUS payload: u64 effect length, then n ≥ 1 u32 context ids (8 + 4n bytes).
 * Returns null when malformed, or when the length is 2^53 or more (beyond any export).
 */
export function parseStatusPayload(d: Uint8Array): StatusPayload | null {
  if (d.length < 12 || (d.length - 8) % 4 !== 0) return null;
  const hi = getU32(d, 0);
  if (hi >= MAX_SAFE_OFFSET / 4294967296) return null;
  const ids: number[] = [];
  for (let p = 8; p < d.length; p += 4) ids.push(getU32(d, p));
  return { length: hi * 4294967296 + getU32(d, 4), ids };
}

export function encodeStatusPayload(length: number, ids: readonly number[]): Uint8Array {
  const b = new Uint8Array(8 + 4 * ids.length);
  putU64(b, 0, length);
  ids.forEach((id, i) => putU32(b, 8 + 4 * i, id));
  return b;
}

// ---- transmission: replies -------------------------------------------------------------------

/** 16-byte simple reply header. */
export function putSimpleReply(b: Uint8Array, p: number, error: number, cookieHi: number, cookieLo: number): void {
  putU32(b, p, NBD_SIMPLE_REPLY_MAGIC);
  putU32(b, p + 4, error);
  putU32(b, p + 8, cookieHi);
  putU32(b, p + 12, cookieLo);
}

/** 20-byte structured reply chunk header. */
export function putChunkHeader(b: Uint8Array, p: number, flags: number, type: number, cookieHi: number, cookieLo: number, length: number): void {
  putU32(b, p, NBD_STRUCTURED_REPLY_MAGIC);
  putU16(b, p + 4, flags);
  putU16(b, p + 6, type);
  putU32(b, p + 8, cookieHi);
  putU32(b, p + 12, cookieLo);
  putU32(b, p + 16, length);
}

/**
 * 32-byte extended reply chunk header: the request's offset echoed from its exact halves, and a
 * 64-bit payload length (below 2^53).
 */
export function putExtendedReply(
  b: Uint8Array, p: number, flags: number, type: number, cookieHi: number, cookieLo: number,
  offsetHi: number, offsetLo: number, length: number,
): void {
  putU32(b, p, NBD_EXTENDED_REPLY_MAGIC);
  putU16(b, p + 4, flags);
  putU16(b, p + 6, type);
  putU32(b, p + 8, cookieHi);
  putU32(b, p + 12, cookieLo);
  putU32(b, p + 16, offsetHi);
  putU32(b, p + 20, offsetLo);
  putU32(b, p + 24, (length / 4294967296) >>> 0);
  putU32(b, p + 28, length);
}

// ---- handshake (cold) ------------------------------------------------------------------------

/** Server greeting: NBDMAGIC, IHAVEOPT, handshake flags (fixed newstyle + no zeroes). */
export function encodeGreeting(): Uint8Array {
  const b = new Uint8Array(18);
  putU32(b, 0, NBDMAGIC_HI); putU32(b, 4, NBDMAGIC_LO);
  putU32(b, 8, IHAVEOPT_HI); putU32(b, 12, IHAVEOPT_LO);
  putU16(b, 16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
  return b;
}

export interface OptionHeader { magicOk: boolean; option: number; length: number }

/** Parse the 16-byte option header (IHAVEOPT, option, length). */
export function parseOptionHeader(b: Uint8Array, p: number): OptionHeader {
  return {
    magicOk: getU32(b, p) === IHAVEOPT_HI && getU32(b, p + 4) === IHAVEOPT_LO,
    option: getU32(b, p + 8),
    length: getU32(b, p + 12),
  };
}

export function encodeOptionHeader(option: number, data: Uint8Array): Uint8Array {
  const b = new Uint8Array(16 + data.length);
  putU32(b, 0, IHAVEOPT_HI); putU32(b, 4, IHAVEOPT_LO);
  putU32(b, 8, option); putU32(b, 12, data.length);
  b.set(data, 16);
  return b;
}

/** An option reply: magic, option, reply type, length, data. */
export function encodeOptionReply(option: number, type: number, data: Uint8Array = new Uint8Array(0)): Uint8Array {
  const b = new Uint8Array(20 + data.length);
  putU32(b, 0, OPT_REPLY_MAGIC_HI); putU32(b, 4, OPT_REPLY_MAGIC_LO);
  putU32(b, 8, option); putU32(b, 12, type); putU32(b, 16, data.length);
  b.set(data, 20);
  return b;
}

/** Reply to EXPORT_NAME: size, flags, and 124 zero bytes unless NO_ZEROES was agreed. */
export function encodeExportNameReply(size: number, flags: number, noZeroes: boolean): Uint8Array {
  const b = new Uint8Array(10 + (noZeroes ? 0 : EXPORT_NAME_PADDING));
  putU64(b, 0, size);
  putU16(b, 8, flags);
  return b;
}

export function encodeInfoExport(size: number, flags: number): Uint8Array {
  const b = new Uint8Array(12);
  putU16(b, 0, 0); putU64(b, 2, size); putU16(b, 10, flags);
  return b;
}
export function encodeInfoString(type: number, s: string): Uint8Array {
  const str = encodeString(s);
  const b = new Uint8Array(2 + str.length);
  putU16(b, 0, type); b.set(str, 2);
  return b;
}
export function encodeInfoBlockSize(min: number, preferred: number, max: number): Uint8Array {
  const b = new Uint8Array(14);
  putU16(b, 0, 3); putU32(b, 2, min); putU32(b, 6, preferred); putU32(b, 10, max);
  return b;
}
export function encodeRepServer(name: string, description: string): Uint8Array {
  const n = encodeString(name);
  const d = encodeString(description);
  const b = new Uint8Array(4 + n.length + d.length);
  putU32(b, 0, n.length); b.set(n, 4); b.set(d, 4 + n.length);
  return b;
}
export function encodeRepMetaContext(id: number, name: string): Uint8Array {
  const n = encodeString(name);
  const b = new Uint8Array(4 + n.length);
  putU32(b, 0, id); b.set(n, 4);
  return b;
}

/** Why option data could not be parsed; becomes ERR_INVALID with this message. */
export class OptionFormatError extends Error {}

export interface InfoRequest { name: string; infos: number[] }

/** Parse NBD_OPT_INFO / NBD_OPT_GO data: u32 name length, name, u16 count, count × u16. */
export function parseInfoRequest(d: Uint8Array): InfoRequest {
  if (d.length < 6) throw new OptionFormatError(`option data too short (${d.length} bytes, need at least 6)`);
  const nameLen = getU32(d, 0);
  if (nameLen > d.length - 6) throw new OptionFormatError(`name length ${nameLen} overruns the option data`);
  if (nameLen > NBD_MAX_STRING) throw new OptionFormatError(`export name longer than ${NBD_MAX_STRING} bytes`);
  const name = decodeString(d.subarray(4, 4 + nameLen));
  const count = getU16(d, 4 + nameLen);
  if (6 + nameLen + 2 * count !== d.length) {
    throw new OptionFormatError(`${count} information requests do not match the option length ${d.length}`);
  }
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(getU16(d, 6 + nameLen + 2 * i));
  return { name, infos };
}

export function encodeInfoRequest(name: string, infos: number[]): Uint8Array {
  const n = encodeString(name);
  const b = new Uint8Array(6 + n.length + 2 * infos.length);
  putU32(b, 0, n.length); b.set(n, 4); putU16(b, 4 + n.length, infos.length);
  infos.forEach((t, i) => putU16(b, 6 + n.length + 2 * i, t));
  return b;
}

export interface MetaContextRequest { name: string; queries: string[] }

/** Parse LIST/SET_META_CONTEXT data: u32 name length, name, u32 count, count × (u32 length, query). */
export function parseMetaContextRequest(d: Uint8Array): MetaContextRequest {
  if (d.length < 8) throw new OptionFormatError(`option data too short (${d.length} bytes, need at least 8)`);
  const nameLen = getU32(d, 0);
  if (nameLen > d.length - 8) throw new OptionFormatError(`name length ${nameLen} overruns the option data`);
  if (nameLen > NBD_MAX_STRING) throw new OptionFormatError(`export name longer than ${NBD_MAX_STRING} bytes`);
  const name = decodeString(d.subarray(4, 4 + nameLen));
  let p = 4 + nameLen;
  const count = getU32(d, p);
  p += 4;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (p + 4 > d.length) throw new OptionFormatError(`query ${i + 1} of ${count} is missing`);
    const len = getU32(d, p);
    p += 4;
    if (len > d.length - p) throw new OptionFormatError(`query ${i + 1} length ${len} overruns the option data`);
    if (len > NBD_MAX_STRING) throw new OptionFormatError(`query longer than ${NBD_MAX_STRING} bytes`);
    queries.push(decodeString(d.subarray(p, p + len)));
    p += len;
  }
  if (p !== d.length) throw new OptionFormatError(`${d.length - p} stray bytes after the queries`);
  return { name, queries };
}

export function encodeMetaContextRequest(name: string, queries: string[]): Uint8Array {
  const n = encodeString(name);
  const qs = queries.map(encodeString);
  const b = new Uint8Array(8 + n.length + qs.reduce((a, q) => a + 4 + q.length, 0));
  putU32(b, 0, n.length); b.set(n, 4);
  let p = 4 + n.length;
  putU32(b, p, qs.length); p += 4;
  for (const q of qs) { putU32(b, p, q.length); b.set(q, p + 4); p += 4 + q.length; }
  return b;
}
