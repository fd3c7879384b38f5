// Micro-benchmark of the raw file device's data path: RawFile pread/pwrite of 4 KiB (random,
// aligned) and 64 KiB (sequential) on a page-cached 256 MiB file, next to plain fs.readSync /
// fs.writeSync, so the device's own overhead shows. The file lives in the OS temp directory and
// is read once before measuring so every read hits the page cache. Run with:
//   NO_COLOR=1 bun bench/device.bench.ts
import { bench, group, run, summary } from "mitata";
import { closeSync, mkdtempSync, openSync, readSync, rmSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { RawFile } from "../src/devices/file.ts";

const MiB = 1 << 20;
const SIZE = 256 * MiB;
const dir = mkdtempSync(join(tmpdir(), "bun-nbd-devbench-"));
process.on("exit", () => rmSync(dir, { recursive: true, force: true }));
const path = join(dir, "dev.img");
const block = new Uint8Array(MiB);
for (let i = 0; i < block.length; i++) block[i] = (i * 131 + (i >>> 10)) & 255;
const wfd = openSync(path, "w");
for (let p = 0; p < SIZE; p += MiB) writeSync(wfd, block, 0, MiB, p);
closeSync(wfd);

const dev = RawFile.open(path);
const fd = openSync(path, "r+");
for (let p = 0; p < SIZE; p += MiB) readSync(fd, block, 0, MiB, p); // warm the page cache

const b4k = new Uint8Array(4096);
const b64k = new Uint8Array(65536);
let x = 2463534242;
const rnd4k = () => { x ^= x << 13; x ^= x >>> 17; x ^= x << 5; return ((x >>> 0) % (SIZE / 4096)) * 4096; };
let seq = 0;
const next64k = () => { const o = seq; seq = (seq + 65536) % SIZE; return o; };

summary(() => {
  group("4 KiB random read (page cache)", () => {
    bench("RawFile.pread", () => dev.pread(b4k, rnd4k()));
    bench("fs.readSync", () => readSync(fd, b4k, 0, 4096, rnd4k()));
  });
  group("64 KiB sequential read (page cache)", () => {
    bench("RawFile.pread", () => dev.pread(b64k, next64k()));
    bench("fs.readSync", () => readSync(fd, b64k, 0, 65536, next64k()));
  });
  group("4 KiB random write (page cache, no FUA)", () => {
    bench("RawFile.pwrite", () => dev.pwrite(b4k, rnd4k(), 0));
    bench("fs.writeSync", () => writeSync(fd, b4k, 0, 4096, rnd4k()));
  });
  group("64 KiB sequential write (page cache, no FUA)", () => {
    bench("RawFile.pwrite", () => dev.pwrite(b64k, next64k(), 0));
    bench("fs.writeSync", () => writeSync(fd, b64k, 0, 65536, next64k()));
  });
});

await run({ colors: !process.env.NO_COLOR });
closeSync(fd);
dev.close?.();
