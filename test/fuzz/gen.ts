// Structure-aware generators for what an NBD client can send: client flags, every option with its
// payload (valid, truncated, overlong, lying counts and lengths), the end of the handshake (GO,
// EXPORT_NAME or none), compact or extended requests with mutated lengths, flags, magics, cookies
// and offsets, WRITE payloads cut short. fast-check draws a base input (and shrinks it); a small seeded mutation loop
// (variants()) derives cheap variants of it: byte mutations, chunk splits, hang-ups, slow readers.
// Pure: no I/O; the fuzz targets (session.ts, socket.ts) turn an input into traffic.
import fc from "fast-check";
import {
  IHAVEOPT_HI, IHAVEOPT_LO, NBD_CMD_FLAG_DF, NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_PAYLOAD_LEN, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_WRITE, NBD_EXTENDED_REQUEST_MAGIC, NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME, NBD_OPT_EXTENDED_HEADERS, NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT, NBD_OPT_STRUCTURED_REPLY, NBD_REQUEST_MAGIC,
} from "../../src/protocol/constants.ts";
import { putU16, putU32, putU64 } from "../../src/protocol/codec.ts";

/** What the generators need to know about the server under test. */
export interface FuzzTargetInfo {
  /** Export names that exist (GO/EXPORT_NAME pick them most of the time). */
  names: string[];
  /** Export sizes, to aim offsets near the ends. */
  sizes: number[];
  /** Largest WRITE payload generated in full (bigger ones are cut short). */
  maxFullPayload: number;
}

/** A base input: the encoded stream (before mutation) and how it was built, for reports. */
export interface BaseInput { bytes: Uint8Array; summary: string; variantSeed: number }

/** One input as a target runs it. */
export interface FuzzInput {
  bytes: Uint8Array;
  /** Chunk sizes the stream is cut into (cycled); empty: one chunk. */
  splits: number[];
  /** The client stops reading replies (output backpressure): the target drains only now and then. */
  slowReader: boolean;
  /** Hang up after this many bytes (null: send everything, then hang up). */
  closeAt: number | null;
  /** What was done to the base, for reports. */
  note: string;
}

const te = new TextEncoder();
const u32 = (v: number) => { const b = new Uint8Array(4); putU32(b, 0, v >>> 0); return b; };
const u16 = (v: number) => { const b = new Uint8Array(2); putU16(b, 0, v & 0xffff); return b; };

export function cat(parts: Uint8Array[]): Uint8Array {
  let n = 0;
  for (const p of parts) n += p.length;
  const b = new Uint8Array(n);
  let o = 0;
  for (const p of parts) { b.set(p, o); o += p.length; }
  return b;
}

/** Interesting 32-bit values for lengths, counts and magics (index 0 is the simplest). */
const INTERESTING32 = [
  0, 1, 2, 4, 7, 8, 16, 511, 512, 513, 4095, 4096, 4097, 65535, 65536, 1 << 20, (1 << 20) + 1, 32 << 20, (32 << 20) + 1,
  64 << 20, (64 << 20) + 1, 0x7fffffff, 0x80000000, 0xfffffffe, 0xffffffff, NBD_REQUEST_MAGIC, NBD_EXTENDED_REQUEST_MAGIC,
  IHAVEOPT_HI, IHAVEOPT_LO,
];
const CONTEXTS = ["base:allocation", "base:", "qemu:allocation-depth", "qemu:", "qemu:dirty-bitmap:x", "", ":", "x-:a", "base:allocation\0"];
const OPTION_CODES = [NBD_OPT_STRUCTURED_REPLY, NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT, NBD_OPT_INFO, 3, 4, 5, 11, 12, NBD_OPT_ABORT];
const FINISH_CODES = [NBD_OPT_GO, NBD_OPT_GO, NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_OPT_EXPORT_NAME, NBD_OPT_INFO, NBD_OPT_ABORT];
const REQUEST_FLAGS = [
  0, 0, 0, NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLAG_DF, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_PAYLOAD_LEN, NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
];
const BIG_OFFSETS = [2 ** 31, 2 ** 32 - 512, 2 ** 32, 2 ** 53 - 512, 2 ** 53 - 1, 2 ** 53, 2 ** 63, 2 ** 64 - 1];

