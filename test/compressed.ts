// Compressed images through the sniffing opener: .xz (multi-block, single-block, concatenated
// streams with padding), .gz (one and several members), .zip/.imz (deflated, stored, data
// descriptors, Zip64, archive.zip/MEMBER), each read at random offsets against the raw image and
// run through the device conformance suite; the zran index cached and reused; and hostile input
// (truncated or corrupt streams, encrypted, split and bzip2 zips, a zip bomb, declared sizes that
// lie) refused at open by name, or EIO for the damaged range only.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { copyFileSync, readdirSync, readFileSync, utimesSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { exportNameFor, openExports } from "../src/devices/open.ts";
import type { BlockDevice } from "../src/devices/types.ts";
import { toNbdErrno } from "../src/protocol/errors.ts";
import { bytesEqual } from "./helpers/assert.ts";
import { conformance, rng } from "./helpers/conformance.ts";
import { need, runOk, scratch } from "./helpers/env.ts";

need("xz", "gzip", "zip");
const dir = scratch("bun-nbd-compressed-");
const p = (f: string) => join(dir, f);
const sh = (cmd: string) => runOk(["sh", "-c", cmd], { cwd: dir, timeoutMs: 120_000 });

/** 9 MiB + 1000 bytes: words (compressible, many deflate blocks), random runs and zero runs. */
function makeImage(size: number, seed: number): Uint8Array {
  const r = rng(seed);
  const b = new Uint8Array(size);
  const words = Array.from({ length: 400 }, () => Array.from({ length: 2 + r(8) }, () => 97 + r(26)));
  let i = 0;
  while (i < size) {
    const k = r(1000);
    if (k < 2) { i += 20000 + r(300000); continue; } // zeros
    if (k < 5) { const n = Math.min(size - i, 1000 + r(20000)); for (let j = 0; j < n; j++) b[i + j] = r(256); i += n; continue; }
    for (const c of words[r(words.length)]!) { if (i < size) b[i++] = c; }
    if (i < size) b[i++] = 32;
  }
  return b;
}

const SIZE = 9 * 1024 * 1024 + 1000;
const raw = makeImage(SIZE, 7);
const log: string[] = [];
const opts = { log: (m: string) => log.push(`warn ${m}`), info: (m: string) => log.push(`info ${m}`) };

async function open(file: string): Promise<BlockDevice> {
  const [e] = await openExports([file], opts);
  return e!.device;
}

function read(d: BlockDevice, off: number, len: number): Uint8Array {
  const b = new Uint8Array(len);
  d.pread(b, off, 0);
  return b;
}

async function errnoOf(f: () => unknown): Promise<number> {
  try { await f(); return 0; } catch (e) { return toNbdErrno(e); }
}

async function refused(file: string, re: RegExp): Promise<void> {
  try {
    const d = await open(file);
    await d.close?.();
  } catch (e) {
    assert.match((e as Error).message, re);
    return;
  }
  assert.unreachable(`${file} was opened; expected an error matching ${re}`);
}

const setup = (async () => {
  process.env.BUN_NBD_CACHE_DIR = join(dir, "cache");
  writeFileSync(p("disk.img"), raw);
  const half = SIZE >> 1;
  writeFileSync(p("h1"), raw.subarray(0, half));
  writeFileSync(p("h2"), raw.subarray(half));
  copyFileSync(p("disk.img"), p("member.img"));
  writeFileSync(p("README.txt"), "read me\n");
  await sh([
    "xz -T1 --block-size=1MiB -c disk.img > multi.img.xz",
    "xz -T1 -c disk.img > single.img.xz",
    "xz -c h1 > s1.xz && xz -c h2 > s2.xz && (cat s1.xz; head -c 8 /dev/zero; cat s2.xz; head -c 4 /dev/zero) > streams.img.xz",
    "gzip -c disk.img > disk.img.gz",
    "gzip -c h1 > m1.gz && gzip -c h2 > m2.gz && cat m1.gz m2.gz > members.img.gz",
    "zip -q deflated.zip disk.img && zip -q -0 stored.zip disk.img && zip -q -fd descr.zip disk.img && zip -q -fz z64.zip disk.img",
    "zip -q several.zip disk.img member.img README.txt && zip -q docs.zip disk.img README.txt && cp deflated.zip floppy.imz",
    "zip -q -P secret encrypted.zip disk.img && zip -q -Z bzip2 bzip2.zip disk.img && zip -q -s 64k split.zip disk.img",
    // 80 MiB in one xz block: beyond what is decoded whole, so decoded progressively
    "(cat disk.img; head -c 74447896 /dev/zero) | xz -T1 -0 -c > single80.img.xz",
  ].join(" && "));
})();

