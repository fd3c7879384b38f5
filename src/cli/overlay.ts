// bun-nbd overlay create|info|diff|commit|reset|check|list: manage qcow2 copy-on-write overlays
// over raw base images or CD images (their cooked view), and list a per-client overlay directory.
// Argument parsing and wiring only; the format lives in src/devices/qcow2/.
import { closeSync, fdatasyncSync, fstatSync, openSync, statSync, writeSync } from "node:fs";
import { parseArgs } from "node:util";
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate } from "../sys/libc.ts";
import { isCdImage } from "../devices/cd/index.ts";
import { openOverlayBase } from "../devices/open.ts";
import {
  OverlayBase, createOverlayFile, describeIdentity, openImage, resolveBacking, storedIdentity, type BaseIdentity,
} from "../devices/qcow2/index.ts";
import type { Qcow2Overlay } from "../devices/qcow2/image.ts";
import { RW_DENY, lockImage, PERM_CONSISTENT_READ, PERM_WRITE } from "../devices/qcow2/lock.ts";

const USAGE = `usage: bun-nbd overlay <command> [options] OVERLAY

  create [--compat] [--cluster-size BYTES] OVERLAY BASE
                        create an empty overlay over the raw image BASE (backing name stored
                        relative to the overlay when both sit in the same directory), or over
                        the cooked data-track view of the CD image BASE (.cue, .ccd, raw .bin),
                        or over a remote image (http(s)://, s3://: its URL and ETag are recorded)
  info [--json] OVERLAY show the backing file, sizes, allocated bytes and changed ranges
  diff [--json] OVERLAY list the changed ranges (offset, length, data or zero)
  commit [-q] OVERLAY   write the changes into the base image and empty the overlay (refused
                        while anything serves or uses the overlay or the base, and for bases
                        that are not writable raw files, such as CD images and remote objects:
                        bun-nbd publish uploads those merged as a new object)
  reset OVERLAY         discard every change
  check [--repair] [--json] OVERLAY
                        check refcounts; --repair frees leaked clusters (left by a crash)
  list [--json] DIR     the per-client overlays (NAME@CLIENT.qcow2) in a serve --per-client-overlay
                        directory: export, client, size, bytes on disk, last use, in use or idle

Exit status: 0 success; check: 2 corruption found, 3 leaked clusters found; 1 other errors.`;

type Opts = Record<string, string | boolean | undefined>;

export async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  if (!cmd || cmd === "-h" || cmd === "--help" || cmd === "help") {
    console.log(USAGE);
    return cmd ? 0 : 2;
  }
  let parsed;
  try {
    parsed = parseArgs({
      args: rest,
      allowPositionals: true,
      options: {
        json: { type: "boolean" },
        compat: { type: "boolean" },
        "cluster-size": { type: "string" },
        base: { type: "string", short: "b" },
        repair: { type: "boolean", short: "r" },
        quiet: { type: "boolean", short: "q" },
        help: { type: "boolean", short: "h" },
      },
    });
  } catch (e) {
    console.error(`bun-nbd overlay ${cmd}: ${(e as Error).message}\n\n${USAGE}`);
    return 2;
  }
  if (parsed.values.help) { console.log(USAGE); return 0; }
  const pos = parsed.positionals;
  const o = parsed.values as Opts;
  try {
    switch (cmd) {
      case "create": return await create(pos, o);
      case "info": return await info(pos, o);
      case "diff": return await diff(pos, o);
      case "commit": return await commit(pos, o);
      case "reset": return await reset(pos);
      case "check": return await check(pos, o);
      case "list": return (await import("./overlay-list.ts")).list(pos, o);
      default:
        console.error(`bun-nbd overlay: unknown command "${cmd}"\n\n${USAGE}`);
        return 2;
    }
  } catch (e) {
    console.error(`bun-nbd overlay ${cmd}: ${(e as Error).message}`);
    return 1;
  }
}

function one(pos: string[], what: string): string {
  if (pos.length !== 1) throw new Error(`expected exactly one ${what}, got ${pos.length === 0 ? "none" : pos.join(" ")}`);
  return pos[0]!;
}

const quietLog = (_msg: string) => {};
const errLog = (msg: string) => console.error(msg);