/** A 32-bit value: mostly `normal`, sometimes an interesting one, rarely anything (r: two raw draws). */
function lie(normal: number, sel: number, raw: number): number {
  const k = sel % 16;
  if (k < 13) return normal;
  if (k < 15) return INTERESTING32[raw % INTERESTING32.length]!;
  return k === 15 && raw % 2 ? normal + (raw % 7) - 3 >>> 0 : raw >>> 0;
}

function nameOf(info: FuzzTargetInfo, sel: number, raw: number): Uint8Array {
  const k = sel % 20;
  if (k < 15) return te.encode(info.names[raw % info.names.length]!);
  if (k === 15) return te.encode(`x${raw.toString(36)}`);
  if (k === 16) return Uint8Array.of(raw & 255, (raw >>> 8) & 255, 0xff, 0);
  if (k === 17) return new Uint8Array([4096, 4097, 70000][raw % 3]!).fill(0x61);
  return te.encode("");
}

/** Everything one option can need; which fields matter depends on the code. */
const optionArb = fc.tuple(fc.nat(), fc.nat(), fc.nat(), fc.nat(), fc.nat(), fc.nat(), fc.nat(), fc.nat());

function encodeOption(info: FuzzTargetInfo, code: number, r: number[]): Uint8Array {
  const [a, b, c, d, e, f, g, h] = r as [number, number, number, number, number, number, number, number];
  let data: Uint8Array;
  const name = nameOf(info, a, b);
  if (code === NBD_OPT_EXPORT_NAME) data = name;
  else if (code === NBD_OPT_INFO || code === NBD_OPT_GO) {
    const infos = Array.from({ length: c % 5 }, (_, i) => (i === 0 && d % 4 ? 3 : (d >>> (i * 3)) % 5));
    data = cat([u32(lie(name.length, e, f)), name, u16(lie(infos.length, g, h)), ...infos.map(u16), g % 29 === 0 ? u16(h) : new Uint8Array(0)]);
  } else if (code === NBD_OPT_LIST_META_CONTEXT || code === NBD_OPT_SET_META_CONTEXT) {
    const qs = Array.from({ length: c % 4 }, (_, i) => te.encode(CONTEXTS[(d >>> (i * 4)) % CONTEXTS.length]!));
    data = cat([u32(lie(name.length, e, f)), name, u32(lie(qs.length, g, h)), ...qs.flatMap((q, i) => [u32(lie(q.length, i ? h : e, f)), q])]);
  } else {
    data = c % 6 === 0 ? Uint8Array.of(d & 255, e & 255, f & 255) : new Uint8Array(0);
  }
  const o = new Uint8Array(16 + data.length);
  putU32(o, 0, h % 61 === 0 ? IHAVEOPT_HI ^ 0x100 : IHAVEOPT_HI);
  putU32(o, 4, IHAVEOPT_LO);
  putU32(o, 8, code);
  putU32(o, 12, lie(data.length, (g >>> 4) + 7, b));
  o.set(data, 16);
  return o;
}

/** Everything one request can need. */
const requestArb = fc.tuple(fc.nat(), fc.nat(), fc.nat(), fc.nat(), fc.nat(), fc.nat(), fc.nat(), fc.nat());

/**
 * One request: compact (28 bytes) or, after EXTENDED_HEADERS, extended (32 bytes: u64 cookie and
 * u64 length, WRITE payloads announced with PAYLOAD_LEN, effect lengths past 4 GiB).
 */
