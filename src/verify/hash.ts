// Hashing what is to be verified, with Bun's native hasher (BoringSSL): a file's bytes as stored,
// read in large synchronous chunks, or a device's bytes (an uncompressed view) through pread.
import { closeSync, fstatSync, openSync, readSync } from "node:fs";
import { isPromise, type BlockDevice } from "../devices/types.ts";
import type { Algo } from "./sums.ts";

const CHUNK = 4 << 20;

export type Progress = (done: number, total: number) => void;

/** Hex digest of the whole file at `path`. */
export function hashFile(path: string, algo: Algo, progress?: Progress): string {
  const fd = openSync(path, "r");
  try {
    const total = fstatSync(fd).size;
    const h = new Bun.CryptoHasher(algo);
    const buf = Buffer.allocUnsafe(CHUNK);
    let done = 0;
    for (;;) {
      const n = readSync(fd, buf, 0, CHUNK, null);
      if (n === 0) break;
      h.update(n === CHUNK ? buf : buf.subarray(0, n));
      done += n;
      progress?.(done, total);
    }
    return h.digest("hex");
  } finally {
    closeSync(fd);
  }
}

/** Hex digest of every byte a device holds (e.g. the uncompressed contents of a compressed image). */
export async function hashDevice(dev: BlockDevice, algo: Algo, progress?: Progress): Promise<string> {
  const total = dev.size();
  const h = new Bun.CryptoHasher(algo);
  const buf = new Uint8Array(CHUNK);
  for (let off = 0; off < total; off += CHUNK) {
    const b = off + CHUNK <= total ? buf : buf.subarray(0, total - off);
    const r = dev.pread(b, off, 0);
    if (isPromise(r)) await r;
    h.update(b);
    progress?.(Math.min(off + CHUNK, total), total);
  }
  return h.digest("hex");
}
