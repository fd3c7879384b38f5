// Disk images the inspect, partition-export and verify tests build with the real tools: file
// systems made by mkfs.fat, mkfs.exfat, mkfs.ntfs, mkfs.ext2/3/4, mkswap, mkfs.xfs, mkfs.btrfs,
// mkudffs and xorriso, and whole disks partitioned by sfdisk (dos) or sgdisk (gpt) with file
// systems written into their partitions. All sparse; every tool call has a timeout.
import { closeSync, ftruncateSync, mkdirSync, openSync, readSync, rmSync, writeFileSync, writeSync } from "node:fs";
import { join } from "node:path";
import { runOk } from "./env.ts";

export const MiB = 1 << 20;

export type FsKind = "fat12" | "fat16" | "fat32" | "exfat" | "ntfs" | "ext2" | "ext3" | "ext4" | "swap" | "xfs" | "btrfs" | "udf" | "none";

/** Tools each kind needs (for need()). */
export const FS_TOOLS: Record<FsKind, string[]> = {
  fat12: ["mkfs.fat"], fat16: ["mkfs.fat"], fat32: ["mkfs.fat"], exfat: ["mkfs.exfat"], ntfs: ["mkfs.ntfs"],
  ext2: ["mkfs.ext2"], ext3: ["mkfs.ext3"], ext4: ["mkfs.ext4"], swap: ["mkswap"], xfs: ["mkfs.xfs"],
  btrfs: ["mkfs.btrfs"], udf: ["mkudffs"], none: [],
};

/** Make an empty sparse file of `size` bytes. */
export function sparse(path: string, size: number): void {
  rmSync(path, { force: true });
  const fd = openSync(path, "w");
  try { ftruncateSync(fd, size); } finally { closeSync(fd); }
}

/** Format `path` (an existing file of the right size) as `kind` with `label`. */
export async function mkfs(path: string, kind: FsKind, label: string, opts: { files?: string } = {}): Promise<void> {
  const t = { timeoutMs: 60_000 };
  switch (kind) {
    case "fat12": case "fat16": case "fat32":
      await runOk(["mkfs.fat", "-F", kind.slice(3), ...(kind === "fat32" ? ["-s", "1"] : []), "-n", label, path], t);
      return;
    case "exfat": await runOk(["mkfs.exfat", "-L", label, path], t); return;
    case "ntfs": await runOk(["mkfs.ntfs", "-F", "-f", "-q", "-L", label, path], t); return;
    case "ext2": case "ext3": case "ext4":
      await runOk([`mkfs.${kind}`, "-q", "-F", "-L", label, ...(opts.files ? ["-d", opts.files] : []), path], t);
      return;
    case "swap": await runOk(["mkswap", "-L", label, path], t); return;
    case "xfs": await runOk(["mkfs.xfs", "-q", "-f", "-L", label, path], t); return;
    case "btrfs": await runOk(["mkfs.btrfs", "-q", "-f", "-L", label, path], t); return;
    case "udf": await runOk(["mkudffs", `--label=${label}`, path], t); return;
    case "none": return;
  }
}

/** A whole-device file system image (a "superfloppy"). */
export async function fsImage(dir: string, name: string, kind: FsKind, size: number, label: string): Promise<string> {
  const p = join(dir, name);
  sparse(p, size);
  await mkfs(p, kind, label);
  return p;
}

export interface PartSpec {
  /** Size in bytes (a multiple of 1 MiB), or "rest". */
  size: number | "rest";
  /** sfdisk type (e.g. "c", "83", "5", "7", "82") or sgdisk type code (e.g. "ef00", "8300"). */
  type: string;
  fs?: FsKind;
  label?: string;
  /** GPT partition name. */
  name?: string;
  bootable?: boolean;
  /** ext*: populate from this directory (mke2fs -d). */
  files?: string;
}

export interface Disk { path: string; size: number; parts: { start: number; size: number; spec: PartSpec }[] }

/** Copy `src` into `dst` at `offset`, skipping all-zero blocks (so the disk stays sparse). */
export function writeInto(dst: string, src: string, offset: number): void {
  const sfd = openSync(src, "r"), dfd = openSync(dst, "r+");
  try {
    const b = Buffer.alloc(MiB);
    for (let pos = 0; ; pos += b.length) {
      const n = readSync(sfd, b, 0, b.length, pos);
      if (n === 0) break;
      for (let o = 0; o < n; o += 4096) {
        const chunk = b.subarray(o, Math.min(o + 4096, n));
        if (chunk.some((x) => x !== 0)) writeSync(dfd, chunk, 0, chunk.length, offset + pos + o);
      }
    }
  } finally { closeSync(sfd); closeSync(dfd); }
}

