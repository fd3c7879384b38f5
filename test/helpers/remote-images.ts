// Test images for the remote-image tests: deterministic bytes (so a wrong block is caught at its
// offset), with all-zero stretches (so sparse handling is exercised), written without holding the
// whole image in memory.
import { closeSync, ftruncateSync, openSync, writeSync } from "node:fs";

const MiB = 1024 * 1024;

/** Deterministic pseudo-random bytes for [pos, pos + buf.length) of image `seed`. */
export function fillPattern(buf: Uint8Array, pos: number, seed: number): void {
  // One 32-bit word per 4 bytes from a hash of (seed, word index): any offset can be recomputed.
  const first = Math.floor(pos / 4);
  const skip = pos - first * 4;
  const words = Math.ceil((buf.length + skip) / 4);
  const tmp = new Uint8Array(words * 4);
  const tv = new DataView(tmp.buffer);
  for (let i = 0; i < words; i++) {
    let x = (Math.imul((first + i) >>> 0, 0x9e3779b1) ^ Math.imul(seed, 0x85ebca6b) ^ ((first + i) / 2 ** 32 | 0)) >>> 0;
    x ^= x >>> 16; x = Math.imul(x, 0x7feb352d) >>> 0; x ^= x >>> 15; x = Math.imul(x, 0x846ca68b) >>> 0; x ^= x >>> 16;
    tv.setUint32(i * 4, x >>> 0, true);
  }
  buf.set(tmp.subarray(skip, skip + buf.length));
}

/**
 * Write an image of `size` bytes: pattern data, except that every `zeroEvery`-th MiB (when given)
 * is left as a hole. Returns the path.
 */
export function makeImage(path: string, size: number, seed: number, o: { zeroEvery?: number; dataEvery?: number } = {}): string {
  const fd = openSync(path, "w");
  try {
    ftruncateSync(fd, size);
    const chunk = new Uint8Array(MiB);
    for (let pos = 0, i = 0; pos < size; pos += MiB, i++) {
      const n = Math.min(MiB, size - pos);
      const hole = (o.zeroEvery !== undefined && i % o.zeroEvery === 0) || (o.dataEvery !== undefined && i % o.dataEvery !== 0);
      if (hole) continue;
      fillPattern(chunk.subarray(0, n), pos, seed);
      let done = 0;
      while (done < n) done += writeSync(fd, chunk, done, n - done, pos + done);
    }
  } finally {
    closeSync(fd);
  }
  return path;
}

/** Collects log lines (for assertions on what a device or the server said). */
export function logSink(): { log: (m: string) => void; lines: string[]; has: (re: RegExp) => boolean } {
  const lines: string[] = [];
  return { log: (m) => { lines.push(m); }, lines, has: (re) => lines.some((l) => re.test(l)) };
}

/**
 * Read every 1 MiB block of the export at `uri` (libnbd) and say whose bytes it holds: "old" (the
 * file `oldPath`), "new" (`newPath`), "other", or the errno of a failed read ("EIO").
 */
export async function whoseBlocks(uri: string, oldPath: string, newPath: string, blocks: number): Promise<string[]> {
  const { nbdpy } = await import("../interop-lib.ts");
  const o = await nbdpy(uri, `
old = open(${JSON.stringify(oldPath)}, 'rb').read()
new = open(${JSON.stringify(newPath)}, 'rb').read()
res = []
for b in range(${blocks}):
    try:
        got = h.pread(1024 * 1024, b * 1024 * 1024)
        seg = slice(b * 1024 * 1024, (b + 1) * 1024 * 1024)
        res.append('old' if got == old[seg] else 'new' if got == new[seg] else 'other')
    except nbd.Error as e:
        res.append(e.errno or 'error')
out['res'] = res
`, { timeoutMs: 60_000 });
  return o.res as string[];
}
