// Micro-benchmark of the CD cooked-view read path against plain positional reads of the same
// already-cooked data (page-cached files in a temporary directory), run with:
//   NO_COLOR=1 bun bench/cd.bench.ts [SIZE_MIB]      (default 64 MiB of user data)
// Workloads: sequential 64 KiB reads and random 2 KiB reads, as in the end-to-end
// benchmark, plus the MODE2/2352 (Form 2 check) and MODE2/2336 strides and the raw whole-disc view.
// The end-to-end comparison (over NBD, against nbdkit) belongs in the end-to-end benchmark; this
// isolates the device cost.
import { bench, group, run, summary } from "mitata";
import { closeSync, mkdtempSync, openSync, readSync, rmSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { openCdImage } from "../src/devices/cd/index.ts";
import { wrapSector } from "../src/devices/cd/make.ts";
import type { BlockDevice } from "../src/devices/types.ts";

const MIB = 1 << 20;
const sizeMiB = Number(process.argv[2] ?? 64);
if (!Number.isInteger(sizeMiB) || sizeMiB < 1 || sizeMiB > 4096) throw new Error(`SIZE_MIB must be 1..4096, got ${process.argv[2]}`);
const SECTORS = (sizeMiB * MIB) / 2048;
const dir = mkdtempSync(join(tmpdir(), "bun-nbd-cdbench-"));
process.on("exit", () => rmSync(dir, { recursive: true, force: true }));

/** Writes the cooked image and its MODE1/2352, MODE2/2352 and MODE2/2336 wrappings. */
function makeImages(): void {
  const chunk = 512;
  const iso = openSync(join(dir, "disc.iso"), "w");
  const m1 = openSync(join(dir, "m1.bin"), "w");
  const m2 = openSync(join(dir, "m2.bin"), "w");
  const m2b = openSync(join(dir, "m2b.bin"), "w");
  const src = new Uint8Array(chunk * 2048);
  const raw1 = new Uint8Array(chunk * 2352);
  const raw2 = new Uint8Array(chunk * 2352);
  const body = new Uint8Array(chunk * 2336);
  let x = 0x12345678;
  for (let lba = 0; lba < SECTORS; lba += chunk) {
    const n = Math.min(chunk, SECTORS - lba);
    for (let i = 0; i < n * 2048; i += 4) { x ^= x << 13; x ^= x >>> 17; x ^= x << 5; src[i] = x; src[i + 1] = x >> 8; src[i + 2] = x >> 16; src[i + 3] = x >> 24; }
    for (let i = 0; i < n; i++) {
      wrapSector(src, i * 2048, raw1, i * 2352, lba + i, "MODE1", false);
      wrapSector(src, i * 2048, raw2, i * 2352, lba + i, "MODE2", false);
      body.set(raw2.subarray(i * 2352 + 16, (i + 1) * 2352), i * 2336);
    }
    writeSync(iso, src, 0, n * 2048);
    writeSync(m1, raw1, 0, n * 2352);
    writeSync(m2, raw2, 0, n * 2352);
    writeSync(m2b, body, 0, n * 2336);
  }
  for (const fd of [iso, m1, m2, m2b]) closeSync(fd);
  for (const [cue, bin, mode] of [["m1", "m1.bin", "MODE1/2352"], ["m2", "m2.bin", "MODE2/2352"], ["m2b", "m2b.bin", "MODE2/2336"]]) {
    Bun.write(join(dir, `${cue}.cue`), `FILE "${bin}" BINARY\n  TRACK 01 ${mode}\n    INDEX 01 00:00:00\n`);
  }
}

const t0 = performance.now();
makeImages();
console.log(`images: ${sizeMiB} MiB of user data, ${SECTORS} sectors, made in ${((performance.now() - t0) / 1000).toFixed(1)} s`);

const quiet = { log: () => {} };
const m1 = (await openCdImage(join(dir, "m1.cue"), quiet))[0]!.device;
const m2 = (await openCdImage(join(dir, "m2.cue"), quiet))[0]!.device;
const m2b = (await openCdImage(join(dir, "m2b.cue"), quiet))[0]!.device;
const rawDisc = (await openCdImage(join(dir, "m1.cue"), quiet)).find((e) => e.name.endsWith("/raw"))!.device;
const isoFd = openSync(join(dir, "disc.iso"), "r");
const plain: BlockDevice = {
  size: () => SECTORS * 2048,
  capabilities: () => { throw new Error("not used"); },
  pread: (buf, off) => { readSync(isoFd, buf, 0, buf.length, off); },
};

const b64 = new Uint8Array(64 * 1024);
const b2 = new Uint8Array(2048);
const seq = (dev: BlockDevice, buf: Uint8Array) => {
  let off = 0;
  const size = dev.size() - buf.length;
  return () => { dev.pread(buf, off, 0); off += buf.length; if (off > size) off = 0; };
};
const rnd = (dev: BlockDevice, buf: Uint8Array) => {
  let x = 2463534242;
  const blocks = Math.floor(dev.size() / buf.length);
  return () => { x ^= x << 13; x ^= x >>> 17; x ^= x << 5; dev.pread(buf, ((x >>> 0) % blocks) * buf.length, 0); };
};

// warm the page cache
for (const d of [plain, m1, m2, m2b]) { const f = seq(d, b64); for (let i = 0; i < d.size() / b64.length; i++) f(); }

group("sequential 64 KiB reads", () => {
  summary(() => {
    bench("plain ISO (readSync)", seq(plain, b64));
    bench("cooked MODE1/2352", seq(m1, b64));
    bench("cooked MODE2/2352 (Form 2 check)", seq(m2, b64));
    bench("cooked MODE2/2336", seq(m2b, b64));
  });
});
group("random 2 KiB reads", () => {
  summary(() => {
    bench("plain ISO (readSync)", rnd(plain, b2));
    bench("cooked MODE1/2352", rnd(m1, b2));
  });
});
group("raw whole-disc view, sequential 64 KiB (unaligned: copies through a scratch buffer)", () => {
  bench("raw MODE1/2352", seq(rawDisc, b64));
});

await run();
closeSync(isoFd);