const test = suite("compressed images");
test.before(() => setup);

for (const [file, what] of [
  ["multi.img.xz", /xz, 10 blocks, 9\.00 MiB uncompressed/], ["single.img.xz", /xz, 1 block/], ["streams.img.xz", /xz, 2 blocks in 2 streams/],
  ["disk.img.gz", /gzip, 9\.00 MiB uncompressed/], ["members.img.gz", /gzip/], ["deflated.zip", /zip member disk\.img, deflated/],
  ["stored.zip", /zip member disk\.img, stored/], ["descr.zip", /deflated/], ["z64.zip", /deflated/], ["floppy.imz", /deflated/],
  ["docs.zip", /zip member disk\.img/], ["several.zip/member.img", /zip member member\.img/],
] as const) {
  test(`${file}: the uncompressed bytes at random offsets; ${what}`, async () => {
    const [e] = await openExports([p(file)], opts);
    const d = e!.device;
    assert.match(e!.description ?? "", what);
    assert.is(d.size(), SIZE);
    assert.not.ok(d.capabilities().canWrite, "read-only");
    const r = rng(file.length);
    for (let i = 0; i < 60; i++) {
      const len = 1 + r(i % 3 === 0 ? 3_000_000 : 70_000);
      const off = r(SIZE - len);
      bytesEqual(read(d, off, len), raw.subarray(off, off + len), `${file} [${off}, +${len})`);
    }
    bytesEqual(read(d, SIZE - 1, 1), raw.subarray(SIZE - 1), "last byte");
    await d.close?.();
  });
}

test("a stored zip member is a plain file range (sendfile); decoded data is too, once decoded", async () => {
  const stored = await open(p("stored.zip"));
  const out = { fd: -1, offset: -1 };
  assert.ok(stored.fileRange!(4096, 65536, out), "stored member: always a file range");
  const zipBytes = readFileSync(p("stored.zip"));
  bytesEqual(zipBytes.subarray(out.offset, out.offset + 100), raw.subarray(4096, 4196), "the range is the member's bytes in the archive");
  await stored.close?.();
  const xz = await open(p("multi.img.xz"));
  assert.not.ok(xz.fileRange!(3 << 20, 65536, out), "not decoded yet: no file range");
  read(xz, 3 << 20, 10);
  assert.ok(xz.fileRange!(3 << 20, 65536, out), "decoded: a range of the spill file");
  await xz.close?.();
});

/** Every extent of `d` over the whole export, as [offset, length, type], neighbours of one type merged. */
function allExtents(d: BlockDevice, from = 0): [number, number, number][] {
  const out: [number, number, number][] = [];
  d.extents!(from, d.size() - from, 0, {
    add: (o, l, t) => {
      const last = out[out.length - 1];
      if (last && last[2] === t && last[0] + last[1] === o) last[1] += l; else out.push([o, l, t]);
      return true;
    },
  });
  return out;
}