async function create(pos: string[], o: Opts): Promise<number> {
  const base = (o.base as string | undefined) ?? pos[1];
  if (pos.length < 1 || base === undefined || pos.length > (o.base ? 1 : 2)) {
    throw new Error("usage: bun-nbd overlay create [--compat] OVERLAY BASE");
  }
  let clusterBits: number | undefined;
  if (o["cluster-size"] !== undefined) {
    const cs = Number(o["cluster-size"]);
    clusterBits = Math.log2(cs);
    if (!Number.isInteger(clusterBits) || clusterBits < 9 || clusterBits > 21) {
      throw new Error(`--cluster-size ${o["cluster-size"]}: must be a power of two from 512 to 2097152`);
    }
  }
  let what = base;
  if (isCdImage(base) || /^(https?|s3):\/\//i.test(base)) {
    // the cooked view (or the remote object) `serve` would give: the overlay records its identity
    const b = await openOverlayBase(base, { log: errLog, remote: { cacheDir: null } });
    try {
      createOverlayFile(pos[0]!, b.base, { compat: !!o.compat, clusterBits });
      what = `${base} (${b.base.identity!.stack})`;
    } finally {
      await b.base.release();
    }
  } else {
    createOverlayFile(pos[0]!, base, { compat: !!o.compat, size: openBaseForCreate(base), clusterBits });
  }
  console.log(`created ${pos[0]} over ${what} (${o.compat ? "standard" : "extended"} L2 entries)`);
  return 0;
}

