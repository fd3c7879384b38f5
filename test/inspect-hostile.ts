// Hostile and damaged images: loops of extended partitions, GPTs with bad CRCs, partitions past the
// end, overlaps, absurd counts, cluster-chain loops, and random corruption of real images. Each
// must give a warning in the report (or nothing), never a throw, a hang, or an unbounded read.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { readFileSync } from "node:fs";
import { inspect, type ByteSource, type Report } from "../src/inspect/index.ts";
import { deadline } from "./helpers/assert.ts";
import { rng } from "./helpers/conformance.ts";
import { need, scratch } from "./helpers/env.ts";
import { fsImage, makeDisk, MiB } from "./helpers/images.ts";

const test = suite("inspect: hostile tables");

/** A source over bytes, zeros past them up to `size`; counts what is read. */
function mem(bytes: Uint8Array, size = bytes.length): ByteSource & { read_: number } {
  const src = {
    size, read_: 0,
    read(offset: number, length: number) {
      src.read_ += length;
      const out = new Uint8Array(length);
      if (offset < bytes.length) out.set(bytes.subarray(offset, Math.min(bytes.length, offset + length)));
      return out;
    },
  };
  return src;
}

const flip = (b: Uint8Array, at: number) => { b[at] = b[at]! ^ 0xff; };
const dv = (b: Uint8Array) => new DataView(b.buffer, b.byteOffset, b.byteLength);
function mbrEntry(b: Uint8Array, at: number, i: number, type: number, lba: number, sectors: number, boot = 0): void {
  const o = at + 446 + 16 * i;
  b[o] = boot; b[o + 4] = type;
  dv(b).setUint32(o + 8, lba, true);
  dv(b).setUint32(o + 12, sectors, true);
  b[at + 510] = 0x55; b[at + 511] = 0xaa;
}

async function run(src: ByteSource, what: string): Promise<Report> {
  return deadline(10_000, what, () => inspect(src, { source: what }));
}
const warned = (r: Report, re: RegExp) => assert.ok(r.warnings.some((w) => re.test(w)), `expected a warning matching ${re}, got ${JSON.stringify(r.warnings)}`);

test("EBR chains that loop (B -> B, and A -> B -> C -> B) end with a warning", async () => {
  const self = new Uint8Array(8 * MiB);
  mbrEntry(self, 0, 0, 0x05, 2048, 8192);
  mbrEntry(self, 2048 * 512, 0, 0x83, 63, 100);
  mbrEntry(self, 2048 * 512, 1, 0x05, 1000, 2000); // A -> B
  mbrEntry(self, 3048 * 512, 0, 0x83, 63, 100);
  mbrEntry(self, 3048 * 512, 1, 0x05, 1000, 2000); // B -> B
  const r = await run(mem(self), "self-loop");
  warned(r, /extended boot records form a loop/);
  assert.is(r.table!.partitions.filter((p) => p.kind === "logical").length, 2);
  const loop = new Uint8Array(8 * MiB);
  mbrEntry(loop, 0, 0, 0x05, 2048, 8192);
  mbrEntry(loop, 2048 * 512, 0, 0x83, 63, 100);
  mbrEntry(loop, 2048 * 512, 1, 0x05, 1000, 2000); // A -> B
  mbrEntry(loop, 3048 * 512, 0, 0x83, 63, 100);
  mbrEntry(loop, 3048 * 512, 1, 0x05, 3000, 2000); // B -> C
  mbrEntry(loop, 5048 * 512, 0, 0x83, 63, 100);
  mbrEntry(loop, 5048 * 512, 1, 0x05, 1000, 2000); // C -> B: a cycle
  const r2 = await run(mem(loop), "A-B-C-B loop");
  warned(r2, /loop/);
  assert.is(r2.table!.partitions.filter((p) => p.kind === "logical").length, 3);
});

test("a chain of 1000 EBRs stops at the cap with a warning", async () => {
  const n = 1000;
  const d = new Uint8Array((n + 10) * 4 * 512);
  mbrEntry(d, 0, 0, 0x05, 4, n * 4 + 4);
  for (let i = 0; i < n; i++) {
    const at = (4 + i * 4) * 512;
    mbrEntry(d, at, 0, 0x83, 1, 2);
    mbrEntry(d, at, 1, 0x05, (i + 1) * 4, 4);
  }
  const r = await run(mem(d), "long chain");
  warned(r, /more than 128 extended boot records/);
});

test("overlapping primaries and a partition past the end are reported", async () => {
  const d = new Uint8Array(4 * MiB);
  mbrEntry(d, 0, 0, 0x83, 2048, 4096);
  mbrEntry(d, 0, 1, 0x83, 4096, 2048);
  mbrEntry(d, 0, 2, 0x83, 6000, 100000);
  mbrEntry(d, 0, 3, 0x0c, 0xffffff00, 0xff);
  const r = await run(mem(d), "overlaps");
  warned(r, /partitions 1 and 2 overlap/);
  warned(r, /partition 3 runs past the end/);
  warned(r, /partition 4 starts past the end/);
});

/** A valid GPT made by sgdisk, to corrupt. */
let gpt: Uint8Array;
test.before(async () => {
  need("sgdisk", "sfdisk", "mkfs.fat", "mkfs.ext4");
  const dir = scratch("bun-nbd-hostile-");
  const d = await makeDisk(dir, "g.img", "gpt", 16 * MiB, [{ size: 4 * MiB, type: "ef00", fs: "fat12" }, { size: "rest", type: "8300", fs: "ext4" }]);
  gpt = new Uint8Array(readFileSync(d.path));
});