function encodeRequest(info: FuzzTargetInfo, r: number[], ext: boolean): { head: Uint8Array; payload: number; fill: number } {
  const [kind, a, b, c, d, e, f, g] = r as [number, number, number, number, number, number, number, number];
  const small = Math.max(512, Math.min(...info.sizes));
  const h = new Uint8Array(ext ? 32 : 28);
  const put = (magicSel: boolean, flags: number, type: number, cookieHi: number, cookieLo: number, offset: number, length: number) => {
    putU32(h, 0, magicSel ? INTERESTING32[b % INTERESTING32.length]! : ext ? NBD_EXTENDED_REQUEST_MAGIC : NBD_REQUEST_MAGIC);
    putU16(h, 4, flags);
    putU16(h, 6, type);
    putU32(h, 8, cookieHi);
    putU32(h, 12, cookieLo);
    putU64(h, 16, Math.min(offset, 2 ** 64 - 2 ** 11)); // exact below 2^53; above, any large value will do
    if (ext) putU64(h, 24, Math.min(length, 2 ** 64 - 2 ** 11)); else putU32(h, 24, length);
  };
  if (kind % 5 < 2) {
    // A well-formed request the server should simply answer (interleaved with hostile ones).
    const type = [0, 1, 3, 6, 7, 0, 1][a % 7]!;
    const off = (b % Math.floor(small / 512)) * 512;
    const len = Math.min(512 * (1 + (c % 8)), small - off);
    const flags = ext && type === NBD_CMD_WRITE ? NBD_CMD_FLAG_PAYLOAD_LEN : 0;
    put(false, flags, type, 0, d, type === 3 ? 0 : off, type === 3 ? 0 : len);
    return { head: h, payload: type === NBD_CMD_WRITE ? len : 0, fill: e & 255 };
  }
  const type = a % 20 < 14 ? a % 8 : a % 20 < 18 ? NBD_CMD_WRITE : a % 20 === 18 ? 8 + (b % 5) : b & 0xffff;
  const flags = f % 10 < 9 ? REQUEST_FLAGS[(f >>> 4) % REQUEST_FLAGS.length]! : (f >>> 4) & 0xffff;
  const sizes = info.sizes;
  const ok = c % 8;
  const offset = ok < 4 ? (d % 2048) * 512 : ok < 6 ? d % (1 << 21) : ok < 7 ? Math.max(0, sizes[d % sizes.length]! + (e % 74097) - 70000) : BIG_OFFSETS[d % BIG_OFFSETS.length]!;
  const lk = e % 12;
  const length = lk < 6 ? 512 * (1 + (g % 128)) : lk < 10 ? g % 9001 : lk < 11 ? 512 * (1 + (g % 2048))
    : ext && g % 3 === 0 ? BIG_OFFSETS[g % BIG_OFFSETS.length]! : INTERESTING32[g % INTERESTING32.length]!;
  // Extended WRITEs mostly carry PAYLOAD_LEN (mandatory); other commands sometimes do (a payload to consume).
  const plFlag = ext && (type === NBD_CMD_WRITE ? f % 8 !== 0 : f % 16 === 0) ? NBD_CMD_FLAG_PAYLOAD_LEN : 0;
  put(kind % 97 === 96, flags | plFlag, type, b, d, offset, length);
  const hasPayload = ext ? (flags | plFlag) & NBD_CMD_FLAG_PAYLOAD_LEN : type === NBD_CMD_WRITE;
  if (!hasPayload || length === 0) return { head: h, payload: 0, fill: 0 };
  // The payload: all of it (up to maxFullPayload), or cut short (the stream ends inside it).
  const full = g % 11 !== 0 && length <= info.maxFullPayload;
  return { head: h, payload: full ? length : Math.min(length, g % 70000), fill: a & 255 };
}

/** A base input: client flags, options, a GO/EXPORT_NAME (or not), then requests, encoded. */
export function baseInput(info: FuzzTargetInfo): fc.Arbitrary<BaseInput> {
  return fc.record({
    flags: fc.nat(),
    structured: fc.nat(),
    options: fc.array(fc.tuple(fc.nat(), optionArb), { maxLength: 4 }),
    finish: fc.tuple(fc.nat(), optionArb),
    requests: fc.array(requestArb, { maxLength: 12 }),
    variantSeed: fc.nat(),
  }).map((r) => {
    const parts: Uint8Array[] = [u32(r.flags % 24 === 0 ? INTERESTING32[(r.flags >>> 5) % INTERESTING32.length]! : r.flags % 24 < 18 ? 3 : 1)];
    // 0: neither, 1: structured replies, 2: extended headers, 3: structured replies then extended headers
    const sel = r.structured % 4;
    const codes: number[] = [];
    if (sel & 1) { parts.push(encodeOption(info, NBD_OPT_STRUCTURED_REPLY, [0, 0, 1, 0, 0, 0, 0, 1])); codes.push(NBD_OPT_STRUCTURED_REPLY); }
    if (sel & 2) { parts.push(encodeOption(info, NBD_OPT_EXTENDED_HEADERS, [0, 0, 1, 0, 0, 0, 0, 1])); codes.push(NBD_OPT_EXTENDED_HEADERS); }
    for (const [c, o] of r.options) {
      const code = c % 23 === 22 ? c >>> 5 : OPTION_CODES[c % OPTION_CODES.length]!;
      codes.push(code);
      parts.push(encodeOption(info, code, o));
    }
    // After extended headers mostly GO: EXPORT_NAME can only end in a hang-up there.
    const fin = sel & 2 && r.finish[0] % 10 !== 0 ? NBD_OPT_GO : FINISH_CODES[r.finish[0] % FINISH_CODES.length]!;
    codes.push(fin);
    parts.push(encodeOption(info, fin, r.finish[1]));
    // Requests follow the header format the options asked for (now and then the other one).
    const ext = codes.includes(NBD_OPT_EXTENDED_HEADERS) !== (r.flags % 13 === 0);
    const reqs: string[] = [];
    for (const q of r.requests) {
      const { head, payload, fill } = encodeRequest(info, q, ext);
      parts.push(head);
      if (payload) parts.push(new Uint8Array(payload).fill(fill));
      reqs.push(`${head[7]}/${payload}`);
    }
    return { bytes: cat(parts), summary: `options [${codes.join(",")}], ${ext ? "extended" : "compact"} requests [${reqs.join(" ")}]`, variantSeed: r.variantSeed };
  });
}