function openBaseForCreate(base: string): number {
  let fd: number;
  try {
    fd = openSync(base, "r");
  } catch (e) {
    throw new Error(`cannot open base image ${base}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) throw new Error(`base image ${base} is not a regular file`);
    return st.size;
  } finally {
    closeSync(fd);
  }
}

interface Summary {
  overlay: string;
  format: string;
  version: number;
  virtualSize: number;
  clusterSize: number;
  extendedL2: boolean;
  subclusterSize: number;
  backingFile: string;
  fullBackingFile: string;
  backingFormat: string;
  /** What the overlay records about a non-raw base (null for a raw file base). */
  baseIdentity: BaseIdentity | null;
  baseSize: number;
  fileSize: number;
  diskUsage: number;
  changedBytes: number;
  dataBytes: number;
  zeroBytes: number;
  ranges: { offset: number; length: number; kind: "data" | "zero" }[];
}

function summarize(path: string, img: Qcow2Overlay): Summary {
  const h = img.header;
  const ranges = img.changedRanges();
  let dataBytes = 0;
  let zeroBytes = 0;
  for (const r of ranges) if (r.kind === "data") dataBytes += r.length; else zeroBytes += r.length;
  const st = statSync(path);
  return {
    overlay: path, format: "qcow2", version: h.version, virtualSize: h.size, clusterSize: img.clusterSize,
    extendedL2: img.extendedL2, subclusterSize: img.subclusterSize,
    backingFile: h.backingName!, fullBackingFile: resolveBacking(path, h.backingName!),
    backingFormat: h.backingFormat ?? "raw", baseIdentity: storedIdentity(h, path), baseSize: img.baseSize,
    fileSize: st.size, diskUsage: st.blocks * 512,
    changedBytes: dataBytes + zeroBytes, dataBytes, zeroBytes, ranges,
  };
}

function human(n: number): string {
  const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) { v /= 1024; u++; }
  return u === 0 ? `${n} bytes` : `${v.toFixed(v < 10 ? 2 : 1)} ${units[u]}`;
}

async function withImage<T>(path: string, fn: (img: Qcow2Overlay) => T | Promise<T>, rw = false, base?: OverlayBase): Promise<T> {
  // Read-only views take no locks (like qemu-img -U): they work while the overlay is served, and
  // may then miss changes not yet flushed.
  const img = openImage(path, { readOnly: !rw, lock: rw, log: errLog, base });
  try {
    return await fn(img);
  } finally {
    await img.close();
  }
}

async function info(pos: string[], o: Opts): Promise<number> {
  const path = one(pos, "OVERLAY");
  const s = await withImage(path, (img) => summarize(path, img));
  if (o.json) {
    console.log(JSON.stringify(s, null, 2));
    return 0;
  }
  const lines = [
    `overlay:        ${s.overlay}`,
    `format:         qcow2 v${s.version}, ${human(s.clusterSize)} clusters, ${s.extendedL2 ? `extended L2 entries (${human(s.subclusterSize)} subclusters)` : "standard L2 entries"}`,
    `virtual size:   ${s.virtualSize} (${human(s.virtualSize)})`,
    `backing file:   ${s.backingFile}${s.backingFile !== s.fullBackingFile ? ` (${s.fullBackingFile})` : ""}, format ${s.backingFormat}, ${s.baseSize} bytes`,
    ...(s.baseIdentity ? [`base:           ${describeIdentity(s.baseIdentity)}`] : []),
    `overlay file:   ${s.fileSize} bytes, ${s.diskUsage} on disk (${human(s.diskUsage)})`,
    `changed:        ${s.changedBytes} bytes (${human(s.changedBytes)}) in ${s.ranges.length} range(s): ${s.dataBytes} written, ${s.zeroBytes} zeroed or trimmed`,
  ];
  console.log(lines.join("\n"));
  if (s.ranges.length > 0) {
    console.log("changed ranges:");
    printRanges(s.ranges, 20);
  }
  return 0;
}

function printRanges(ranges: Summary["ranges"], limit = Infinity): void {
  const w = 18;
  console.log(`  ${"offset".padEnd(w)} ${"length".padEnd(w)} kind`);
  for (const r of ranges.slice(0, limit)) {
    console.log(`  ${("0x" + r.offset.toString(16)).padEnd(w)} ${("0x" + r.length.toString(16)).padEnd(w)} ${r.kind}`);
  }
  if (ranges.length > limit) console.log(`  ... ${ranges.length - limit} more (bun-nbd overlay diff)`);
}

async function diff(pos: string[], o: Opts): Promise<number> {
  const path = one(pos, "OVERLAY");
  const ranges = await withImage(path, (img) => img.changedRanges());
  if (o.json) console.log(JSON.stringify(ranges));
  else if (ranges.length === 0) console.log("no changes");
  else printRanges(ranges);
  return 0;
}

/** A progress bar on stderr (a line per 10% when stderr is not a terminal). */
function progress(total: number, quiet: boolean): (done: number) => void {
  let lastPct = -1;
  const tty = process.stderr.isTTY;
  return (done) => {
    if (quiet) return;
    const pct = total === 0 ? 100 : Math.floor((done * 100) / total);
    if (pct === lastPct || (!tty && pct % 10 !== 0 && done !== total)) return;
    if (!tty && Math.floor(pct / 10) === Math.floor(lastPct / 10) && lastPct !== -1) return;
    lastPct = pct;
    const width = 30;
    const fill = Math.round((pct * width) / 100);
    const bar = `[${"#".repeat(fill)}${".".repeat(width - fill)}] ${String(pct).padStart(3)}% ${human(done)} / ${human(total)}`;
    process.stderr.write(tty ? `\r${bar}${done === total ? "\n" : ""}` : `${bar}\n`);
  };
}

async function commit(pos: string[], o: Opts): Promise<number> {
  const path = one(pos, "OVERLAY");
  // Find the base from the header, then open it for writing with QEMU-compatible locks: refused
  // while a server (which denies writers on its base) or QEMU uses it.
  const probe = openImage(path, { readOnly: true, lock: false, log: quietLog });
  const basePath = resolveBacking(path, probe.header.backingName!);
  const identity = probe.base.identity;
  await probe.close();
  if (identity !== null && /^(https?|s3):\/\//i.test(identity.location)) {
    throw new Error(`refusing to commit ${path}: its base is the remote object ${describeIdentity(identity)}, which bun-nbd never writes; ` +
      `publish the merged image as a new object instead: bun-nbd publish ${path} s3://BUCKET/NEW-KEY`);
  }
  if (identity !== null) {
    throw new Error(`refusing to commit ${path}: its base is ${describeIdentity(identity)}, not a raw file; ` +
      "a device stack cannot take the changes back (export the overlay's view instead, e.g. bun-nbd serve --overlay and qemu-img convert)");
  }
  const mode = statSync(basePath, { throwIfNoEntry: false })?.mode;
  if (mode !== undefined && (mode & 0o222) === 0) {
    throw new Error(`refusing to commit ${path}: its base ${basePath} is read-only (mode ${(mode & 0o777).toString(8)}); make it writable first if it really should change`);
  }
  let baseFd: number;
  try {
    baseFd = openSync(basePath, "r+");
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    const why = code === "EACCES" || code === "EPERM" || code === "EROFS" ? `it is read-only (${code})` : code ?? (e as Error).message;
    throw new Error(`refusing to commit ${path}: cannot open its base ${basePath} for writing: ${why}`);
  }
  let base: OverlayBase | undefined;
  try {
    lockImage(baseFd, basePath, [PERM_CONSISTENT_READ, PERM_WRITE], RW_DENY);
    base = OverlayBase.rawFile(basePath, baseFd); // closes the fd with its last reference
    const baseSize = base.size;
    await withImage(path, async (img) => {
      const ranges = img.changedRanges();
      let total = 0;
      for (const r of ranges) total += r.length;
      const show = progress(total, !!o.quiet);
      const buf = new Uint8Array(4 * 1024 * 1024);
      const zeros = new Uint8Array(buf.length);
      let done = 0;
      let lost = 0;
      show(0);
      for (const r of ranges) {
        for (let p = r.offset; p < r.offset + r.length;) {
          const n = Math.min(buf.length, r.offset + r.length - p);
          const inBase = Math.max(0, Math.min(n, baseSize - p)); // the 512-byte round-up tail is not in the base
          if (r.kind === "data") {
            const chunk = buf.subarray(0, n);
            await img.pread(chunk, p, 0);
            if (inBase > 0) writeFull(baseFd, chunk, inBase, p);
            for (let k = inBase; k < n; k++) if (chunk[k] !== 0) { lost++; break; }
          } else if (inBase > 0) {
            zeroBase(baseFd, zeros, p, inBase);
          }
          p += n;
          done += n;
          show(done);
        }
      }
      fdatasyncSync(baseFd);
      // Only once the base is durable: empty the overlay (a crash before this leaves both intact,
      // and committing again writes the same bytes).
      img.discardAll();
      if (lost) console.error(`warning: data past the base's end (${baseSize} bytes) was not committed`);
      console.log(`committed ${total} bytes in ${ranges.length} range(s) into ${basePath}; ${path} is now empty`);
    }, true, base);
  } finally {
    if (base === undefined) closeSync(baseFd);
    else await base.release();
  }
  return 0;
}

function writeFull(fd: number, buf: Uint8Array, len: number, pos: number): void {
  for (let d = 0; d < len;) {
    const n = writeSync(fd, buf, d, len - d, pos + d);
    if (n <= 0) throw new Error("short write to the base image");
    d += n;
  }
}

function zeroBase(fd: number, zeros: Uint8Array, pos: number, len: number): void {
  try {
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, pos, len);
    return;
  } catch {
    // no hole punching on this filesystem: write zeros
  }
  for (let d = 0; d < len;) {
    const n = Math.min(zeros.length, len - d);
    writeFull(fd, zeros, n, pos + d);
    d += n;
  }
}

