// Opening one remote object as a raw device: settings and their defaults, finding the object and
// pinning its version (a clear error naming the URL and the status when that fails), and opening
// its cache entry. Cold code.
import { homedir } from "node:os";
import { join } from "node:path";
import type { StagedFile } from "../staged.ts";
import { BlockCache } from "./cache.ts";
import { RemoteImage, type SmallReads } from "./device.ts";

const SMALL_READS: readonly SmallReads[] = ["auto", "pieces", "blocks"];
import { objectBaseName, parseLocation, s3Settings, type RemoteLocation, type S3Settings } from "./location.ts";
import { ObjectStore, RemoteError, versionTag } from "./store.ts";

const MiB = 1024 * 1024;

/** How remote images are fetched and cached (flags and config entries; every field optional). */
export interface RemoteSettings {
  s3?: S3Settings;
  /** Cache directory; undefined: the default (~/.cache/bun-nbd/remote); null: a throw-away cache. */
  cacheDir?: string | null;
  /** Most bytes the cache directory holds. */
  cacheSize?: number;
  /** Bytes per block: the unit of GETs and of the cache (64 KiB to 16 MiB, a power of two). */
  blockSize?: number;
  /** Most bytes one GET covers when neighbouring blocks are merged. */
  maxRequest?: number;
  /** Bytes fetched ahead of a sequential reader. */
  readahead?: number;
  /** What a small read out of sequence fetches (see ReadPolicy.smallReads). */
  smallReads?: SmallReads;
  /** GETs in flight at once, per image. */
  maxInFlight?: number;
  /** Give up on a read this long after its first attempt (network errors, 5xx). */
  deadlineMs?: number;
  /** One attempt's limit. */
  attemptTimeoutMs?: number;
}

export const REMOTE_DEFAULTS = {
  cacheSize: 8 * 1024 * MiB,
  blockSize: MiB,
  maxRequest: 8 * MiB,
  readahead: 32 * MiB,
  smallReads: "auto",
  maxInFlight: 8,
  deadlineMs: 60_000,
  attemptTimeoutMs: 30_000,
} as const;

/** $XDG_CACHE_HOME/bun-nbd/remote, else ~/.cache/bun-nbd/remote. */
export function defaultCacheDir(): string {
  return join(process.env.XDG_CACHE_HOME || join(homedir(), ".cache"), "bun-nbd", "remote");
}

/** Check settings once (a configuration error names the setting). */
export function checkSettings(s: RemoteSettings): void {
  const bs = s.blockSize ?? REMOTE_DEFAULTS.blockSize;
  if (!Number.isInteger(Math.log2(bs)) || bs < 64 * 1024 || bs > 16 * MiB) throw new Error(`block size ${bs}: must be a power of two from 64 KiB to 16 MiB`);
  const positive: [string, number | undefined][] = [["cache size", s.cacheSize], ["max request", s.maxRequest], ["in-flight limit", s.maxInFlight], ["deadline", s.deadlineMs], ["attempt timeout", s.attemptTimeoutMs]];
  for (const [what, v] of positive) if (v !== undefined && !(v > 0 && Number.isFinite(v))) throw new Error(`${what} must be positive (got ${v})`);
  if (s.readahead !== undefined && !(s.readahead >= 0)) throw new Error(`readahead must be 0 or more (got ${s.readahead})`);
  if (s.smallReads !== undefined && !SMALL_READS.includes(s.smallReads)) throw new Error(`--small-reads ${s.smallReads}: must be one of ${SMALL_READS.join(", ")}`);
}

/** Open one remote object as a raw read-only device (found, pinned and cached). */
export async function openRemoteImage(name: string | RemoteLocation, settings: RemoteSettings, log: (msg: string) => void): Promise<RemoteImage> {
  checkSettings(settings);
  const loc = typeof name === "string" ? parseLocation(name, s3Settings(settings.s3)) : name;
  const store = new ObjectStore(loc);
  const attemptTimeoutMs = settings.attemptTimeoutMs ?? REMOTE_DEFAULTS.attemptTimeoutMs;
  let version;
  const t0 = performance.now();
  try {
    version = await store.probe(attemptTimeoutMs);
  } catch (e) {
    throw new Error(e instanceof RemoteError ? e.message : `${loc.display}: ${(e as Error).message}`);
  }
  if (!version.etag && !version.lastModified) log(`${loc.display}: the server sends neither ETag nor Last-Modified; a replaced object can only be noticed by its size`);
  const blockSize = settings.blockSize ?? REMOTE_DEFAULTS.blockSize;
  const cache = BlockCache.open({
    dir: settings.cacheDir === undefined ? defaultCacheDir() : settings.cacheDir,
    key: loc.key, version, blockSize, budget: settings.cacheSize ?? REMOTE_DEFAULTS.cacheSize, log,
  });
  const img = new RemoteImage(store, version, cache, {
    maxRequest: settings.maxRequest ?? REMOTE_DEFAULTS.maxRequest,
    readahead: settings.readahead ?? REMOTE_DEFAULTS.readahead,
    smallReads: settings.smallReads ?? REMOTE_DEFAULTS.smallReads,
    maxInFlight: settings.maxInFlight ?? REMOTE_DEFAULTS.maxInFlight,
    deadlineMs: settings.deadlineMs ?? REMOTE_DEFAULTS.deadlineMs,
    attemptTimeoutMs,
  }, log);
  // The probe (a 1-byte GET, connection set-up included: an estimate on the high side) is the
  // first round trip `--small-reads auto` goes by.
  img.fetcher.roundTripMs = performance.now() - t0;
  return img;
}

/** A remote image as a file that synchronous readers (the CD views) stage through its cache. */
export function stagedFile(img: RemoteImage): StagedFile {
  return {
    fd: img.blocks.fd,
    isLocal: (pos, len) => img.isCached(pos, len),
    makeLocal: (pos, len) => img.load(pos, len),
    close: () => img.close(),
  };
}

/** The identity an overlay records for a remote raw base (see qcow2 overlays' base identity). */
export function remoteIdentity(img: RemoteImage, stack = "raw image"): { kind: string; location: string; version: string; stack: string } {
  return { kind: img.store.loc.kind, location: img.location, version: versionTag(img.version), stack };
}


export interface RemoteOpenOptions {
  name?: string;
  settings: RemoteSettings;
  log: (msg: string) => void;
}

