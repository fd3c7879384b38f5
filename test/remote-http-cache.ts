// How `bun-nbd serve http://...` uses a real nginx and its cache directory: reads in flight at once
// become GETs that overlap in time, never more than --remote-connections of them (nginx's access
// log has each request's connection, end time and duration); and a small --cache-size bounds the
// whole directory: an image filling makes room from the least recently used entry of another
// object, and images served by one process evict each other's least recently used blocks.
import * as assert from "uvu/assert";
import { closeSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, readSync, statSync } from "node:fs";
import { join } from "node:path";
import { connect, type NbdClient } from "../src/client/index.ts";
import { bytesEqual, deadline } from "./helpers/assert.ts";
import { need, scratch } from "./helpers/env.ts";
import { makeImage } from "./helpers/remote-images.ts";
import { serve, type Served } from "./helpers/server.ts";
import { guardedSuite } from "./interop-lib.ts";
import { startNginx, type LoggedRequest, type Nginx } from "./services/nginx.ts";

const KiB = 1024, MiB = 1024 * KiB;
const dir = scratch("bun-nbd-remote-cache-");
let ngx: Nginx;

const { test, run } = guardedSuite("remote over http: GETs in flight, the cache directory", async () => {
  need("nginx");
  ngx = await startNginx();
  mkdirSync(join(ngx.root, "slow"));
  makeImage(join(ngx.root, "slow", "c.img"), 4 * MiB, 41);
  for (const [name, seed] of [["a", 42], ["b", 43], ["c", 44]] as const) makeImage(join(ngx.root, `${name}.img`), 4 * MiB, seed);
});

async function stopped(s: Served): Promise<void> {
  assert.is(await s.stop(), 0, `server exit status; output:\n${s.output()}`);
}

/** The most requests of `rs` in progress at one time (each with a margin of 50 ms taken off its end). */
function mostAtOnce(rs: LoggedRequest[]): number {
  const ev = rs.flatMap((r) => [[r.start, 1], [Math.max(r.start, r.end - 0.05), -1]] as [number, number][]);
  ev.sort((a, b) => a[0] - b[0] || a[1] - b[1]); // an end before a start at the same instant
  let now = 0, most = 0;
  for (const [, d] of ev) most = Math.max(most, (now += d));
  return most;
}

/**
 * Serve /slow/c.img (128 KiB/s per GET after a first 128 KiB at once: a 256 KiB block takes about
 * a second) with `conns` GETs in flight, read `n` blocks that are not neighbours all at once, and
 * return nginx's log lines of those GETs.
 */
async function parallelReads(conns: number, n: number): Promise<LoggedRequest[]> {
  const bs = 256 * KiB;
  const image = readFileSync(join(ngx.root, "slow", "c.img"));
  const s = await serve(["--no-cache", "--block-size", "256K", "--readahead", "0", "--small-reads", "blocks", "--remote-connections", String(conns), ngx.url("slow/c.img")]);
  let c: NbdClient | null = null;
  try {
    c = await connect(s.uri("c"));
    const from = ngx.requests("/slow/c.img").length;
    const blocks = Array.from({ length: n }, (_, i) => 2 * i + 1); // 1, 3, 5, ...: never merged into one GET
    const got = await Promise.all(blocks.map((b) => c!.read(b * bs, bs)));
    got.forEach((g, i) => bytesEqual(g, image.subarray(blocks[i]! * bs, (blocks[i]! + 1) * bs), `block ${blocks[i]}`));
    await Bun.sleep(100); // nginx logs a request just after its answer
    const want = new Set(blocks.map((b) => `bytes=${b * bs}-${(b + 1) * bs - 1}`));
    const rs = ngx.requests("/slow/c.img").slice(from).filter((r) => want.has(r.range));
    assert.is(rs.length, n, `one GET per block: ${rs.map((r) => r.range).join(" ")}`);
    assert.ok(rs.every((r) => r.status === 206 && r.bytes === bs));
    assert.ok(rs.every((r) => r.end - r.start >= 0.5), `each GET took half a second or more: ${rs.map((r) => (r.end - r.start).toFixed(3)).join(" ")}`);
    return rs;
  } finally {
    await c?.close();
    await stopped(s);
  }
}

test("reads in flight at once: their GETs overlap in time, at most --remote-connections of them", () => deadline(60_000, "GETs in flight", async () => {
  const three = await parallelReads(3, 6);
  assert.is(mostAtOnce(three), 3, `GETs in flight at once with --remote-connections 3: ${JSON.stringify(three.map((r) => [r.connection, r.start, r.end]))}`);
  const overlapping = three.filter((r) => three.some((o) => o !== r && o.start < r.end - 0.05 && r.start < o.end - 0.05));
  assert.ok(new Set(overlapping.map((r) => r.connection)).size >= 2, "overlapping GETs came on different connections");
  const one = await parallelReads(1, 4);
  assert.is(mostAtOnce(one), 1, `GETs in flight at once with --remote-connections 1: ${JSON.stringify(one.map((r) => [r.start, r.end]))}`);
}));

