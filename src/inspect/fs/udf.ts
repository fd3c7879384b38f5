// UDF: the volume recognition sequence (BEA01 ... NSR02/NSR03) from 32 KiB, the anchor at block
// 256 for each candidate block size, then the main volume descriptor sequence (bounded) for the
// label (logical volume identifier), the UUID blkid derives from the volume set identifier, and
// the UDF revision (from the LVD domain and the integrity descriptor).
import { be16, hasText, le16, le32 } from "../bytes.ts";
import type { Reader } from "../reader.ts";
import type { FsInfo } from "../types.ts";

const VRS = 32768;
const MAX_VDS = 64;

/** A dstring (first byte: compression id 8 = Latin-1 or 16 = UTF-16BE; last byte: used length). */
function dstring(b: Uint8Array, o: number, len: number): string | null {
  const cid = b[o]!;
  let clen = b[o + len - 1]!;
  if (clen > 0) clen--;
  clen = Math.min(clen, len - 2);
  const c = b.subarray(o + 1, o + 1 + clen);
  let s = "";
  if (cid === 8 || cid === 254) for (const x of c) s += String.fromCharCode(x);
  else if (cid === 16 || cid === 255) for (let i = 0; i + 1 < c.length; i += 2) s += String.fromCharCode(be16(c, i));
  else return null;
  const nul = s.indexOf("\0");
  return nul >= 0 ? s.slice(0, nul) : s;
}

/** Descriptor charset is "OSTA Compressed Unicode". */
const osta = (b: Uint8Array, o: number) => b[o] === 0 && hasText(b, o + 1, "OSTA Compressed Unicode");

function uuidFromVolSet(v: string): string | null {
  const bytes = new TextEncoder().encode(v).subarray(0, 16);
  if (bytes.length < 8) return null;
  const isHex = (x: number) => (x >= 0x30 && x <= 0x39) || (x >= 0x41 && x <= 0x46) || (x >= 0x61 && x <= 0x66);
  let nonHex = 16;
  for (let i = 0; i < 16; i++) if (i >= bytes.length || !isHex(bytes[i]!)) { nonHex = i; break; }
  const h2 = (x: number | undefined) => (x ?? 0).toString(16).padStart(2, "0");
  const low = (n: number) => String.fromCharCode(...bytes.subarray(0, n)).toLowerCase();
  if (nonHex < 8) return Array.from(bytes.subarray(0, 8), h2).join("");
  if (nonHex < 16) return low(8) + [8, 9, 10, 11].map((i) => h2(bytes[i])).join("");
  return low(16);
}

export async function probeUdf(r: Reader): Promise<FsInfo | null> {
  if (r.size < VRS + 2048) return null;
  let nsr = false;
  for (let b = 0; b < 64; b++) {
    const d = await r.read(VRS + b * 2048, 8);
    if (d[1] === 0) break;
    const id = String.fromCharCode(...d.subarray(1, 6));
    if (id === "NSR02" || id === "NSR03") { nsr = true; break; }
    if (!["BEA01", "BOOT2", "CD001", "CDW02", "TEA01"].includes(id)) break;
  }
  if (!nsr) return null;
  let bs = 0, avdp: Uint8Array | null = null;
  for (const size of [512, 1024, 2048, 4096]) {
    for (const at of [256, 512]) {
      const d = await r.read(at * size, 512);
      if (le16(d, 0) === 2 && le32(d, 12) === at) { bs = size; avdp = d; break; }
    }
    if (avdp) break;
  }
  if (!avdp) return null;
  const count = Math.min(Math.floor(le32(avdp, 16) / bs), MAX_VDS);
  const loc = le32(avdp, 20);
  const fs: FsInfo = { type: "udf" };
  let rev = 0, lvidLen = 0, lvidLoc = 0;
  for (let i = 0; i < count; i++) {
    const d = await r.read((loc + i) * bs, 512);
    const tag = le16(d, 0);
    if (tag === 0 || le32(d, 12) !== loc + i || tag === 8) break;
    if (tag === 1 && osta(d, 200) && fs.uuid === undefined) {
      const vs = dstring(d, 72, 128);
      const u = vs === null ? null : uuidFromVolSet(vs);
      if (u) fs.uuid = u;
    } else if (tag === 6) {
      if (!lvidLen && le32(d, 268)) { lvidLen = le32(d, 432); lvidLoc = le32(d, 436); }
      if (!rev && hasText(d, 217, "*OSTA UDF Compliant")) rev = le16(d, 240);
      if (fs.label === undefined && osta(d, 20)) {
        const l = dstring(d, 84, 128);
        if (l !== null) fs.label = l.replace(/\s+$/, "");
      }
    }
  }
  if (lvidLoc && lvidLen >= 512) {
    const d = await r.read(lvidLoc * bs, 512);
    const parts = le32(d, 72);
    if (le16(d, 0) === 9 && le32(d, 12) === lvidLoc && le32(d, 76) >= 46 && parts < 32) {
      const iu = await r.read(lvidLoc * bs + 80 + 8 * parts, 48);
      for (const v of [le16(iu, 40), le16(iu, 42)]) if (v && rev < v) rev = v;
    }
  }
  if (rev) fs.version = `${(rev >> 8).toString(16)}.${(rev & 0xff).toString(16).padStart(2, "0")}`;
  if (fs.label === "") delete fs.label;
  return fs;
}
