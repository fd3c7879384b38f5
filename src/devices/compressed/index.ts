// Opening compressed images (.xz, .gz, .zip/.imz) as read-only devices of their uncompressed
// bytes: xz through its block index, gzip and deflated zip members through a zran index (built at
// first open, then cached), stored zip members straight from the archive. Cold code.
import { closeSync, fstatSync, openSync } from "node:fs";
import { basename } from "node:path";
import { FileSlice } from "../slice.ts";
import { NotLocal, untilLocal } from "../staged.ts";
import type { BlockDevice, Maybe } from "../types.ts";
import { cacheDir, contentKey } from "./cache.ts";
import { gzipFraming } from "./gzip.ts";
import { type Input, localInput } from "./input.ts";
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

/**
 * Where a compressed image's bytes come from, local file or remote object alike: the input every
 * parser and decoder reads, the key its zran index is cached under, a device for a stored zip
 * member, and what closes it.
 */
export interface Container {
  /** For messages: the path or URL. */
  where: string;
  /** The file name, for the description. */
  label: string;
  input: Input;
  /** The cache key of the index of `what` ("gzip", "zip:MEMBER"). */
  key(what: string): string;
  /** Make [pos, pos+len) local before a sequential pass (a no-op for a local file). */
  prefetch(pos: number, len: number): Promise<void>;
  /** The stored bytes [start, start+length) as a device (a zip member that is not compressed). */
  stored(name: string, start: number, length: number): BlockDevice;
  close(): Maybe;
}

export async function openCompressed(kind: CompressedKind, path: string, opts: CompressedOptions): Promise<OpenedCompressed> {
  const fd = openFd(path);
  let owned = false;
  try {
    const c: Container = {
      where: path, label: basename(path), input: localInput(fd, fstatSync(fd).size),
      key: (what) => contentKey(fd, what),
      prefetch: async () => {},
      stored: (name, start, length) => { owned = true; return new FileSlice(name, fd, start, length); },
      close: () => { owned = true; closeSync(fd); },
    };
    return await openContainer(kind, c, opts);
  } catch (e) {
    if (!owned) try { closeSync(fd); } catch { /* ignore */ }
    throw e;
  }
}

/**
 * Open a compressed image from its container. On failure what it opened is closed, and c.close()
 * has not been called (the caller closes the container). Metadata is read through untilLocal: a
 * remote object's headers and directories are fetched as the parsers reach them.
 */
export async function openContainer(kind: CompressedKind, c: Container, opts: CompressedOptions): Promise<OpenedCompressed> {
  try {
    if (kind === "xz") return await openXz(c, opts);
    if (kind === "gzip") {
      const device = await openDeflate(c, 0, c.input.size, () => gzipFraming(c.input), "gzip", opts);
      return { device, description: `${c.label}: gzip, ${mib(device.size())} uncompressed`, inner: c.label.replace(/\.gz$/i, "") };
    }
    return await openZip(c, opts);
  } catch (e) {
    throw prefixed(c.where, e);
  }
}

function prefixed(path: string, e: unknown): Error {
  const msg = (e as Error).message;
  return new Error(msg.startsWith(path) ? msg : `${path}: ${msg}`);
}

async function openXz(c: Container, opts: CompressedOptions): Promise<OpenedCompressed> {
  const x = await untilLocal(() => parseXz(c.input));
  if (x.size === 0) throw new Error("the xz file holds no data");
  const src = new XzSource(c.label, c.input, x.blocks, x.size, () => c.close());
  const big = src.largest();
  if (big.progressive || (x.blocks.length === 1 && x.size > SINGLE_BLOCK_WARN)) {
    const how = big.progressive ? "decoded once, progressively, into a temporary cache as reads reach it" : "decoded whole into a temporary cache at the first read";
    opts.log(`${c.where}: ${x.blocks.length === 1 ? "a single xz block" : `an xz block of ${mib(big.bytes)}`}: it can only be decoded from its start, so it is ${how} (recompress with xz -T0 or --block-size=16MiB for random access)`);
  }
  const device = new DecompressedDevice(src, new SpillFile(c.where));
  const desc = `${c.label}: xz, ${x.blocks.length} block${x.blocks.length === 1 ? "" : "s"}${x.streams > 1 ? ` in ${x.streams} streams` : ""}, ${mib(x.size)} uncompressed`;
  return { device, description: desc, inner: c.label.replace(/\.xz$/i, "") };
}

/**
 * Deflate data in [start, end): through the cached access-point index, or one pass that builds
 * it (the input made local first: for a remote object, fetched in large requests, not piece by piece).
 */
async function openDeflate(c: Container, start: number, end: number, framing: () => Framing, what: string, opts: CompressedOptions): Promise<DecompressedDevice> {
  const store = { dir: cacheDir(), key: c.key(what) };
  const cached = loadIndex(store, end);
  const spill = new SpillFile(c.where);
  try {
    if (cached) {
      opts.info(`${c.where}: access-point index loaded from ${store.dir} (${cached.points.out.length} points)`);
      const src = new DeflateSource(c.label, c.input, end, cached.points, cached.size, cached.file, () => c.close());
      return new DecompressedDevice(src, spill);
    }
    const t0 = performance.now();
    await c.prefetch(start, end - start);
    // (a run cut short by NotLocal, should the bytes not stay local, is started again from scratch)
    const built = await untilLocal(() => buildIndex(c.input, start, end, framing(), store, (buf, len, pos) => spill.writeSparse(buf, 0, len, pos)), 8).catch((e) => {
      // the pass needs every compressed byte local at once: a remote object's cache must hold them all
      throw e instanceof NotLocal ? new Error(`indexing needs all ${mib(end - start)} of compressed data in the cache at once; it does not stay there (raise --cache-size)`) : e;
    });
    const secs = (performance.now() - t0) / 1000;
    opts.info(`${c.where}: indexed ${mib(built.size)} in ${secs.toFixed(2)} s, ${built.points.out.length} access points${store.dir ? ` (cached in ${store.dir})` : " (not cached: no cache directory)"}`);
    const src = new DeflateSource(c.label, c.input, end, built.points, built.size, built.file, () => c.close());
    return new DecompressedDevice(src, spill, { decoded: true });
  } catch (e) {
    spill.close();
    throw e;
  }
}

async function openZip(c: Container, opts: CompressedOptions): Promise<OpenedCompressed> {
  const label = c.label;
  const m = await untilLocal(() => {
    const { members, cdStart } = readCentralDirectory(c.input);
    const m = chooseMember(members, opts.member, label);
    locateData(c.input, m, cdStart, label);
    return m;
  });
  const inner = m.name.split("/").pop() ?? m.name;
  if (m.method === 0) {
    const device = c.stored(`${label}/${m.name}`, m.dataStart, m.size);
    return { device, description: `${label}: zip member ${m.name}, stored, ${mib(m.size)}`, inner };
  }
  const device = await openDeflate(c, m.dataStart, m.dataStart + m.compressedSize, () => memberFraming(m, label), `zip:${m.name}`, opts);
  return { device, description: `${label}: zip member ${m.name}, deflated, ${mib(m.size)} uncompressed`, inner };
}
