// Superblocks that one read settles: Linux swap (v1 label and UUID), XFS and btrfs, with the
// sanity checks blkid makes before believing a magic number.
import { be16, be32, be64, fixedText, hasText, isZero, le32, le64, uuidBytes } from "../bytes.ts";
import type { Reader } from "../reader.ts";
import type { FsInfo } from "../types.ts";

export async function probeSwap(r: Reader): Promise<FsInfo | null> {
  for (const page of [4096, 8192, 16384, 32768, 65536]) {
    if (r.size < Math.max(page, 10 * 4096)) break;
    const m = await r.read(page - 10, 10);
    const magic = String.fromCharCode(...m);
    if (magic === "SWAP-SPACE") return { type: "swap", version: "0" };
    if (magic !== "SWAPSPACE2") continue;
    const h = await r.read(1024, 512);
    const version = le32(h, 0);
    if (version !== 1 && version !== 0x01000000) return null;
    if (le32(h, 4) === 0) return null;
    const info: FsInfo = { type: "swap", version: "1", size: (le32(h, 4) + 1) * page };
    if (le32(h, 172) === 0 && le32(h, 176) === 0) {
      if (h[28] !== 0) { const l = fixedText(h, 28, 16); if (l) info.label = l; }
      if (!isZero(h, 12, 16)) info.uuid = uuidBytes(h, 12);
    }
    return info;
  }
  return null;
}

export async function probeXfs(r: Reader): Promise<FsInfo | null> {
  if (r.size < 512) return null;
  const s = await r.read(0, 512);
  if (!hasText(s, 0, "XFSB")) return null;
  const blocksize = be32(s, 4), dblocks = be64(s, 8), agcount = be32(s, 88);
  const sectsize = be16(s, 102), inodesize = be16(s, 104);
  const blocklog = s[120]!, sectlog = s[121]!, inodelog = s[122]!, inopblog = s[123]!;
  const ok = agcount > 0 && sectsize >= 512 && sectsize <= 32768 && sectsize === 2 ** sectlog
    && blocksize >= 512 && blocksize <= 65536 && blocksize === 2 ** blocklog
    && inodesize >= 256 && inodesize <= 2048 && inodesize === 2 ** inodelog && blocklog - inodelog === inopblog
    && s[127]! <= 100 && dblocks > 0;
  if (!ok) return null;
  const info: FsInfo = { type: "xfs", size: dblocks * blocksize };
  if (s[108] !== 0) { const l = fixedText(s, 108, 12); if (l) info.label = l; }
  if (!isZero(s, 32, 16)) info.uuid = uuidBytes(s, 32);
  return info;
}

const BTRFS_SB = 65536;

export async function probeBtrfs(r: Reader): Promise<FsInfo | null> {
  if (r.size < BTRFS_SB + 4096) return null;
  const s = await r.read(BTRFS_SB, 4096);
  if (!hasText(s, 64, "_BHRfS_M")) return null;
  const info: FsInfo = { type: "btrfs", size: le64(s, 112) };
  if (s[299] !== 0) { const l = fixedText(s, 299, 256); if (l) info.label = l; }
  if (!isZero(s, 32, 16)) info.uuid = uuidBytes(s, 32);
  return info;
}