async function reset(pos: string[]): Promise<number> {
  const path = one(pos, "OVERLAY");
  const n = await withImage(path, (img) => {
    const changed = img.changedRanges().reduce((a, r) => a + r.length, 0);
    img.discardAll();
    return changed;
  }, true);
  console.log(`discarded ${n} changed bytes; ${path} is now empty`);
  return 0;
}

async function check(pos: string[], o: Opts): Promise<number> {
  const path = one(pos, "OVERLAY");
  let repaired = 0;
  const log = (msg: string) => { const m = /repaired (\d+) leaked/.exec(msg); if (m) repaired = Number(m[1]); };
  // --repair: a read-write open frees leaked clusters itself. Otherwise a consistent read-only
  // view (refused while the overlay is open for writing elsewhere).
  const img = o.repair
    ? openImage(path, { readOnly: false, lock: true, log })
    : openImage(path, { readOnly: true, lock: true, log });
  let r;
  try {
    r = img.scan(false);
  } finally {
    await img.close();
  }
  const result = { overlay: path, errors: r.errors, leaks: r.leaks, repairedLeaks: repaired, dataClusters: r.dataClusters, fileClusters: r.fileClusters };
  if (o.json) console.log(JSON.stringify(result, null, 2));
  else {
    for (const e of r.errors) console.log(`ERROR ${e}`);
    if (repaired) console.log(`${repaired} leaked cluster(s) repaired`);
    if (r.leaks) console.log(`${r.leaks} leaked cluster(s) found (repair with bun-nbd overlay check --repair)`);
    if (!r.errors.length && !r.leaks) console.log("No errors were found on the overlay.");
    console.log(`${r.dataClusters} data cluster(s), file spans ${r.fileClusters} cluster(s)`);
  }
  return r.errors.length ? 2 : r.leaks ? 3 : 0;
}
