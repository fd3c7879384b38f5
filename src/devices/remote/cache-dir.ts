// The cache directory's entries: each object version is a pair `<id>.map` + `<id>.data`, the map
// starting with a header that names the object (no credentials). Older versions of an object are
// deleted when it is opened; the least recently used entries go when the directory's budget
// (cache-budget.ts) needs their room. An entry locked by another process is left alone.
import { closeSync, existsSync, mkdirSync, openSync, readdirSync, readSync, statSync, unlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createHash } from "node:crypto";
import { F_UNLCK, F_WRLCK, ofdLock, ofdTestLock } from "../../sys/libc.ts";
import { versionTag, type ObjectVersion } from "./store.ts";

/** v2: after the state bytes, a bitmap of 4 KiB pieces per block (blocks held in part). */
const MAGIC = "BNBDRCv2";
export const HEADER = 4096;

export interface EntryInfo {
  key: string;
  version: ObjectVersion;
  blockSize: number;
  blocks: number;
}

/** The entry's file name (without .map/.data): a hash of the key and the version. */
export function entryId(key: string, version: ObjectVersion): string {
  return createHash("sha256").update(`${key}\n${versionTag(version)}\n${version.size}`).digest("hex").slice(0, 32);
}

/** The two files of an entry, open; `base` and `id` null for a throw-away pair (already unlinked). */
export interface EntryFiles { data: number; map: number; base: string | null; id: string | null }

/**
 * Open (creating them if need be) the files of the entry for `key` at `version` in `dir`, locked
 * for this process; a throw-away pair in TMPDIR when `dir` is null or another process holds the
 * entry (it is said in the log).
 */
export function openEntry(dir: string | null, key: string, version: ObjectVersion, log: (msg: string) => void): EntryFiles {
  if (dir === null) return throwAwayEntry();
  mkdirSync(dir, { recursive: true });
  const id = entryId(key, version);
  const base = join(dir, id);
  closeSync(openSync(`${base}.map`, "a+"));
  const map = openSync(`${base}.map`, "r+");
  if (!ofdLock(map, F_WRLCK, 0, 1)) {
    closeSync(map);
    log(`cache ${base}.map is in use by another process; using a throw-away cache for ${key}`);
    return throwAwayEntry();
  }
  try {
    return { data: openSync(`${base}.data`, existsSync(`${base}.data`) ? "r+" : "w+"), map, base, id };
  } catch (e) {
    closeSync(map);
    throw e;
  }
}

function throwAwayEntry(): EntryFiles {
  const p = join(process.env.TMPDIR || tmpdir(), `bun-nbd-cache-${process.pid}-${Math.random().toString(36).slice(2, 10)}`);
  const data = openSync(`${p}.data`, "wx+", 0o600);
  const map = openSync(`${p}.map`, "wx+", 0o600);
  unlinkSync(`${p}.data`);
  unlinkSync(`${p}.map`);
  return { data, map, base: null, id: null };
}

export function headerBytes(e: EntryInfo): Uint8Array {
  const h = new Uint8Array(HEADER);
  const v = e.version;
  const info = JSON.stringify({ key: e.key, size: v.size, etag: v.etag, lastModified: v.lastModified, blockSize: e.blockSize, blocks: e.blocks });
  h.set(new TextEncoder().encode(MAGIC + info).subarray(0, HEADER - 1));
  return h;
}

/** The entry's key from its map header (of any format version), or null when it is not a cache map. */
function readInfo(path: string): { key: string } | null {
  try {
    const fd = openSync(path, "r");
    try {
      const h = new Uint8Array(HEADER);
      const n = readSync(fd, h, 0, HEADER, 0);
      const text = new TextDecoder().decode(h.subarray(0, n)).replace(/\0+$/, "");
      const m = /^BNBDRCv\d/.exec(text);
      return m === null ? null : JSON.parse(text.slice(m[0].length)) as { key: string };
    } finally {
      closeSync(fd);
    }
  } catch {
    return null;
  }
}

/** The directory's entries other than `skip` (ids) that no process holds open, with their bytes and last use. */
function others(dir: string, skip: ReadonlySet<string>): { id: string; base: string; bytes: number; mtime: number }[] {
  const list: { id: string; base: string; bytes: number; mtime: number }[] = [];
  for (const name of readdirSync(dir)) {
    if (!name.endsWith(".map") || skip.has(name.slice(0, -4))) continue;
    const base = join(dir, name.slice(0, -4));
    if (inUse(`${base}.map`)) continue;
    let bytes = 0, mtime = 0;
    try { const st = statSync(`${base}.data`); bytes = st.blocks * 512; mtime = statSync(`${base}.map`).mtimeMs; } catch { /* half an entry */ }
    list.push({ id: name.slice(0, -4), base, bytes, mtime });
  }
  return list;
}

/**
 * Delete the entries of other versions of `key` (`self` is the current one's id) that no process
 * holds open; return the bytes of the other entries no process holds (what room can be made from).
 */
export function pruneVersions(dir: string, self: string, key: string, log: (msg: string) => void): number {
  let total = 0;
  for (const e of others(dir, new Set([self]))) {
    if (readInfo(`${e.base}.map`)?.key === key) {
      remove(e.base);
      log(`cache: removed ${e.base} (an older version of ${key})`);
    } else total += e.bytes;
  }
  return total;
}

/** Delete the least recently used entry (not one of `keep`, not held open by any process); its bytes, or null when there is none. */
export function removeLeastRecent(dir: string, keep: ReadonlySet<string>, log: (msg: string) => void): number | null {
  let oldest: ReturnType<typeof others>[number] | null = null;
  for (const e of others(dir, keep)) if (oldest === null || e.mtime < oldest.mtime) oldest = e;
  if (oldest === null) return null;
  remove(oldest.base);
  log(`cache: removed ${oldest.base} (least recently used) to stay within the cache size`);
  return oldest.bytes;
}

function inUse(path: string): boolean {
  try {
    const fd = openSync(path, "r");
    try { return ofdTestLock(fd, F_WRLCK, 0, 1) !== F_UNLCK; } finally { closeSync(fd); }
  } catch {
    return false;
  }
}

function remove(base: string): void {
  for (const ext of [".map", ".data"]) { try { unlinkSync(base + ext); } catch { /* gone already */ } }
}
