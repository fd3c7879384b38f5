// `bun-nbd serve http://...` of compressed images behind a real nginx: a multi-block .xz, a .gz, a
// deflated zip member named as ARCHIVE.zip/MEMBER and a stored zip, made by the real xz, gzip and
// zip tools from a 48 MiB image of varied bytes, each copied byte-exact through NBD (nbdcopy); a
// small read of a multi-block .xz fetches about one block's compressed bytes (nginx's access log
// counts them); a second start with the same index cache reuses the gzip index instead of fetching
// the whole object again; a damaged .xz gives EIO for that block's range and a truncated one a
// clear error at start; a throw-away snapshot and a qcow2 overlay over a remote .xz; a single-block
// .xz too large to decode at once is decoded progressively as its compressed bytes arrive.
import * as assert from "uvu/assert";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { bytesEqual, deadline } from "./helpers/assert.ts";
import { BUN, CLI, need, run, runOk, scratch } from "./helpers/env.ts";
import { fillPattern } from "./helpers/remote-images.ts";
import { serve, type Served } from "./helpers/server.ts";
import { guardedSuite, nbdpy } from "./interop-lib.ts";
import { startNginx, type Nginx } from "./services/nginx.ts";

const MiB = 1024 * 1024;
const SIZE = 48 * MiB;
const dir = scratch("bun-nbd-remote-compressed-");
const p = (f: string) => join(dir, f);
let ngx: Nginx;
let raw: Uint8Array;
/** The index cache (BUN_NBD_CACHE_DIR) of servers that share it; each test names its own otherwise. */
const env = (idx: string) => ({ BUN_NBD_CACHE_DIR: p(idx) });

const { test, run: runSuite } = guardedSuite("remote compressed images (nginx)", async () => {
  need("nginx", "xz", "gzip", "zip", "nbdcopy", "qemu-img");
  ngx = await startNginx();
  // Varied bytes that never repeat: pseudo-random MiBs, MiBs of 4-bit symbols (compress about
  // 2:1), text-like runs, and every seventh MiB zeros.
  raw = new Uint8Array(SIZE);
  for (let i = 0; i < SIZE / MiB; i++) {
    const m = raw.subarray(i * MiB, (i + 1) * MiB);
    if (i % 7 === 3) continue;
    fillPattern(m, i * MiB, 41);
    if (i % 3 === 1) for (let j = 0; j < m.length; j++) m[j] = 0x41 + (m[j]! & 15);
    if (i % 3 === 2) for (let j = 0; j < m.length; j++) m[j] = j % 61 === 0 ? 10 : 0x61 + (m[j]! % 26);
  }
  writeFileSync(p("disk.img"), raw);
  const w = (f: string) => join(ngx.root, f);
  const sh = (cmd: string) => runOk(["sh", "-c", cmd], { cwd: dir, timeoutMs: 300_000 });
  await sh(`xz -T2 --block-size=1MiB -c disk.img > ${w("x.img.xz")} && gzip -c disk.img > ${w("g.img.gz")}`);
  await sh(`echo notes > README.txt && zip -q ${w("m.zip")} README.txt disk.img && zip -q -0 ${w("s.zip")} disk.img`);
  const x = new Uint8Array(readFileSync(w("x.img.xz")));
  const bad = x.slice();
  bad[bad.length >> 1]! ^= 0xff; // in a block near the middle
  writeFileSync(w("bad.img.xz"), bad);
  writeFileSync(w("cut.img.xz"), x.subarray(0, x.length - 100));
});