// ---------------------------------------------------------------- the mutation loop ---------

/** xorshift32: the small PRNG of the mutation loop (deterministic from the base's variantSeed). */
export function prng(seed: number): (n: number) => number {
  let x = (seed >>> 0) || 0x9e3779b9;
  return (n) => {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    return x % n;
  };
}

/**
 * Variant `v` of a base input: variant 0 is the base as is, in one chunk; the others cut it at
 * random boundaries, flip, set, delete or insert bytes, stop reading, or hang up part-way.
 */
export function variant(base: BaseInput, v: number): FuzzInput {
  if (v === 0) return { bytes: base.bytes, splits: [], slowReader: false, closeAt: null, note: "as generated" };
  const r = prng(base.variantSeed * 31 + v);
  let b = base.bytes;
  const notes: string[] = [];
  const nm = r(3) === 0 ? 0 : 1 + r(3);
  for (let i = 0; i < nm && b.length > 0; i++) {
    const p = r(b.length);
    const k = r(5);
    if (b === base.bytes) b = b.slice();
    if (k === 0) b[p] = b[p]! ^ (1 << r(8));
    else if (k === 1) b[p] = r(256);
    else if (k === 2) { if (p + 4 <= b.length) putU32(b, p, INTERESTING32[r(INTERESTING32.length)]!); }
    else if (k === 3) { const n = Math.min(1 + r(16), b.length - p); b = cat([b.subarray(0, p), b.subarray(p + n)]); }
    else b = cat([b.subarray(0, p), new Uint8Array(1 + r(16)).fill(r(256)), b.subarray(p)]);
    notes.push(`${["flip", "set", "u32", "delete", "insert"][k]}@${p}`);
  }
  const sk = r(4);
  const splits = sk === 0 ? [] : Array.from({ length: 1 + r(5) }, () => 1 + (sk === 3 ? r(70000) : r(64)));
  const slowReader = r(5) === 0;
  const closeAt = r(5) === 0 ? r(b.length + 1) : null;
  return { bytes: b, splits, slowReader, closeAt, note: `${notes.join(" ") || "no byte changes"}; splits [${splits.join(",")}]${slowReader ? "; slow reader" : ""}${closeAt !== null ? `; hang up at ${closeAt}` : ""}` };
}

/**
 * Cut `b` into chunks by `splits` (cycled). Past the first 8 KiB (the handshake and the first
 * requests' headers) chunks are 64 times larger: tiny chunks all the way through a 100 KiB write
 * would cost thousands of calls and find nothing the first headers do not.
 */
export function chunks(b: Uint8Array, splits: number[]): Uint8Array[] {
  if (splits.length === 0) return [b];
  const out: Uint8Array[] = [];
  let p = 0;
  for (let i = 0; p < b.length; i++) {
    const n = splits[i % splits.length]! * (p < 8192 ? 1 : 64);
    out.push(b.subarray(p, Math.min(b.length, p + n)));
    p += n;
  }
  return out;
}