/** The cache directory's entries: the object each names (from its map header) -> its base path. */
function entries(cache: string): Map<string, string> {
  const m = new Map<string, string>();
  for (const name of readdirSync(cache).filter((n) => n.endsWith(".map"))) {
    const fd = openSync(join(cache, name), "r");
    const h = new Uint8Array(4096);
    readSync(fd, h, 0, 4096, 0);
    closeSync(fd);
    const text = new TextDecoder().decode(h).replace(/\0+$/, "");
    const key = (JSON.parse(text.slice(8)) as { key: string }).key;
    m.set(key.replace(/^.*\//, ""), join(cache, name.slice(0, -4)));
  }
  return m;
}

/** Serve `name` with the shared cache directory and read [off, off+len) of it. */
async function readThrough(cache: string, name: string, off: number, len: number): Promise<Served> {
  const s = await serve(["--cache-dir", cache, "--cache-size", "7680K", "--block-size", "64K", "--readahead", "0", ngx.url(name)]);
  try {
    const c = await connect(s.uri(name.replace(/\.img$/, "")));
    try {
      bytesEqual(await c.read(off, len), readFileSync(join(ngx.root, name)).subarray(off, off + len), `${name} [${off}, +${len})`);
    } finally { await c.close(); }
  } finally { await stopped(s); }
  return s;
}

/** Bytes of block data in the cache directory (what --cache-size bounds: the data files' allocated blocks). */
function dataBytes(cache: string): number {
  let n = 0;
  for (const name of readdirSync(cache)) if (name.endsWith(".data")) n += statSync(join(cache, name)).blocks * 512;
  return n;
}

const BOUND = 7680 * KiB;

test("a small --cache-size bounds the directory: while an image fills, the least recently used entry of another object goes, not the oldest", () => deadline(60_000, "eviction across entries", async () => {
  const cache = join(dir, "shared");
  // 7.5 MiB for the directory (64 KiB blocks), three images of 4 MiB. a.img first (3 MiB of it),
  // then c.img whole, then 256 KiB more of a.img: a.img was created first but used last.
  await readThrough(cache, "a.img", 0, 3 * MiB);
  await readThrough(cache, "c.img", 0, 4 * MiB);
  await Bun.sleep(20); // map times a few ms apart
  await readThrough(cache, "a.img", 3 * MiB, 256 * KiB);
  let e = entries(cache);
  assert.equal([...e.keys()].sort(), ["a.img", "c.img"], "both fit (7.25 MiB)");
  assert.ok(dataBytes(cache) <= BOUND, `${dataBytes(cache)} bytes`);
  const cPath = e.get("c.img")!;
  // b.img: 4 MiB more than the 7.25 MiB the others hold, so room must be made as it fills
  const s = await readThrough(cache, "b.img", 0, 4 * MiB);
  e = entries(cache);
  assert.equal([...e.keys()].sort(), ["a.img", "b.img"], "c.img, the least recently used, was dropped");
  assert.not.ok(existsSync(`${cPath}.data`) || existsSync(`${cPath}.map`), "both files of c.img's entry are gone");
  assert.match(s.output(), new RegExp(`cache: removed ${cPath.replace(/[.]/g, "\\.")} \\(least recently used\\) to stay within the cache size`));
  assert.ok(dataBytes(cache) <= BOUND, `the directory within --cache-size after b.img: ${dataBytes(cache)} bytes`);
  // what is left is still served from the cache: a.img without a GET
  const before = ngx.rangeGets("/a.img");
  await readThrough(cache, "a.img", 0, 3 * MiB + 256 * KiB);
  assert.is(ngx.rangeGets("/a.img"), before, "a.img's entry was kept whole");
}));

test("images served by one process share the bound: the second one evicts the first one's least recently used blocks", () => deadline(60_000, "one budget", async () => {
  const cache = join(dir, "one-process");
  const s = await serve(["--cache-dir", cache, "--cache-size", "6M", "--block-size", "64K", "--readahead", "0", ngx.url("a.img"), ngx.url("b.img")]);
  try {
    const [a, b] = [await connect(s.uri("a")), await connect(s.uri("b"))];
    try {
      const imgA = readFileSync(join(ngx.root, "a.img")), imgB = readFileSync(join(ngx.root, "b.img"));
      bytesEqual(await a.read(0, 4 * MiB), imgA.subarray(0, 4 * MiB), "a.img");
      bytesEqual(await a.read(0, 1 * MiB), imgA.subarray(0, 1 * MiB), "a.img's first MiB again (used last)");
      bytesEqual(await b.read(0, 4 * MiB), imgB.subarray(0, 4 * MiB), "b.img");
      await Bun.sleep(100); // block writes on the thread pool land
      assert.ok(dataBytes(cache) <= 6 * MiB, `the directory within --cache-size: ${dataBytes(cache)} bytes`);
      // a.img kept its first MiB (used last) and lost the rest first
      const gets = ngx.rangeGets("/a.img");
      bytesEqual(await a.read(0, 1 * MiB), imgA.subarray(0, 1 * MiB), "a.img's first MiB");
      assert.is(ngx.rangeGets("/a.img"), gets, "a.img's most recently used MiB was kept");
      // 6 MiB hold 96 blocks of 64 KiB: b.img's 64 took the room of a.img's 32 least recently used, its 2nd and 3rd MiB
      bytesEqual(await a.read(1 * MiB, 2 * MiB), imgA.subarray(1 * MiB, 3 * MiB), "a.img's 2nd and 3rd MiB");
      assert.ok(ngx.rangeGets("/a.img") > gets, "a.img's least recently used blocks were evicted for b.img's");
    } finally { await a.close(); await b.close(); }
  } finally { await stopped(s); }
}));

run();
