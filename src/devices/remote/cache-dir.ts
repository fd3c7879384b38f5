// The cache directory's entries: each object version is a pair `<id>.map` + `<id>.data`, the map
// starting with a header that names the object (no credentials). Pruning keeps the directory within
// its budget: older versions of the same object go first, then the least recently used entries;
// an entry locked by another process is left alone.
import { closeSync, openSync, readdirSync, readSync, statSync, unlinkSync } from "node:fs";
import { join } from "node:path";
import { createHash } from "node:crypto";
import { F_UNLCK, F_WRLCK, ofdTestLock } from "../../sys/libc.ts";
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

/**
 * Make room in the directory: delete entries of other versions of the same object, then the least
 * recently used entries until the others hold at most `room` bytes. Entries in use by another
 * process (locked) are left alone.
 */
export function prune(dir: string, self: string, key: string, room: number, log: (msg: string) => void): void {
  const others: { base: string; bytes: number; mtime: number }[] = [];
  for (const name of readdirSync(dir)) {
    if (!name.endsWith(".map") || name === `${self}.map`) continue;
    const base = join(dir, name.slice(0, -4));
    if (inUse(`${base}.map`)) continue;
    const info = readInfo(`${base}.map`);
    let bytes = 0, mtime = 0;
    try { const st = statSync(`${base}.data`); bytes = st.blocks * 512; mtime = statSync(`${base}.map`).mtimeMs; } catch { /* half an entry */ }
    if (info !== null && info.key === key) {
      remove(base);
      log(`cache: removed ${base} (an older version of ${key})`);
      continue;
    }
    others.push({ base, bytes, mtime });
  }
  others.sort((a, b) => a.mtime - b.mtime);
  let total = others.reduce((n, e) => n + e.bytes, 0);
  for (const e of others) {
    if (total <= room) break;
    remove(e.base);
    total -= e.bytes;
    log(`cache: removed ${e.base} (least recently used) to stay within the cache size`);
  }
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
