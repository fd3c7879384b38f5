// Opening compressed images (.xz, .gz, .zip/.imz) as read-only devices of their uncompressed
// bytes: xz through its block index, gzip and deflated zip members through a zran index (built at
// first open, then cached), stored zip members straight from the archive. Cold code.
import { closeSync, fstatSync, openSync } from "node:fs";
import { basename } from "node:path";
import type { BlockDevice } from "../types.ts";
import { FileSlice } from "../slice.ts";
import { cacheDir, contentKey } from "./cache.ts";
import { gzipFraming } from "./gzip.ts";
import { DecompressedDevice, SpillFile } from "./seekable.ts";
import { parseXz, XzSource } from "./xz.ts";
import { chooseMember, locateData, memberFraming, readCentralDirectory } from "./zip.ts";
import { buildIndex, DeflateSource, type Framing, loadIndex } from "./zran.ts";

export type CompressedKind = "xz" | "gzip" | "zip";

export interface OpenedCompressed {
  device: BlockDevice;
  /** One line for the export description. */
  description: string;
  /** The name of what is inside (the zip member, or the file name without .gz/.xz). */
  inner: string;
}

export interface CompressedOptions {
  /** The zip member to serve (archive.zip/MEMBER). */
  member?: string;
  /** Warnings. */
  log: (msg: string) => void;
  /** Notices (index built or loaded). */
  info: (msg: string) => void;
}

/** A single-block xz file larger than this gets a warning (it cannot be read at random). */
const SINGLE_BLOCK_WARN = 16 * 1024 * 1024;

const mib = (n: number) => `${(n / 1048576).toFixed(n < 10485760 ? 2 : 0)} MiB`;

function openFd(path: string): number {
  try {
    return openSync(path, "r");
  } catch (e) {
    throw new Error(`cannot open ${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
}

export function openCompressed(kind: CompressedKind, path: string, opts: CompressedOptions): OpenedCompressed {
  const fd = openFd(path);
  try {
    const size = fstatSync(fd).size;
    if (kind === "xz") return openXz(path, fd, size, opts);
    if (kind === "gzip") {
      const { device, note } = openDeflate(path, fd, 0, size, gzipFraming(fd, size), "gzip", opts);
      return { device, description: `${basename(path)}: gzip, ${mib(device.size())} uncompressed${note}`, inner: basename(path).replace(/\.gz$/i, "") };
    }
    return openZip(path, fd, size, opts);
  } catch (e) {
    try { closeSync(fd); } catch { /* the device may own and have closed it */ }
    throw prefixed(path, e);
  }
}

function prefixed(path: string, e: unknown): Error {
  const msg = (e as Error).message;
  return new Error(msg.startsWith(path) ? msg : `${path}: ${msg}`);
}

function openXz(path: string, fd: number, size: number, opts: CompressedOptions): OpenedCompressed {
  const x = parseXz(fd, size);
  if (x.size === 0) throw new Error("the xz file holds no data");
  const src = new XzSource(basename(path), fd, x.blocks, x.size, () => closeSync(fd));
  const big = src.largest();
  if (big.progressive || (x.blocks.length === 1 && x.size > SINGLE_BLOCK_WARN)) {
    const how = big.progressive ? "decoded once, progressively, into a temporary cache as reads reach it" : "decoded whole into a temporary cache at the first read";
    opts.log(`${path}: ${x.blocks.length === 1 ? "a single xz block" : `an xz block of ${mib(big.bytes)}`}: it can only be decoded from its start, so it is ${how} (recompress with xz -T0 or --block-size=16MiB for random access)`);
  }
  const device = new DecompressedDevice(src, new SpillFile(path));
  const desc = `${basename(path)}: xz, ${x.blocks.length} block${x.blocks.length === 1 ? "" : "s"}${x.streams > 1 ? ` in ${x.streams} streams` : ""}, ${mib(x.size)} uncompressed`;
  return { device, description: desc, inner: basename(path).replace(/\.xz$/i, "") };
}

function openDeflate(path: string, fd: number, start: number, end: number, framing: Framing, what: string, opts: CompressedOptions): { device: DecompressedDevice; note: string } {
  const store = { dir: cacheDir(), key: contentKey(fd, what) };
  const cached = loadIndex(store, end);
  const spill = new SpillFile(path);
  try {
    if (cached) {
      opts.info(`${path}: access-point index loaded from ${store.dir} (${cached.points.out.length} points)`);
      const src = new DeflateSource(basename(path), fd, end, cached.points, cached.size, cached.file, () => closeSync(fd));
      return { device: new DecompressedDevice(src, spill), note: "" };
    }
    const t0 = performance.now();
    const built = buildIndex(fd, start, end, framing, store, (buf, len, pos) => spill.writeSparse(buf, 0, len, pos));
    const secs = (performance.now() - t0) / 1000;
    opts.info(`${path}: indexed ${mib(built.size)} in ${secs.toFixed(2)} s, ${built.points.out.length} access points${store.dir ? ` (cached in ${store.dir})` : " (not cached: no cache directory)"}`);
    const src = new DeflateSource(basename(path), fd, end, built.points, built.size, built.file, () => closeSync(fd));
    return { device: new DecompressedDevice(src, spill, { decoded: true }), note: "" };
  } catch (e) {
    spill.close();
    throw e;
  }
}

function openZip(path: string, fd: number, size: number, opts: CompressedOptions): OpenedCompressed {
  const label = basename(path);
  const { members, cdStart } = readCentralDirectory(fd, size);
  const m = chooseMember(members, opts.member, label);
  locateData(fd, m, cdStart, label);
  const inner = m.name.split("/").pop() ?? m.name;
  if (m.method === 0) {
    const device = new FileSlice(`${label}/${m.name}`, fd, m.dataStart, m.size);
    return { device, description: `${label}: zip member ${m.name}, stored, ${mib(m.size)}`, inner };
  }
  const { device } = openDeflate(path, fd, m.dataStart, m.dataStart + m.compressedSize, memberFraming(m, label), `zip:${m.name}`, opts);
  return { device, description: `${label}: zip member ${m.name}, deflated, ${mib(m.size)} uncompressed`, inner };
}
