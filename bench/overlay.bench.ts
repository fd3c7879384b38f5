// Micro-benchmark of the qcow2 overlay's pread/pwrite path against plain positional reads and
// writes of a raw file (page-cached files in a temporary directory), run with:
//   NO_COLOR=1 bun bench/overlay.bench.ts [--compat]
// Workloads: random 4 KiB reads of overlay data and of the base through the overlay, 1 MiB
// sequential reads (run coalescing), 4 KiB rewrites in place, and 4 KiB first writes (each into a
// never-written subcluster, allocating a cluster every 64 KiB). Flushes are left out: their cost
// is two fdatasyncs, which the end-to-end benchmark (bench/overlay-e2e.sh) measures.
import { bench, group, run, summary } from "mitata";
import { closeSync, ftruncateSync, mkdtempSync, openSync, readSync, rmSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { openOverlay } from "../src/devices/qcow2/index.ts";

const MIB = 1 << 20;
const compat = process.argv.includes("--compat");
const dir = mkdtempSync(join(tmpdir(), "bun-nbd-ovbench-"));
process.on("exit", () => rmSync(dir, { recursive: true, force: true }));

// a 256 MiB base with data, sparse beyond (16 GiB virtual) so first writes never run out
const DATA = 256 * MIB;
const SIZE = 16 * 1024 * MIB;
const basePath = join(dir, "base.img");
const fd = openSync(basePath, "w");
const chunk = new Uint8Array(MIB);
for (let i = 0; i < chunk.length; i++) chunk[i] = (i * 131) & 255;
for (let p = 0; p < DATA; p += MIB) writeSync(fd, chunk, 0, MIB, p);
ftruncateSync(fd, SIZE);
closeSync(fd);

const dev = await openOverlay({ base: basePath, overlay: join(dir, "ov.qcow2"), compat, log: () => {} });
// the first 128 MiB of the overlay hold data; the next 128 MiB come from the base
const half = 128 * MIB;
for (let p = 0; p < half; p += MIB) dev.pwrite!(chunk, p, 0);
await dev.flush!(0);

const raw = openSync(basePath, "r+");
const buf4k = new Uint8Array(4096);
const buf1m = new Uint8Array(MIB);
let x = 12345;
const rnd = (n: number) => { x ^= x << 13; x ^= x >>> 17; x ^= x << 5; return ((x >>> 0) % n) * 4096; };
let seq = 0;
let first = DATA; // first writes go past the base's data, sequentially

summary(() => {
  group("random 4 KiB reads", () => {
    bench("raw readSync", () => { readSync(raw, buf4k, 0, 4096, rnd(half / 4096)); });
    bench("overlay pread, overlay data", () => { dev.pread(buf4k, rnd(half / 4096), 0); });
    bench("overlay pread, base data", () => { dev.pread(buf4k, half + rnd(half / 4096), 0); });
  });
});
summary(() => {
  group("sequential 1 MiB reads", () => {
    bench("raw readSync", () => { readSync(raw, buf1m, 0, MIB, seq); seq = (seq + MIB) % DATA; });
    bench("overlay pread (overlay, then base)", () => { dev.pread(buf1m, seq, 0); seq = (seq + MIB) % DATA; });
  });
});
summary(() => {
  group("4 KiB writes", () => {
    bench("raw writeSync", () => { writeSync(raw, buf4k, 0, 4096, rnd(half / 4096)); });
    bench("overlay rewrite in place", () => { dev.pwrite!(buf4k, rnd(half / 4096), 0); });
    bench("overlay first write (allocating)", () => { dev.pwrite!(buf4k, first, 0); first += 4096; });
  });
});

await run({ colors: !process.env.NO_COLOR });
await dev.flush!(0);
await dev.close!();
closeSync(raw);