test("decoded pages of zeros are holes: block status reports them; ranges not decoded yet are data", async () => {
  let zeroPages = 0;
  for (let p = 0; p + 4096 <= SIZE; p += 4096) if (raw.subarray(p, p + 4096).every((x) => x === 0)) zeroPages++;
  assert.ok(zeroPages > 100, `the image has zero runs (${zeroPages} pages)`);
  const gz = await open(p("disk.img.gz")); // its index may come from the cache: decode it all
  assert.ok(gz.capabilities().canExtents);
  bytesEqual(read(gz, 0, SIZE), raw, "the bytes read back");
  let holes = 0, pos = 0;
  for (const [o, l, t] of allExtents(gz)) {
    assert.is(o, pos, "contiguous");
    pos += l;
    if (t === 0) continue;
    assert.is(t, 3, "hole and zero");
    holes += l;
    assert.ok(raw.subarray(o, o + l).every((x) => x === 0), `a hole at ${o}+${l} is zeros in the image`);
  }
  assert.is(pos, SIZE);
  // (a page cut by the boundary between two decoded pieces is written as data)
  assert.ok(holes >= zeroPages * 4096 * 0.95, `zero pages are holes (${holes} bytes of holes, ${zeroPages} zero pages)`);
  await gz.close?.();
  const xz = await open(p("multi.img.xz")); // (opening it decoded its first block, to describe it)
  const from = 4 << 20;
  assert.equal(allExtents(xz, from), [[from, SIZE - from, 0]], "not decoded yet: data");
  read(xz, 0, SIZE);
  assert.ok(allExtents(xz, from).some(([, , t]) => t === 3), "decoded: holes");
  await xz.close?.();
});

test("export names drop the compression suffix too; archive.zip/MEMBER names the member", () => {
  assert.is(exportNameFor("/x/disk.img.xz"), "disk");
  assert.is(exportNameFor("/x/disk.img.gz"), "disk");
  assert.is(exportNameFor("/x/floppy.imz"), "floppy");
  assert.is(exportNameFor("/x/several.zip/member.img"), "member");
  assert.is(exportNameFor("/x/disk.img"), "disk");
});

test("a large single-block xz file is decoded progressively, with a warning saying so", async () => {
  log.length = 0;
  const d = await open(p("single80.img.xz"));
  const BIG = 80 * 1024 * 1024;
  assert.is(d.size(), BIG);
  const decoded = () => (d as unknown as { decodedBytes(): number }).decodedBytes();
  // The spill keeps what was decoded: a read near the start decodes only a few MiB.
  bytesEqual(read(d, 1000, 4096), raw.subarray(1000, 5096), "early read");
  assert.ok(decoded() < 16 * 1024 * 1024, `one early read decoded ${decoded()} bytes`);
  bytesEqual(read(d, SIZE - 4096, 4096), raw.subarray(SIZE - 4096), "read later in the data");
  bytesEqual(read(d, BIG - 4096, 4096), new Uint8Array(4096), "the end (zeros)");
  assert.is(decoded(), BIG, "decoded once, to the end");
  bytesEqual(read(d, 5000, 4096), raw.subarray(5000, 9096), "an earlier range is served from the cache");
  await d.close?.();
  assert.ok(log.some((l) => /warn .*single xz block.*decoded once, progressively/.test(l)), log.join("\n"));
});

