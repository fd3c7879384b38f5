// Compressed images and VHDs end to end through the real `serve` CLI: nbdinfo --list describes
// them, nbdcopy and qemu-img compare see the uncompressed bytes, the index notice is printed, and a
// damaged xz block gives the client EIO for that range while the rest of that export and the other
// exports keep working.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { bytesEqual } from "./helpers/assert.ts";
import { rng } from "./helpers/conformance.ts";
import { need, run, runOk, scratch } from "./helpers/env.ts";
import { serve, type Served } from "./helpers/server.ts";

const test = suite("compressed serve");
const dir = scratch("bun-nbd-cserve-");
const p = (f: string) => join(dir, f);
const MiB = 1 << 20;
const SIZE = 6 * MiB;
let server: Served | null = null;
let raw: Uint8Array;

test.before(async () => {
  need("xz", "gzip", "zip", "nbdinfo", "nbdcopy", "qemu-img", "qemu-io");
  const r = rng(11);
  raw = Uint8Array.from({ length: SIZE }, (_, i) => ((i >> 16) & 3) === 0 ? r(256) : (i >> 9) & 0xff);
  writeFileSync(p("disk.img"), raw);
  const sh = (cmd: string) => runOk(["sh", "-c", cmd], { cwd: dir, timeoutMs: 120_000 });
  await sh("xz -T1 --block-size=1MiB -c disk.img > a.img.xz && gzip -c disk.img > b.img.gz && zip -q c.zip disk.img && cp a.img.xz bad.img.xz");
  await runOk(["qemu-img", "convert", "-f", "raw", "-O", "vpc", p("disk.img"), p("dyn.vhd")]);
  const x = new Uint8Array(readFileSync(p("bad.img.xz")));
  x[x.length >> 1]! ^= 0xff;
  writeFileSync(p("bad.img.xz"), x);
  // The child inherits the cache directory; other test files in this process keep theirs.
  const saved = process.env.BUN_NBD_CACHE_DIR;
  process.env.BUN_NBD_CACHE_DIR = p("cache");
  try {
    server = await serve([p("a.img.xz"), p("b.img.gz"), p("c.zip"), p("dyn.vhd"), p("bad.img.xz")]);
  } finally {
    if (saved === undefined) delete process.env.BUN_NBD_CACHE_DIR; else process.env.BUN_NBD_CACHE_DIR = saved;
  }
});

test.after(async () => {
  if (server) assert.is(await server.stop(), 0, "server exit status");
});

test("nbdinfo --list describes each export; the gzip index notice is printed", async () => {
  const r = await runOk(["nbdinfo", "--list", "--json", server!.uri("")], { timeoutMs: 30_000 });
  const list = JSON.parse(r.stdout).exports as { "export-name": string; description: string; "export-size": number; is_read_only: boolean }[];
  const by = (n: string) => list.find((e) => e["export-name"] === n)!;
  assert.match(by("a").description, /a\.img\.xz: xz, 6 blocks, 6\.00 MiB uncompressed/);
  assert.match(by("b").description, /b\.img\.gz: gzip, 6\.00 MiB uncompressed/);
  assert.match(by("c").description, /c\.zip: zip member disk\.img, deflated/);
  assert.match(by("dyn").description, /dyn\.vhd: dynamic VHD/);
  assert.match(by("bad").description, /bad\.img\.xz: xz/);
  for (const e of list) if (e["export-name"] !== "dyn") assert.is(e["export-size"], SIZE, e["export-name"]);
  assert.ok(list.every((e) => e.is_read_only), "compressed and dynamic VHD exports are read-only");
  assert.match(server!.output(), /b\.img\.gz: indexed 6\.00 MiB in .* s, \d+ access points/);
});

test("nbdcopy of every export equals the raw image; qemu-img compare agrees", async () => {
  for (const name of ["a", "b", "c", "dyn"]) {
    const out = p(`copy-${name.replace(/\W/g, "_")}.img`);
    await runOk(["nbdcopy", server!.uri(name), out], { timeoutMs: 60_000 });
    const got = new Uint8Array(readFileSync(out));
    bytesEqual(got.subarray(0, SIZE), raw, name);
    await runOk(["qemu-img", "compare", "-f", "raw", "-F", "raw", p("disk.img"), server!.uri(name)], { timeoutMs: 60_000 });
  }
});

test("a damaged xz block: EIO for its range, the rest of the export and the server unaffected", async () => {
  const io = (off: number, len: number) => run(["qemu-io", "-r", "-f", "raw", "-c", `read ${off} ${len}`, server!.uri("bad")], { timeoutMs: 30_000 });
  const results: number[] = [];
  for (let b = 0; b < 6; b++) {
    const r = await io(b * MiB, 65536);
    const failed = /Input\/output error/.test(r.stdout + r.stderr);
    results.push(failed ? 1 : 0);
    if (!failed) assert.match(r.stdout, /read 65536\/65536 bytes/);
  }
  assert.is(results.reduce((a, b) => a + b, 0), 1, `exactly one damaged block: ${results}`);
  assert.match(server!.output(), /bad\.img\.xz: bytes \d+-\d+ cannot be decoded: block at byte \d+: corrupt data/);
  const ok = await runOk(["qemu-img", "compare", "-f", "raw", "-F", "raw", p("disk.img"), server!.uri("a")], { timeoutMs: 60_000 });
  assert.match(ok.stdout, /identical/);
});

test.run();
