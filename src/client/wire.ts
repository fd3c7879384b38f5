// Big-endian field access on plain byte arrays, without DataView or BigInt (see DESIGN.md: a
// DataView per header and getBigUint64 are several times slower). 64-bit values are exact below
// 2^53; larger ones decode as NaN and the caller rejects them.

export function u16(b: Uint8Array, o: number): number {
  return (b[o]! << 8) | b[o + 1]!;
}

export function u32(b: Uint8Array, o: number): number {
  return ((b[o]! << 24) | (b[o + 1]! << 16) | (b[o + 2]! << 8) | b[o + 3]!) >>> 0;
}

/** A u64 as a number; NaN when it is 2^53 or more. */
export function u64(b: Uint8Array, o: number): number {
  const hi = u32(b, o);
  if (hi >= 0x200000) return NaN;
  return hi * 0x100000000 + u32(b, o + 4);
}

export function put16(b: Uint8Array, o: number, v: number): void {
  b[o] = v >>> 8;
  b[o + 1] = v;
}

export function put32(b: Uint8Array, o: number, v: number): void {
  b[o] = v >>> 24;
  b[o + 1] = v >>> 16;
  b[o + 2] = v >>> 8;
  b[o + 3] = v;
}

/** Writes a non-negative integer below 2^53 as a u64. */
export function put64(b: Uint8Array, o: number, v: number): void {
  const hi = Math.floor(v / 0x100000000);
  put32(b, o, hi);
  put32(b, o + 4, v - hi * 0x100000000);
}
