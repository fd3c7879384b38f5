// Reports for people: the text `bun-nbd inspect` prints, the one short phrase `serve` prints per
// export ("FAT12 floppy 1.44M, bootable", "GPT: ESP + ext4", "ISO 9660, El Torito") and a QEMU
// command line that fits what was found. Pure string building.
import { chs } from "./floppy.ts";
import type { FsInfo, Partition, Report } from "./types.ts";

const UNITS = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
export function size(n: number): string {
  let i = 0, v = n;
  while (v >= 1024 && i < UNITS.length - 1) { v /= 1024; i++; }
  if (i === 0) return `${n} bytes`;
  return `${v >= 100 || Number.isInteger(v) ? v.toFixed(0) : v.toFixed(1)} ${UNITS[i]}`;
}

/** "vfat FAT16 \"LABEL\" 1234-ABCD" */
export function fsText(fs: FsInfo): string {
  const parts = [fs.type];
  if (fs.version) parts.push(fs.version);
  if (fs.label !== undefined) parts.push(JSON.stringify(fs.label));
  if (fs.uuid) parts.push(`UUID=${fs.uuid}`);
  if (fs.boot?.length) parts.push(`[${fs.boot.join(", ")}]`);
  return parts.join(" ");
}

/** The short name of a file system in a summary: FAT versions by themselves, ISO 9660 spelled out. */
function shortFs(fs: FsInfo | undefined): string {
  if (!fs) return "data";
  if (fs.type === "vfat") return fs.version ?? "FAT";
  if (fs.type === "iso9660") return "ISO 9660";
  if (fs.type === "udf") return "UDF";
  if (fs.type === "ntfs") return "NTFS";
  return fs.type;
}

const partName = (p: Partition) => (p.esp ? "ESP" : p.filesystem ? shortFs(p.filesystem) : p.typeName);

/** Something firmware would run: boot code in sector 0, an ESP, or a bootable El Torito entry. */
export const isBootable = (r: Report): boolean =>
  r.boot.mbrCode || !!r.boot.esp?.length || !!r.boot.elTorito?.some((e) => e.bootable);

/** The kind of QEMU drive that fits: a floppy, a CD, or a disk. */
export function mediaKind(r: Report): "floppy" | "cdrom" | "disk" {
  if (r.floppy && !r.table) return "floppy";
  const fs = r.filesystem?.type;
  if ((fs === "iso9660" || fs === "udf") && (r.container?.format === "iso" || r.boot.elTorito || !r.table || r.size % 2048 === 0)) return "cdrom";
  return "disk";
}

/** One short phrase for `serve`: what the export holds and whether it boots. */
export function summary(r: Report): string {
  const words: string[] = [];
  if (r.table) {
    const names = r.table.partitions.filter((p) => p.kind !== "extended").map(partName);
    words.push(`${r.table.type === "gpt" ? "GPT" : "MBR"}: ${names.length ? names.join(" + ") : "no partitions"}`);
  } else if (r.filesystem) {
    const fs = r.filesystem;
    if (r.floppy) words.push(`${shortFs(fs)} floppy ${r.floppy.name}`);
    else words.push(fs.label ? `${shortFs(fs)} "${fs.label}"` : shortFs(fs));
  } else if (r.floppy) {
    words.push(`floppy ${r.floppy.name}, no file system recognised`);
  } else {
    words.push(r.source.includes("/p") ? "no file system recognised" : "no partition table or file system recognised");
  }
  if (r.boot.elTorito?.length) words.push("El Torito");
  else if (isBootable(r)) {
    const loader = r.boot.mbrLoader ?? r.table?.partitions.find((p) => p.number === r.boot.activePartition)?.filesystem?.boot?.[0];
    words.push(loader ? `bootable (${loader})` : r.boot.mbrCode ? "bootable" : "bootable (UEFI)");
  } else if (r.floppy) words.push("not bootable");
  return words.join(", ");
}

/** A QEMU command line that fits the export at `uri`. */
export function qemuLine(r: Report, uri: string, readOnly: boolean): string {
  const kind = mediaKind(r);
  const uefiOnly = !!r.boot.esp?.length && !r.boot.mbrCode;
  const bios = uefiOnly ? " -bios /usr/share/ovmf/OVMF.fd" : "";
  const q = "qemu-system-x86_64 -m 512";
  if (kind === "floppy") return `${q} -drive file=${uri},format=raw,if=floppy${readOnly ? ",readonly=on" : ""} -boot a`;
  if (kind === "cdrom") return `${q}${bios} -drive file=${uri},format=raw,media=cdrom,readonly=on -boot d`;
  // QEMU cannot attach a read-only IDE disk: a read-only export goes on virtio
  if (readOnly) return `${q}${bios} -drive file=${uri},format=raw,if=virtio,readonly=on`;
  return `${q}${bios} -drive file=${uri},format=raw`;
}

/** The text `bun-nbd inspect` prints. */
export function formatReport(r: Report): string {
  const out: string[] = [];
  const container = r.container ? `, ${r.container.detail ?? r.container.format}` : "";
  out.push(`${r.source}: ${size(r.size)} (${r.size} bytes)${container}`);
  if (r.container?.backing?.length) out.push(`  backing chain: ${r.container.backing.join(" -> ")}`);
  if (r.notInspected) {
    out.push(`  contents not inspected: ${r.notInspected}`);
    for (const w of r.warnings) out.push(`  warning: ${w}`);
    return out.join("\n") + "\n";
  }
  if (r.floppy) out.push(`  floppy ${r.floppy.name}: ${chs(r.floppy)} (cylinders/heads/sectors per track)`);
  if (r.filesystem) out.push(`  file system: ${fsText(r.filesystem)}`);
  if (r.table) {
    const t = r.table;
    out.push(`  partition table: ${t.type}${t.id ? ` (${t.type === "gpt" ? "disk GUID" : "disk id"} ${t.id})` : ""}, ${t.partitions.length} partition${t.partitions.length === 1 ? "" : "s"}`);
    const rows = t.partitions.map((p) => [
      `${p.number}${p.bootable ? "*" : ""}`, String(p.start), size(p.size), p.kind === "gpt" ? "" : p.kind,
      `${p.typeName} (${p.type})`, p.name ?? "", p.filesystem ? fsText(p.filesystem) : "",
    ]);
    const head = ["#", "start", "size", "kind", "type", "name", "file system"];
    const keep = head.map((_, i) => [0, 1, 2, 4, 6].includes(i) || rows.some((row) => row[i] !== ""));
    const cols = head.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i]!.length)));
    const fmt = (row: string[]) => "    " + row.map((c, i) => (keep[i] ? (i === 6 ? c : c.padEnd(cols[i]!)) : null)).filter((c) => c !== null).join("  ").trimEnd();
    out.push(fmt(head));
    for (const row of rows) out.push(fmt(row));
  } else if (!r.filesystem) {
    out.push("  no partition table or file system recognised");
  }
  out.push(`  boot: ${r.boot.summary.join("; ")}`);
  for (const w of r.warnings) out.push(`  warning: ${w}`);
  return out.join("\n") + "\n";
}