test("the gzip index is built at first open, cached, and reused (rebuilt when the file changes)", async () => {
  process.env.BUN_NBD_CACHE_DIR = join(dir, "cache");
  copyFileSync(p("disk.img.gz"), p("cached.img.gz"));
  log.length = 0;
  let d = await open(p("cached.img.gz"));
  await d.close?.();
  assert.ok(log.some((l) => /info .*cached\.img\.gz: indexed 9\.00 MiB in .* s, \d+ access points \(cached in /.test(l)), log.join("\n"));
  assert.ok(readdirSync(join(dir, "cache")).some((f) => f.endsWith(".zidx")), "index file in the cache directory");
  log.length = 0;
  d = await open(p("cached.img.gz"));
  assert.ok(log.some((l) => /access-point index loaded from/.test(l)), log.join("\n"));
  // Reads through the loaded index (nothing was decoded yet): access points with windows and bit offsets.
  const r = rng(99);
  for (let i = 0; i < 30; i++) {
    const off = r(SIZE - 5000);
    bytesEqual(read(d, off, 5000), raw.subarray(off, off + 5000), `cached index read at ${off}`);
  }
  await d.close?.();
  utimesSync(p("cached.img.gz"), new Date(), new Date(Date.now() + 5000));
  log.length = 0;
  d = await open(p("cached.img.gz"));
  await d.close?.();
  assert.ok(log.some((l) => /indexed/.test(l)), "a changed file is indexed again");
});

test("several image members and no name: refused with the member list and how to choose", async () => {
  await refused(p("several.zip"), /several\.zip holds 3 files \(disk\.img, member\.img, README\.txt\): name one, as several\.zip\/MEMBER/);
  await refused(p("several.zip/nothere.img"), /has no member "nothere\.img"/);
});

test("hostile zips: encrypted, split, bzip2, a bomb, sizes that lie, truncated", async () => {
  await refused(p("encrypted.zip"), /member disk\.img is encrypted/);
  await refused(p("split.zip"), /multi-disk \(split or spanned\) zip archives are not supported/);
  await refused(p("bzip2.zip"), /compressed with bzip2; only stored and deflated/);
  const z = new Uint8Array(readFileSync(p("deflated.zip")));
  const cd = Buffer.from(z).lastIndexOf(Buffer.from([0x50, 0x4b, 0x01, 0x02]));
  const patch = (name: string, at: number, v: number) => {
    const b = new Uint8Array(z);
    new DataView(b.buffer).setUint32(at, v, true);
    writeFileSync(p(name), b);
  };
  patch("bomb.zip", cd + 24, 0xfffffff0); // 4 GiB declared from a few MiB
  await refused(p("bomb.zip"), /beyond deflate's 1032:1 limit \(a zip bomb\?\)/);
  patch("short.zip", cd + 24, SIZE - 10);
  await refused(p("short.zip"), new RegExp(`decodes to more than the ${SIZE - 10} bytes declared`));
  patch("long.zip", cd + 24, SIZE + 10);
  await refused(p("long.zip"), new RegExp(`decodes to ${SIZE} bytes, the archive declares ${SIZE + 10}`));
  patch("badcrc.zip", cd + 16, 0x12345678);
  await refused(p("badcrc.zip"), /CRC-32 mismatch/);
  const s = new Uint8Array(readFileSync(p("stored.zip")));
  const scd = Buffer.from(s).lastIndexOf(Buffer.from([0x50, 0x4b, 0x01, 0x02]));
  new DataView(s.buffer).setUint32(scd + 24, SIZE + 1, true);
  writeFileSync(p("stored-lie.zip"), s);
  await refused(p("stored-lie.zip"), /is stored, but its declared sizes disagree/);
  writeFileSync(p("cut.zip"), z.subarray(0, z.length - 30));
  await refused(p("cut.zip"), /no end of central directory record/);
});

test("hostile gzip: truncated, corrupt data, a wrong trailer, trailing garbage", async () => {
  const g = readFileSync(p("disk.img.gz"));
  writeFileSync(p("cut.img.gz"), g.subarray(0, g.length >> 1));
  await refused(p("cut.img.gz"), /truncated/);
  const bad = new Uint8Array(g);
  bad[bad.length >> 1]! ^= 0x55;
  writeFileSync(p("bad.img.gz"), bad);
  await refused(p("bad.img.gz"), /invalid|CRC-32 mismatch|distance|code/);
  const size = new Uint8Array(g);
  size[size.length - 1]! ^= 1;
  writeFileSync(p("isize.img.gz"), size);
  await refused(p("isize.img.gz"), /the gzip trailer at byte \d+ says \d+ bytes/);
  writeFileSync(p("junk.img.gz"), Buffer.concat([g, Buffer.from("junk")]));
  await refused(p("junk.img.gz"), /unexpected data after the gzip member/);
  writeFileSync(p("pad.img.gz"), Buffer.concat([g, Buffer.alloc(512)]));
  const d = await open(p("pad.img.gz"));
  assert.is(d.size(), SIZE, "zero padding after the last member is tolerated");
  await d.close?.();
});

test("hostile xz: truncated at open; a corrupt block gives EIO for its range only", async () => {
  const x = readFileSync(p("multi.img.xz"));
  writeFileSync(p("cut.img.xz"), x.subarray(0, x.length - 40));
  await refused(p("cut.img.xz"), /corrupt or truncated|truncated|corrupt/);
  writeFileSync(p("nofooter.img.xz"), x.subarray(0, x.length >> 1));
  await refused(p("nofooter.img.xz"), /no stream footer/);
  const bad = new Uint8Array(x);
  // Somewhere in the middle of the compressed data: one block's data or check.
  bad[(x.length >> 1)]! ^= 0xff;
  writeFileSync(p("bad.img.xz"), bad);
  const d = await open(p("bad.img.xz"));
  const MiB = 1 << 20;
  let failed = -1;
  for (let b = 0; b < 10; b++) {
    const n = Math.min(4096, SIZE - b * MiB);
    const e = await errnoOf(() => read(d, b * MiB, n));
    if (e !== 0) { assert.is(e, 5, "EIO"); assert.is(failed, -1, "one damaged block"); failed = b; continue; }
    bytesEqual(read(d, b * MiB, n), raw.subarray(b * MiB, b * MiB + n), `block ${b} intact`);
  }
  assert.ok(failed >= 0, "the damaged block reads as EIO");
  assert.is(await errnoOf(() => read(d, failed * MiB + 100, 10)), 5, "and keeps failing");
  await d.close?.();
});

test("an xz index that disagrees with its block: EIO for that block, the others intact", async () => {
  const x = new Uint8Array(readFileSync(p("multi.img.xz")));
  const dv = new DataView(x.buffer);
  const indexSize = (dv.getUint32(x.length - 8, true) + 1) * 4;
  const at = x.length - 12 - indexSize;
  // Records: count, then (unpadded, uncompressed) pairs; 1 MiB encodes as 80 80 40. Say 1 MiB - 1
  // (ff ff 3f, the same length) for the second block, and fix the index CRC.
  const idx = x.subarray(at, at + indexSize);
  let hits = 0;
  for (let i = 0; i + 3 <= idx.length; i++) {
    if (idx[i] === 0x80 && idx[i + 1] === 0x80 && idx[i + 2] === 0x40 && ++hits === 2) { idx.set([0xff, 0xff, 0x3f], i); break; }
  }
  assert.is(hits, 2, "found the second block's size");
  dv.setUint32(at + indexSize - 4, Bun.hash.crc32(idx.subarray(0, indexSize - 4)) >>> 0, true);
  writeFileSync(p("lie.img.xz"), x);
  const d = await open(p("lie.img.xz"));
  assert.is(d.size(), SIZE - 1, "the index is believed for the size");
  bytesEqual(read(d, 0, 4096), raw.subarray(0, 4096), "block 0 intact");
  try {
    read(d, (1 << 20) + 10, 100);
    assert.unreachable("the lying block was served");
  } catch (e) {
    assert.is(toNbdErrno(e), 5);
    assert.match((e as Error).message, /bytes 1048576-2097150 cannot be decoded: .*(index|corrupt)/);
  }
  await d.close?.();
});

test.run();

// Every compressed device passes the shared conformance suite (read-only: against the raw image).
for (const f of ["multi.img.xz", "single.img.xz", "members.img.gz", "deflated.zip", "stored.zip"]) {
  conformance(`compressed ${f}`, {
    make: async () => { await setup; const device = await open(p(f)); return { device, expected: raw, cleanup: () => device.close?.() }; },
    ops: 80,
  });
}

