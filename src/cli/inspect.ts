// `bun-nbd inspect FILE|URI [--json]`: what an image holds (container, partition table, file
// systems, how it boots). Wiring only: files are opened through src/devices, NBD exports through
// the client, and src/inspect does all the parsing over either.
import { dirname, isAbsolute, join } from "node:path";
import { existsSync } from "node:fs";
import { commandArgs } from "./args.ts";
import { connect } from "../client/index.ts";
import { RawFile } from "../devices/file.ts";
import { openExports } from "../devices/open.ts";
import { deviceSource } from "../devices/partition-exports.ts";
import type { BlockDevice } from "../devices/types.ts";
import { formatReport, inspect, qcow2Header, Reader, sniffContainer, type ContainerInfo, type Report } from "../inspect/index.ts";

const HELP = `usage: bun-nbd inspect [--json] FILE|URI

Show what a disk image holds: the container (raw, qcow2 and its backing chain, VHD,
compressed, CUE/CCD, ISO), the partition table (dos or gpt, as blkid's PTTYPE) with every
partition's start, size, type and name, the file system on the whole device and in each
partition (TYPE, VERSION, LABEL and UUID as blkid prints them), how it boots (MBR boot
code, active partition, El Torito entries, EFI System Partition, boot-loader signatures),
floppy geometry, and warnings about anything damaged or hostile.

FILE is a local image; URI is an NBD export (nbd://host:port/name, nbd+unix:///name?socket=P)
of any server.

options:
  --json        the report as JSON`;

const COMPRESSED = new Set(["xz", "gzip", "zip", "imz", "bzip2", "zstd", "vhd"]);
const MAX_CHAIN = 16;

export async function main(argv: string[]): Promise<number> {
  const args = commandArgs("inspect", HELP, argv, { json: { type: "boolean" } }, { min: 1, max: 1, what: "one FILE or URI" });
  if (typeof args === "number") return args;
  const target = args.positionals[0]!;
  let report: Report;
  try {
    report = /^[a-z][a-z0-9+.-]*:\/\//i.test(target) ? await inspectUri(target) : await inspectFile(target);
  } catch (e) {
    console.error(`bun-nbd inspect: ${(e as Error).message}`);
    return 1;
  }
  process.stdout.write(args.values.json ? JSON.stringify(report, null, 2) + "\n" : formatReport(report));
  return 0;
}

async function inspectUri(uri: string): Promise<Report> {
  const client = await connect(uri, { metaContexts: [], requestTimeoutMs: 30_000 });
  try {
    const desc = client.info.description;
    return await inspect(client, { source: uri, container: { format: "nbd", detail: `NBD export${desc ? ` (${desc})` : ""}` } });
  } finally {
    await client.close();
  }
}

async function inspectFile(path: string): Promise<Report> {
  const raw = RawFile.open(path, { readOnly: true });
  let container: ContainerInfo;
  const extra: string[] = [];
  const fileSize = raw.size();
  try {
    container = await sniffContainer(Reader.over(deviceSource(raw)), path);
    if (container.format === "qcow2") container.backing = await backingChain(raw, path, extra);
  } finally {
    raw.close();
  }
  const opened: BlockDevice[] = [];
  let why = "";
  try {
    let device: BlockDevice | null = null;
    if (container.format === "qcow2") {
      const base = container.backing?.length === 1 ? resolveBacking(path, container.backing[0]!) : null;
      if (base && existsSync(base)) {
        const { openOverlay } = await import("../devices/qcow2/index.ts");
        device = await openOverlay({ base, overlay: path, readOnly: true, log: (m) => extra.push(m) });
        opened.push(device);
      } else {
        why = "bun-nbd reads qcow2 files only as overlays over one raw backing file that exists";
      }
    } else {
      const specs = await openExports([path], { readOnly: true, log: (m) => extra.push(m) });
      for (const s of specs) opened.push(s.device);
      device = specs[0]?.device ?? null;
      if (device && COMPRESSED.has(container.format) && device.size() === fileSize) {
        why = `this build serves ${container.format} files as stored bytes`;
        device = null;
      }
    }
    const report: Report = device
      ? await inspect(deviceSource(device), { source: path, container })
      : { source: path, size: fileSize, container, partialSector: 0, boot: { mbrCode: false, summary: [] }, warnings: [], notInspected: why };
    report.warnings.unshift(...extra);
    return report;
  } finally {
    for (const d of opened) await d.close?.();
  }
}

function resolveBacking(from: string, name: string): string {
  return isAbsolute(name) ? name : join(dirname(from), name);
}

/** The qcow2 backing chain of `path` (names as stored), following qcow2 backing files that exist. */
async function backingChain(raw: RawFile, path: string, warnings: string[]): Promise<string[]> {
  const chain: string[] = [];
  const seen = new Set<string>([path]);
  let cur = path;
  let head = await Reader.over(deviceSource(raw)).read(0, 65536);
  for (let depth = 0; depth < MAX_CHAIN; depth++) {
    const h = qcow2Header(head);
    if (!h?.backing) return chain;
    chain.push(h.backing);
    const next = resolveBacking(cur, h.backing);
    if (seen.has(next)) { warnings.push(`qcow2 backing chain loops at ${h.backing}`); return chain; }
    seen.add(next);
    if (!existsSync(next)) { warnings.push(`backing file ${next} does not exist`); return chain; }
    const f = RawFile.open(next, { readOnly: true });
    try { head = await Reader.over(deviceSource(f)).read(0, 65536); } finally { f.close(); }
    cur = next;
  }
  warnings.push(`qcow2 backing chain longer than ${MAX_CHAIN}; stopped`);
  return chain;
}
