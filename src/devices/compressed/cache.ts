// Where access-point indexes of compressed images are kept between runs, and the key that says an
// index still belongs to its file: size, modification time and a hash of samples of the content.
// BUN_NBD_CACHE_DIR overrides the directory ("off" or "" disables the cache); otherwise
// $XDG_CACHE_HOME/bun-nbd or ~/.cache/bun-nbd.
import { fstatSync, mkdirSync, readSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";

/** The cache directory (created if missing), or null when caching is off or impossible. */
export function cacheDir(): string | null {
  const env = process.env.BUN_NBD_CACHE_DIR;
  let dir: string;
  if (env !== undefined) {
    if (env === "" || env === "off") return null;
    dir = env;
  } else {
    const xdg = process.env.XDG_CACHE_HOME;
    dir = join(xdg && xdg.startsWith("/") ? xdg : join(homedir(), ".cache"), "bun-nbd");
  }
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    return dir;
  } catch {
    return null;
  }
}

const SAMPLE = 64 * 1024;
const SAMPLES = 16;

/**
 * A hex key for the content of `fd` as `what` (e.g. "gzip" or "zip:disk.img"): changes when the
 * file's size or mtime changes, or when any sampled byte range (start, end and 16 points between)
 * differs.
 */
export function contentKey(fd: number, what: string): string {
  const st = fstatSync(fd);
  const h = new Bun.CryptoHasher("sha256");
  h.update(`bun-nbd index v1\0${what}\0${st.size}\0${st.mtimeMs}\0`);
  const buf = new Uint8Array(SAMPLE);
  const at = new Set<number>([0, Math.max(0, st.size - SAMPLE)]);
  for (let i = 1; i < SAMPLES; i++) at.add(Math.floor((st.size - SAMPLE) * i / SAMPLES));
  for (const pos of [...at].filter((p) => p >= 0).sort((a, b) => a - b)) {
    const n = readSync(fd, buf, 0, SAMPLE, pos);
    h.update(buf.subarray(0, n));
  }
  return h.digest("hex");
}

/**
 * The key for a remote object as `what`: its location and version (ETag, or Last-Modified and
 * size: versionTag), so a replaced object gets a new index and the object is never read for it.
 */
export function remoteKey(location: string, version: string, size: number, what: string): string {
  const h = new Bun.CryptoHasher("sha256");
  h.update(`bun-nbd index v1\0${what}\0remote\0${location}\0${version}\0${size}\0`);
  return h.digest("hex");
}
