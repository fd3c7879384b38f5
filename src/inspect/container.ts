// What kind of file holds the image: recognised from its first bytes (and, for text formats, its
// name) rather than trusted from the extension. qcow2 headers are parsed far enough to give the
// backing file name; following the chain is the caller's (it needs to open files).
import { be32, be64, hasText } from "./bytes.ts";
import type { Reader } from "./reader.ts";
import type { ContainerInfo } from "./types.ts";

export interface Qcow2Header { version: number; size: number; backing?: string }

export function qcow2Header(h: Uint8Array): Qcow2Header | null {
  if (!hasText(h, 0, "QFI\xfb")) return null;
  const out: Qcow2Header = { version: be32(h, 4), size: be64(h, 24) };
  const off = be64(h, 8), len = be32(h, 16);
  if (off > 0 && len > 0 && len <= 1023 && off + len <= h.length) out.backing = new TextDecoder().decode(h.subarray(off, off + len));
  return out;
}

const VHD_TYPES: Record<number, string> = { 2: "fixed", 3: "dynamic", 4: "differencing" };

/** Sniff the container of a file of `r.size` bytes named `name`. */
export async function sniffContainer(r: Reader, name: string): Promise<ContainerInfo> {
  const head = await r.read(0, 4096);
  const lower = name.toLowerCase();
  const q = qcow2Header(head);
  if (q) {
    const c: ContainerInfo = { format: "qcow2", detail: `qcow2 v${q.version}, virtual size ${q.size} bytes` };
    if (q.backing) c.backing = [q.backing];
    return c;
  }
  if (hasText(head, 0, "\xfd7zXZ\0")) return { format: "xz" };
  if (head[0] === 0x1f && head[1] === 0x8b) return { format: "gzip" };
  if (hasText(head, 0, "PK\x03\x04")) return { format: lower.endsWith(".imz") ? "imz" : "zip" };
  if (hasText(head, 0, "BZh")) return { format: "bzip2" };
  if (head[0] === 0x28 && head[1] === 0xb5 && head[2] === 0x2f && head[3] === 0xfd) return { format: "zstd" };
  if (hasText(head, 0, "conectix")) return { format: "vhd", detail: `${VHD_TYPES[be32(head, 60)] ?? "unknown"} VHD` };
  if (r.size >= 512) {
    const foot = await r.read(r.size - 512, 512);
    if (hasText(foot, 0, "conectix")) return { format: "vhd", detail: `${VHD_TYPES[be32(foot, 60)] ?? "unknown"} VHD, ${be64(foot, 48)} bytes` };
  }
  if (lower.endsWith(".cue")) return { format: "cue", detail: "CUE sheet" };
  if (lower.endsWith(".ccd")) return { format: "ccd", detail: "CloneCD control file" };
  if (head[0] === 0 && head.subarray(1, 11).every((x) => x === 0xff) && head[11] === 0 && r.size % 2352 === 0) {
    return { format: "raw CD", detail: "raw 2352-byte CD sectors" };
  }
  const pvd = await r.read(32769, 5);
  if (hasText(pvd, 0, "CD001") && r.size % 2048 === 0) return { format: "iso", detail: "ISO 9660 image (2048-byte sectors)" };
  return { format: "raw" };
}