/** Bytes nginx sent for `uri` so far (every status; the body size is the log's fifth field). */
function sent(uri: string): number {
  return ngx.log().map((l) => l.split(" ")).filter((f) => f[2] === uri).reduce((t, f) => t + Number(f[4]), 0);
}
async function stopped(s: Served): Promise<void> {
  assert.is(await s.stop(), 0, `server exit status; output:\n${s.output()}`);
}
async function copySame(uri: string, what: string): Promise<void> {
  const out = p(`copy-${what}.img`);
  await runOk(["nbdcopy", uri, out], { timeoutMs: 120_000 });
  bytesEqual(new Uint8Array(readFileSync(out)), raw, what);
}
/** Bytes [off, off+len) of the export read through libnbd, or the errno it failed with. */
async function readRange(uri: string, off: number, len: number): Promise<Uint8Array | string> {
  const o = await nbdpy(uri, `
try:
    out['data'] = h.pread(${len}, ${off}).hex()
except nbd.Error as e:
    out['err'] = e.errno or e.string
`, { timeoutMs: 60_000 });
  return o.err ?? Uint8Array.from(Buffer.from(o.data, "hex"));
}

test("xz, gzip, a zip member (ARCHIVE.zip/MEMBER) and a stored zip: byte-exact through nbdcopy", () => deadline(300_000, "copies", async () => {
  const s = await serve(["--cache-dir", p("blocks-all"), ngx.url("x.img.xz"), ngx.url("g.img.gz"), ngx.url("m.zip/disk.img"), ngx.url("s.zip")], { env: env("idx-all"), timeoutMs: 120_000 });
  try {
    const list = await runOk(["nbdinfo", "--list", "--json", s.uri("")], { timeoutMs: 30_000, env: { PATH: `/usr/bin:${process.env.PATH}` } });
    const byName = new Map((JSON.parse(list.stdout).exports as { "export-name": string; description: string; "export-size": number }[]).map((e) => [e["export-name"], e]));
    assert.match(byName.get("x.img")!.description, /x\.img\.xz: xz, 48 blocks, 48 MiB uncompressed \(remote http:\/\/.*x\.img\.xz/);
    assert.match(byName.get("g.img")!.description, /g\.img\.gz: gzip, 48 MiB uncompressed/);
    assert.match(byName.get("disk")!.description, /m\.zip: zip member disk\.img, deflated/);
    assert.match(byName.get("s")!.description, /s\.zip: zip member disk\.img, stored/);
    for (const e of byName.values()) assert.is(e["export-size"], SIZE, e["export-name"]);
    for (const [name, what] of [["x.img", "xz"], ["g.img", "gz"], ["disk", "zip-member"], ["s", "stored"]] as const) await copySame(s.uri(name), what);
    assert.match(s.output(), /g\.img\.gz: indexed 48 MiB in [\d.]+ s, \d+ access points/);
  } finally { await stopped(s); }
}));

test("a small read of a multi-block .xz fetches about one block's compressed bytes", () => deadline(120_000, "one block", async () => {
  const s = await serve(["--no-cache", "--block-size", "64K", ngx.url("x.img.xz")], { env: env("idx-small") });
  try {
    const before = sent("/x.img.xz");
    const total = readFileSync(join(ngx.root, "x.img.xz")).length;
    const at = 30 * MiB + 12345; // a pseudo-random MiB: its block is about 1 MiB compressed
    // where xz itself says that block is: block, stream, n, n in file, cstart, ustart, csize, usize
    const list = await runOk(["xz", "--robot", "-lvv", join(ngx.root, "x.img.xz")]);
    const blocks = list.stdout.split("\n").filter((l) => l.startsWith("block\t")).map((l) => l.split("\t").map(Number));
    assert.is(blocks.length, 48, "48 blocks of 1 MiB");
    const [, , , , cstart, , csize] = blocks.find((b) => b[5]! <= at && at < b[5]! + b[7]!)!;
    const B = 65536; // --block-size: what the remote cache fetches in
    const most = Math.ceil((cstart! + csize!) / B) * B - Math.floor(cstart! / B) * B;
    const got = await readRange(s.uri("x.img"), at, 4096);
    assert.ok(got instanceof Uint8Array, `read failed: ${got}`);
    bytesEqual(got as Uint8Array, raw.subarray(at, at + 4096), "the small read");
    const fetched = sent("/x.img.xz") - before;
    assert.ok(fetched >= csize! && fetched <= most, `fetched ${fetched} bytes for a block of ${csize} compressed bytes at ${cstart} (${most} in whole 64 KiB blocks; object ${total} bytes)`);
    // a second read in the same block fetches nothing more
    const again = await readRange(s.uri("x.img"), at + 65536, 4096);
    bytesEqual(again as Uint8Array, raw.subarray(at + 65536, at + 65536 + 4096), "a read of the same block");
    assert.is(sent("/x.img.xz") - before, fetched, "a second read of the decoded block sends no GET");
  } finally { await stopped(s); }
}));

test("gzip: a second start with the same index cache reuses the index, not the whole object", () => deadline(180_000, "gzip index", async () => {
  const total = readFileSync(join(ngx.root, "g.img.gz")).length;
  let before = sent("/g.img.gz");
  let s = await serve(["--no-cache", ngx.url("g.img.gz")], { env: env("idx-gz"), timeoutMs: 120_000 });
  try {
    assert.ok(sent("/g.img.gz") - before >= total, "the first start reads the whole object to build the index");
    assert.match(s.output(), /indexed 48 MiB/);
  } finally { await stopped(s); }
  before = sent("/g.img.gz");
  s = await serve(["--no-cache", ngx.url("g.img.gz")], { env: env("idx-gz") });
  try {
    assert.match(s.output(), /g\.img\.gz: access-point index loaded from .* \(\d+ points\)/);
    const at = 40 * MiB + 777;
    const got = await readRange(s.uri("g.img"), at, 100_000);
    assert.ok(got instanceof Uint8Array, `read failed: ${got}`);
    bytesEqual(got as Uint8Array, raw.subarray(at, at + 100_000), "a read through the cached index");
    const fetched = sent("/g.img.gz") - before;
    assert.ok(fetched < total / 4, `the second start fetched ${fetched} of ${total} bytes`);
  } finally { await stopped(s); }
}));

test("a damaged .xz: EIO for the damaged block, other reads fine; a truncated .xz: a clear error at start", () => deadline(120_000, "corrupt", async () => {
  const s = await serve(["--no-cache", ngx.url("bad.img.xz")], { env: env("idx-bad") });
  try {
    const failed: number[] = [];
    for (let b = 0; b < SIZE / MiB; b++) {
      const got = await readRange(s.uri("bad.img"), b * MiB, 4096);
      if (typeof got === "string") { assert.is(got, "EIO", `block ${b}`); failed.push(b); continue; }
      bytesEqual(got, raw.subarray(b * MiB, b * MiB + 4096), `block ${b}`);
    }
    assert.is(failed.length, 1, `exactly one damaged block: ${failed}`);
    assert.match(s.output(), /bad\.img\.xz: bytes \d+-\d+ cannot be decoded: block at byte \d+: corrupt data/);
  } finally { await stopped(s); }
  const r = await run([BUN, CLI, "serve", "-p", "0", "--no-cache", ngx.url("cut.img.xz")], { timeoutMs: 30_000, env: env("idx-cut") });
  assert.is.not(r.code, 0, "serve refuses a truncated .xz");
  assert.match(r.stdout + r.stderr, /http:\/\/127\.0\.0\.1:\d+\/cut\.img\.xz: corrupt or truncated: no stream footer/);
  assert.not.match(r.stdout + r.stderr, /^\s+at /m, "no stack trace");
}));

test("a .gz whose compressed bytes do not fit in the cache: a clear error at start, naming --cache-size", () => deadline(120_000, "gz too big", async () => {
  const r = await run([BUN, CLI, "serve", "-p", "0", "--no-cache", "--block-size", "64K", "--cache-size", "2M", ngx.url("g.img.gz")], { timeoutMs: 60_000, env: env("idx-toobig") });
  assert.is.not(r.code, 0, "serve refuses it");
  assert.match(r.stdout + r.stderr, /g\.img\.gz: indexing needs all [\d.]+ MiB of compressed data in the cache at once; it does not stay there \(raise --cache-size\)/);
  assert.not.match(r.stdout + r.stderr, /^\s+at /m, "no stack trace");
}));

test("--snapshot and --overlay over a remote .xz: writes land in the overlay; the overlay records the URL and ETag", () => deadline(120_000, "overlay", async () => {
  let s = await serve(["--no-cache", "--snapshot", ngx.url("x.img.xz")], { env: env("idx-ov") });
  try {
    const o = await nbdpy(s.uri("x.img"), `
h.pwrite(b'\\x5a' * 4096, 8192)
out['w'] = h.pread(4096, 8192).hex()
out['r'] = h.pread(4096, 20 * 1024 * 1024).hex()
`, { timeoutMs: 60_000 });
    assert.is(o.w, "5a".repeat(4096));
    bytesEqual(Uint8Array.from(Buffer.from(o.r, "hex")), raw.subarray(20 * MiB, 20 * MiB + 4096), "read through the snapshot");
  } finally { await stopped(s); }
  const ov = p("x.qcow2");
  s = await serve(["--no-cache", "--overlay", ov, ngx.url("x.img.xz")], { env: env("idx-ov") });
  try {
    await nbdpy(s.uri("x.img"), "h.pwrite(b'\\xa5' * 4096, 0)", { timeoutMs: 60_000 });
  } finally { await stopped(s); }
  const etag = (await fetch(ngx.url("x.img.xz"), { method: "HEAD" })).headers.get("etag")!;
  const header = readFileSync(ov).subarray(0, 65536).toString("latin1");
  assert.ok(header.includes(ngx.url("x.img.xz")), "the overlay names the URL");
  assert.ok(header.includes(`"version":${JSON.stringify(etag)}`), `the overlay records the ETag ${etag}`);
  assert.match(header, /"kind":"http".*"stack":"x\.img\.xz: xz, 48 blocks/, "what the base decodes to");
  s = await serve(["--no-cache", "--overlay", ov, ngx.url("x.img.xz")], { env: env("idx-ov") });
  try {
    const o = await nbdpy(s.uri("x.img"), "out['a'] = h.pread(4096, 0).hex(); out['b'] = h.pread(4096, 4096).hex()", { timeoutMs: 60_000 });
    assert.is(o.a, "a5".repeat(4096), "the overlay's write survives a restart");
    bytesEqual(Uint8Array.from(Buffer.from(o.b, "hex")), raw.subarray(4096, 8192), "base bytes through the reopened overlay");
  } finally { await stopped(s); }
}));

test("a single-block .xz over 64 MiB: decoded progressively as its compressed bytes arrive, byte-exact", () => deadline(180_000, "progressive", async () => {
  // 72 MiB of 4-bit symbols and zeros, one xz block: each read waits for windows of compressed
  // bytes part-way through a decode, and the decoder goes on where it stopped.
  const big = new Uint8Array(72 * MiB);
  for (let i = 0; i < 72; i++) {
    if (i % 9 === 4) continue;
    const m = big.subarray(i * MiB, (i + 1) * MiB);
    fillPattern(m, i * MiB, 43);
    for (let j = 0; j < m.length; j++) m[j] = 0x41 + (m[j]! & 15);
  }
  writeFileSync(p("one.img"), big);
  await runOk(["sh", "-c", `xz -0 -T1 -c one.img > ${join(ngx.root, "one.img.xz")}`], { cwd: dir, timeoutMs: 120_000 });
  const s = await serve(["--no-cache", "--block-size", "64K", ngx.url("one.img.xz")], { env: env("idx-one") });
  try {
    assert.match(s.output(), /one\.img\.xz: a single xz block: .* decoded once, progressively/);
    const at = 70 * MiB + 3;
    const got = await readRange(s.uri("one.img"), at, 65536);
    assert.ok(got instanceof Uint8Array, `read failed: ${got}`);
    bytesEqual(got as Uint8Array, big.subarray(at, at + 65536), "a read deep into the block");
    const out = p("copy-one.img");
    await runOk(["nbdcopy", s.uri("one.img"), out], { timeoutMs: 120_000 });
    bytesEqual(new Uint8Array(readFileSync(out)), big, "one.img");
  } finally { await stopped(s); }
}));

runSuite();
