// Big-endian reads for the client's decoders, without DataView or BigInt (see DESIGN.md: a
// DataView per header and getBigUint64 are several times slower): the protocol codec's readers,
// plus a u64 that is exact below 2^53 and NaN above, so callers reject what they cannot represent.
import { getU32 } from "../protocol/codec.ts";

export { getU16 as u16, getU32 as u32 } from "../protocol/codec.ts";

/** A u64 as a number; NaN when it is 2^53 or more. */
export function u64(b: Uint8Array, o: number): number {
  const hi = getU32(b, o);
  if (hi >= 0x200000) return NaN;
  return hi * 0x100000000 + getU32(b, o + 4);
}
