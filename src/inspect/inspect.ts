// One inspection: from a byte source to a Report. Finds the partition table (MBR or GPT), the file
// system on the whole device and in each partition, how it boots, floppy geometry and odd sizes.
// Every problem becomes a warning in the report: nothing a hostile image holds makes this throw or
// read without bound (see reader.ts for the read budget).
import { bootLoader, hasBootCode, isPlaceholderBoot, vbrCodeStart } from "./boot.ts";
import { floppyFor } from "./floppy.ts";
import { elTorito, fatBootSector, ntfsBootSector, probeFilesystem } from "./fs/index.ts";
import { parseGpt } from "./gpt.ts";
import { hasProtectiveEntry, looksLikeMbr, parseMbr } from "./mbr.ts";
import { GPT_BIOS_BOOT } from "./ptypes.ts";
import { type ByteSource, Reader, ReadBudgetExceeded } from "./reader.ts";
import type { BootInfo, ContainerInfo, FsInfo, Partition, PartitionTable, Report } from "./types.ts";

export interface InspectOptions {
  /** A name for the report (file path or URI). */
  source: string;
  container?: ContainerInfo;
  /** Bytes one inspection may read in all (default 64 MiB). */
  budget?: number;
}

export async function inspect(src: ByteSource, opts: InspectOptions): Promise<Report> {
  const r = Reader.over(src, opts.budget);
  const report: Report = { source: opts.source, size: r.size, partialSector: r.size % 512, boot: { mbrCode: false, summary: [] }, warnings: [] };
  if (opts.container) report.container = opts.container;
  const warn = (m: string) => { if (!report.warnings.includes(m)) report.warnings.push(m); };
  if (report.partialSector) warn(`size ${r.size} is not a whole number of 512-byte sectors (${report.partialSector} bytes over)`);
  const geometry = floppyFor(r.size);
  if (geometry) report.floppy = geometry;
  try {
    await examine(r, report, warn);
  } catch (e) {
    warn(e instanceof ReadBudgetExceeded ? e.message : `inspection stopped: ${(e as Error).message}`);
  }
  report.boot.summary = bootSummary(report);
  // a stable key order for --json: what it is, what is in it, how it boots, what is wrong
  const { source, size, container, partialSector, floppy, table, filesystem, boot, warnings } = report;
  return { source, size, container, partialSector, floppy, table, filesystem, boot, warnings };
}

async function examine(r: Reader, report: Report, warn: (m: string) => void): Promise<void> {
  if (r.size < 512) { warn("smaller than one sector"); return; }
  const s0 = await r.read(0, 512);
  const whole = await probeFilesystem(r);
  if (whole) report.filesystem = whole.fs;
  report.table = await partitionTable(r, s0, whole?.fs, warn) ?? undefined;
  if (report.table) {
    for (const p of report.table.partitions) {
      if (p.kind === "extended") continue;
      const region = r.region(p.start, p.size);
      const found = await probeFilesystem(region);
      if (found) {
        p.filesystem = found.fs;
        await vbrLoader(region, found.fs);
        checkFits(found.fs, p.size, `partition ${p.number}`, warn);
      }
    }
    checkLayout(report.table, r.size, whole?.fs.type === "iso9660", warn);
  } else if (whole) {
    checkFits(whole.fs, r.size, "the image", warn);
  }
  await bootInfo(r, s0, report, whole?.catalogLba, warn);
}

async function partitionTable(r: Reader, s0: Uint8Array, fs: FsInfo | undefined, warn: (m: string) => void): Promise<PartitionTable | null> {
  if (looksLikeMbr(s0)) {
    if (hasProtectiveEntry(s0)) {
      const gpt = await parseGpt(r, warn);
      if (!gpt) warn("sector 0 holds a GPT protective MBR but no valid GPT was found");
      return gpt;
    }
    // A FAT, NTFS or exFAT boot sector also ends in 55AA: it is not a partition table (blkid
    // excludes FAT and NTFS; an exFAT volume is excluded too, where blkid reports an empty "dos")
    if (fatBootSector(s0) || ntfsBootSector(s0) || fs?.type === "exfat") return null;
    return parseMbr(r, s0, warn);
  }
  const b = await r.read(512, 8);
  if (String.fromCharCode(...b) === "EFI PART") {
    const gpt = await parseGpt(r, warn);
    if (gpt) warn("GPT found without a protective MBR in sector 0 (blkid ignores such a table)");
    return gpt;
  }
  return null;
}

/** Record the boot loader in a file system's first sector (its volume boot record). */
async function vbrLoader(r: Reader, fs: FsInfo): Promise<void> {
  if (!["vfat", "ntfs", "exfat"].includes(fs.type)) return;
  const vbr = await r.read(0, 512);
  const loader = bootLoader(vbr);
  if (loader) fs.boot = [loader];
}