test("GPT with a bad primary header CRC: the backup header is used, with a warning", async () => {
  const d = gpt.slice();
  flip(d, 512 + 40); // first usable LBA, inside the CRC
  const r = await run(mem(d), "bad primary crc");
  warned(r, /primary header invalid \(header CRC mismatch\); using the backup/);
  assert.is(r.table?.partitions.length, 2);
});

test("GPT with both headers bad: no table, a warning", async () => {
  const d = gpt.slice();
  flip(d, 512 + 40);
  flip(d, d.length - 512 + 40);
  const r = await run(mem(d), "both bad");
  assert.is(r.table, undefined);
  warned(r, /no valid backup header/);
});

test("GPT entry array CRC mismatch and a partition past the end", async () => {
  const d = gpt.slice();
  // second entry ends far past the disk; recompute the header CRC but not the array CRC
  dv(d).setUint32(1024 + 128 + 40, 0x7fffffff, true);
  const hdr = d.subarray(512, 512 + 92);
  dv(hdr).setUint32(16, 0, true);
  dv(hdr).setUint32(16, Bun.hash.crc32(hdr) >>> 0, true);
  const r = await run(mem(d), "entry past end");
  warned(r, /entry array CRC mismatch/);
  warned(r, /partition 2 .* outside the usable area/);
  assert.is(r.table?.partitions.length, 1);
});

test("GPT claiming 2^32-1 entries reads a bounded amount", async () => {
  const d = gpt.slice();
  const hdr = d.subarray(512, 512 + 92);
  dv(hdr).setUint32(80, 0xffffffff, true);
  dv(hdr).setUint32(16, 0, true);
  dv(hdr).setUint32(16, Bun.hash.crc32(hdr) >>> 0, true);
  const src = mem(d);
  const r = await run(src, "absurd count");
  warned(r, /claims 4294967295 entries/);
  assert.ok(src.read_ < 32 * MiB, `read ${src.read_} bytes`);
});

test("a huge sparse disk of zeros and a 2^50-byte GPT disk are inspected quickly", async () => {
  const r = await run(mem(new Uint8Array(0), 2 ** 50), "zeros");
  assert.is(r.table, undefined);
  assert.is(r.filesystem, undefined);
  const d = gpt.slice(0, 1 * MiB);
  const r2 = await run(mem(d, 2 ** 50), "big");
  warned(r2, /backup header is at LBA 32767, not at the last LBA/);
});

test("FAT32 and exFAT root directories whose cluster chains loop end", async () => {
  const dir = scratch("bun-nbd-hostile-fs-");
  need("mkfs.exfat");
  const f32 = new Uint8Array(readFileSync(await fsImage(dir, "f32.img", "fat32", 40 * MiB, "LOOPY")));
  // FAT32: root cluster (2) -> 2 in the first FAT, and no label entry in the root directory
  const ss = 512, reserved = dv(f32).getUint16(14, true);
  dv(f32).setUint32(reserved * ss + 2 * 4, 2, true);
  const spc = f32[13]!, fatLen = dv(f32).getUint32(0x24, true), data = (reserved + 2 * fatLen) * ss;
  f32.fill(0x41, data, data + spc * ss); // directory full of non-label entries
  for (let e = data; e < data + spc * ss; e += 32) f32[e + 11] = 0x20;
  const r = await run(mem(f32), "fat32 loop");
  assert.is(r.filesystem?.type, "vfat");
  const ex = new Uint8Array(readFileSync(await fsImage(dir, "ex.img", "exfat", 16 * MiB, "LOOPY")));
  const fatStart = dv(ex).getUint32(0x50, true) * 512, root = dv(ex).getUint32(0x60, true);
  const heap = dv(ex).getUint32(0x58, true) * 512, cluster = 512 << ex[0x6d]!;
  dv(ex).setUint32(fatStart + root * 4, root, true);
  const rootAt = heap + (root - 2) * cluster;
  ex.fill(0x85, rootAt, rootAt + cluster);
  const r2 = await run(mem(ex), "exfat loop");
  assert.is(r2.filesystem?.type, "exfat");
  assert.is(r2.filesystem?.label, undefined);
});

test("random corruption of real images never throws or runs away", async () => {
  const dir = scratch("bun-nbd-hostile-fuzz-");
  need("mkfs.ntfs", "xorriso");
  const seeds = [gpt, new Uint8Array(readFileSync(await fsImage(dir, "n.img", "ntfs", 4 * MiB, "N"))), new Uint8Array(readFileSync(await fsImage(dir, "e.img", "ext4", 4 * MiB, "E")))];
  const r = rng(12345);
  for (let round = 0; round < 120; round++) {
    const base = seeds[round % seeds.length]!;
    const d = base.slice(0, 2 * MiB);
    const hot = [0, 446, 512, 1024, 1024 + 128, 0x1000, 0x2000, 0x8000];
    for (let k = 0; k < 40; k++) {
      const at = r(4) === 0 ? r(d.length) : hot[r(hot.length)]! + r(512);
      d[at % d.length] = r(256);
    }
    const src = mem(d, r(2) ? d.length : base.length);
    const rep = await run(src, `fuzz round ${round}`);
    assert.type(rep.boot.summary.length, "number");
    assert.ok(src.read_ <= 64 * MiB + 4096, `round ${round}: read ${src.read_}`);
  }
});

test.run();
