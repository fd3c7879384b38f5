// The step after opening: inspect each whole-disk export once, add what was found to its
// description (with floppy geometry), and offer each partition of an MBR or GPT disk as an export
// of its own, "<disk>/p<N>", a PartitionView over the disk's device stack. Kept apart from
// open.ts: it takes the opened export list and returns a longer one.
import { chs, formatBytes, inspect, summary, type ByteSource, type Partition, type Report } from "../inspect/index.ts";
import { PartitionView, shareDevice } from "./partition-view.ts";
import { isPromise, type BlockDevice, type ExportSpec } from "./types.ts";

/** Reads of a device stack as an inspection source (sync and async devices alike). */
export function deviceSource(dev: BlockDevice): ByteSource {
  return {
    size: dev.size(),
    read(offset: number, length: number) {
      const b = new Uint8Array(length);
      const r = dev.pread(b, offset, 0);
      return isPromise(r) ? r.then(() => b) : b;
    },
  };
}

export interface DescribedExports {
  specs: ExportSpec[];
  /** The inspection of every whole-disk export and partition export, by export name. */
  reports: Map<string, Report>;
}

export interface DescribeOptions {
  /** Offer partition exports (serve's default; --no-partitions turns it off). */
  partitions: boolean;
  log: (msg: string) => void;
}

/** One phrase for a description: the summary, with floppy geometry when there is one. */
export function describe(r: Report): string {
  return r.floppy && !r.table ? `${summary(r)}, ${chs(r.floppy)} C/H/S` : summary(r);
}

function partitionDescription(disk: string, p: Partition): string {
  const fs = p.filesystem;
  const what = [`partition ${p.number} of ${disk}`, `${p.typeName} (${p.type})`];
  if (p.name) what.push(`"${p.name}"`);
  if (fs) what.push(`${fs.type === "vfat" ? fs.version ?? "vfat" : fs.type}${fs.label ? ` "${fs.label}"` : ""}`);
  what.push(formatBytes(p.size));
  return what.join(", ");
}

/**
 * Inspect every export whose name has no "/" (CD track views and partition exports are parts of
 * something already inspected), and insert the partition exports right after their disk, so the
 * first export (the default) stays first.
 */
export async function describeExports(specs: ExportSpec[], opts: DescribeOptions): Promise<DescribedExports> {
  const out: ExportSpec[] = [];
  const reports = new Map<string, Report>();
  const taken = new Set(specs.map((s) => s.name));
  for (const spec of specs) {
    out.push(spec);
    if (spec.name.includes("/")) continue;
    const report = await inspect(deviceSource(spec.device), { source: spec.name });
    reports.set(spec.name, report);
    // an export whose contents say nothing recognisable keeps the description it had
    if (report.table || report.filesystem || report.floppy || report.boot.mbrCode) {
      const phrase = describe(report);
      spec.description = spec.description ? `${spec.description}: ${phrase}` : phrase;
    }
    for (const w of report.warnings) opts.log(`${spec.name}: ${w}`);
    if (!opts.partitions || !report.table) continue;
    const disk = spec.name || "default export";
    const bs = spec.device.blockSize?.()?.minimum ?? 1;
    const offered: Partition[] = [];
    for (const p of report.table.partitions) {
      if (p.kind === "extended") continue;
      const name = `${spec.name}/p${p.number}`;
      if (taken.has(name)) { opts.log(`${name}: an export of that name exists already; partition not offered`); continue; }
      if (p.start + p.size > spec.device.size()) { opts.log(`${name}: the partition runs past the end of the disk; not offered`); continue; }
      if (p.start % bs !== 0 || p.size % bs !== 0) { opts.log(`${name}: not aligned to the disk's ${bs}-byte blocks; not offered`); continue; }
      taken.add(name);
      offered.push(p);
    }
    if (!offered.length) continue;
    const [own, ...views] = shareDevice(spec.device, offered.length + 1);
    spec.device = own!;
    offered.forEach((p, i) => {
      const name = `${spec.name}/p${p.number}`;
      out.push({ name, description: partitionDescription(disk, p), device: new PartitionView(views[i]!, p.start, p.size) });
      reports.set(name, partitionReport(report, p));
    });
  }
  return { specs: out, reports };
}

/** What serve says about a partition export: its own file system, as if inspected alone. */
function partitionReport(disk: Report, p: Partition): Report {
  const r: Report = { source: `${disk.source}/p${p.number}`, size: p.size, partialSector: p.size % 512, boot: { mbrCode: false, summary: [] }, warnings: [] };
  if (p.filesystem) r.filesystem = p.filesystem;
  if (p.filesystem?.boot?.length) { r.boot.mbrCode = true; r.boot.mbrLoader = p.filesystem.boot[0]; }
  return r;
}