/** Where sfdisk/sgdisk put the partitions of `path` (from sfdisk --json, sectors of 512 bytes). */
export async function sfdiskLayout(path: string): Promise<{ label: string; id: string; partitions: { node: string; start: number; size: number; type: string; bootable?: boolean; name?: string; uuid?: string; attrs?: string }[] }> {
  const r = await runOk(["sfdisk", "--json", path], { timeoutMs: 30_000 });
  return JSON.parse(r.stdout).partitiontable;
}

/**
 * Partition a sparse disk of `size` bytes with sfdisk ("dos", logical partitions after a type
 * "5" entry) or sgdisk ("gpt"), then make each partition's file system in a scratch file and copy
 * it into place.
 */
export async function makeDisk(dir: string, name: string, label: "dos" | "gpt", size: number, parts: PartSpec[]): Promise<Disk> {
  const path = join(dir, name);
  sparse(path, size);
  if (label === "dos") {
    const lines = ["label: dos", ...parts.map((p) => `,${p.size === "rest" ? "" : `${p.size / 1024}KiB`},${p.type}${p.bootable ? ",*" : ""}`)];
    await runOk(["sfdisk", "-q", path], { stdin: new TextEncoder().encode(lines.join("\n") + "\n"), timeoutMs: 30_000 });
  } else {
    const args = ["sgdisk", "-o"];
    parts.forEach((p, i) => {
      args.push("-n", `${i + 1}:0:${p.size === "rest" ? "0" : `+${p.size / 1024}K`}`, "-t", `${i + 1}:${p.type}`);
      if (p.name) args.push("-c", `${i + 1}:${p.name}`);
      if (p.bootable) args.push("-A", `${i + 1}:set:2`);
    });
    await runOk([...args, path], { timeoutMs: 30_000 });
  }
  const layout = await sfdiskLayout(path);
  // sfdisk numbers logical partitions from 5: match specs to nodes in order, skipping the extended one
  const out: Disk["parts"] = [];
  const work = join(dir, `${name}.parts`);
  mkdirSync(work, { recursive: true });
  for (const [i, p] of layout.partitions.entries()) {
    const spec = parts[i]!;
    const start = p.start * 512, len = p.size * 512;
    out.push({ start, size: len, spec });
    if (spec.fs && spec.fs !== "none") {
      const f = join(work, `p${i}`);
      sparse(f, len);
      await mkfs(f, spec.fs, spec.label ?? `P${i + 1}`, { files: spec.files });
      writeInto(path, f, start);
      rmSync(f);
    }
  }
  rmSync(work, { recursive: true, force: true });
  return { path, size, parts: out };
}

/** An El Torito ISO (xorriso, Joliet + Rock Ridge) booting a 1.44M floppy image of FAT12. */
export async function makeIso(dir: string, name: string, label: string): Promise<string> {
  const root = join(dir, `${name}.root`);
  mkdirSync(root, { recursive: true });
  writeFileSync(join(root, "README.TXT"), "bun-nbd test ISO\n");
  const floppy = await fsImage(root, "boot.img", "fat12", 1474560, "BOOTFLOPPY");
  void floppy;
  const iso = join(dir, name);
  await runOk(["xorriso", "-as", "mkisofs", "-quiet", "-o", iso, "-V", label, "-J", "-R", "-b", "boot.img", "-c", "boot.cat", root], { timeoutMs: 60_000 });
  rmSync(root, { recursive: true, force: true });
  return iso;
}

/** blkid -p -o export [-O off -S size] as a key/value map (empty when nothing is found). */
export async function blkid(path: string, offset?: number, size?: number): Promise<Record<string, string>> {
  const { run } = await import("./env.ts");
  const args = ["blkid", "-p", "-o", "export", ...(offset !== undefined ? ["-O", String(offset)] : []), ...(size !== undefined ? ["-S", String(size)] : []), path];
  const r = await run(args, { timeoutMs: 30_000 });
  const out: Record<string, string> = {};
  for (const line of r.stdout.split("\n")) {
    const i = line.indexOf("=");
    if (i > 0) out[line.slice(0, i)] = line.slice(i + 1).replace(/\\(.)/g, "$1");
  }
  return out;
}