function checkFits(fs: FsInfo, room: number, where: string, warn: (m: string) => void): void {
  if (fs.size !== undefined && fs.size > room) {
    warn(`${fs.type} in ${where} claims ${fs.size} bytes but only ${room} are there (truncated image?)`);
  }
}

/** Partitions past the end, over the table, or overlapping (a hybrid ISO's MBR may cover sector 0). */
function checkLayout(t: PartitionTable, size: number, hybridIso: boolean, warn: (m: string) => void): void {
  for (const p of t.partitions) {
    if (p.start >= size) warn(`partition ${p.number} starts past the end of the disk (at byte ${p.start} of ${size})`);
    else if (p.start + p.size > size) warn(`partition ${p.number} runs past the end of the disk (ends at byte ${p.start + p.size} of ${size})`);
    if (p.start === 0 && p.kind !== "extended" && !hybridIso) warn(`partition ${p.number} starts at sector 0, over the partition table`);
  }
  const data = t.partitions.filter((p) => p.kind !== "extended").sort((a, b) => a.start - b.start);
  for (let i = 1; i < data.length; i++) {
    const a = data[i - 1]!, b = data[i]!;
    if (b.start < a.start + a.size) warn(`partitions ${a.number} and ${b.number} overlap`);
  }
}

async function bootInfo(r: Reader, s0: Uint8Array, report: Report, catalogLba: number | undefined, warn: (m: string) => void): Promise<void> {
  const boot: BootInfo = report.boot;
  const vbr = report.table ? undefined : report.filesystem && vbrCodeStart(report.filesystem.type, report.filesystem.version);
  const code = (vbr === undefined ? hasBootCode(s0) : hasBootCode(s0, vbr, 510)) && !isPlaceholderBoot(s0);
  boot.mbrCode = code;
  if (code) {
    const l = bootLoader(s0.subarray(0, vbr === undefined ? 446 : 510));
    if (l) boot.mbrLoader = l;
  }
  const parts = report.table?.partitions ?? [];
  const active = parts.find((p) => report.table?.type === "dos" && p.bootable);
  if (active) boot.activePartition = active.number;
  const esp = parts.filter((p) => p.esp).map((p) => p.number);
  if (esp.length) boot.esp = esp;
  if (catalogLba !== undefined) {
    const entries = await elTorito(r, catalogLba, warn);
    for (const e of entries) {
      if (!r.within(e.loadRba * 2048, 512)) { warn(`El Torito boot image at LBA ${e.loadRba} lies past the end of the image`); continue; }
      const img = await r.read(e.loadRba * 2048, 2048);
      const fat = fatBootSector(img.subarray(0, 512));
      const loader = bootLoader(img);
      if (loader) e.loader = loader;
      else if (fat) e.loader = `${fat.geometry.version} image`;
    }
    boot.elTorito = entries;
  }
}

function fsName(fs: FsInfo | undefined): string {
  if (!fs) return "unknown";
  return fs.type === "vfat" ? fs.version ?? "FAT" : fs.type;
}

/** Human lines: how (and whether) this image boots. */
function bootSummary(report: Report): string[] {
  const b = report.boot;
  const out: string[] = [];
  const parts: Partition[] = report.table?.partitions ?? [];
  const whole = report.filesystem;
  if (b.mbrCode) {
    const what = b.mbrLoader ? `${b.mbrLoader} boot code` : "boot code";
    const where = report.table ? "in the MBR" : whole ? `in the ${fsName(whole)} boot sector` : "in sector 0";
    const loaders = whole?.boot ?? [];
    out.push(`BIOS: ${what} ${where}${loaders.length ? ` (${loaders.join(", ")})` : ""}`);
  }
  if (b.activePartition !== undefined) {
    const p = parts.find((x) => x.number === b.activePartition);
    const vbr = p?.filesystem?.boot?.length ? ` (${p.filesystem.boot.join(", ")})` : "";
    out.push(`active partition ${b.activePartition}${vbr}${b.mbrCode ? "" : ", but no boot code in the MBR"}`);
  }
  const biosBoot = parts.find((p) => p.type === GPT_BIOS_BOOT);
  if (biosBoot) out.push(`BIOS boot partition ${biosBoot.number} (GRUB core on GPT)`);
  if (b.esp?.length) out.push(`UEFI: EFI System Partition ${b.esp.map((n) => `p${n}`).join(", ")}`);
  for (const e of b.elTorito ?? []) {
    out.push(`El Torito: ${e.platform}, ${e.emulation}${e.bootable ? "" : " (not bootable)"}${e.loader ? `, ${e.loader}` : ""}`);
  }
  if (!out.length) out.push("not bootable (no boot code, active partition, ESP or El Torito catalog found)");
  return out;
}
