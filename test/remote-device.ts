// The remote image device against a real nginx: byte-exact reads at block edges and random
// offsets (and the shared device conformance suite), GET counts for coalescing, readahead and the
// persistent cache, cache eviction within its budget, version pinning (a replaced file gives EIO
// and a log line, never mixed bytes), clear errors at open (404, 403, no ranges, nothing
// listening), retries until the deadline then EIO, recovery, and an event loop that keeps running
// while the store is slow. (URL parsing, redaction and the cache file alone: remote-cache.ts.)
import * as assert from "uvu/assert";
import { mkdirSync, readFileSync, readSync, renameSync, statSync, symlinkSync, utimesSync } from "node:fs";
import { join } from "node:path";
import { bytesEqual, rejects } from "./helpers/assert.ts";
import { conformance, rng } from "./helpers/conformance.ts";
import { scratch } from "./helpers/env.ts";
import { logSink, makeImage } from "./helpers/remote-images.ts";
import { BASIC_PASSWORD, BASIC_USER, freePort, startNginx, type Nginx } from "./services/nginx.ts";
import { openRemoteImage, type RemoteImage, type RemoteSettings } from "../src/devices/remote/index.ts";
import { ABSENT, DATA, PARTIAL } from "../src/devices/remote/cache.ts";
import { NbdError } from "../src/protocol/errors.ts";
import { NBD_EIO } from "../src/protocol/constants.ts";
import { isPromise, type FileRange } from "../src/devices/types.ts";
import { guardedSuite } from "./interop-lib.ts";

const KiB = 1024, MiB = 1024 * KiB;
const dir = scratch("bun-nbd-remote-dev-");
let ngx: Nginx;

const read = async (d: RemoteImage, off: number, len: number) => {
  const b = new Uint8Array(len);
  const r = d.pread(b, off, 0);
  if (isPromise(r)) await r;
  return b;
};
const settings = (o: RemoteSettings = {}): RemoteSettings => ({ cacheDir: null, blockSize: 64 * KiB, maxRequest: 256 * KiB, readahead: 0, deadlineMs: 1500, attemptTimeoutMs: 1000, ...o });

// ---------------------------------------------------------------------------------------------
const SIZE = 5 * MiB + 12345; // a partial last block
let image: string;
let local: Uint8Array;

// uvu swallows errors thrown in before hooks: a failed setup fails every test with its cause
const { test: S, run: runS } = guardedSuite("remote: device over nginx", async () => {
  ngx = await startNginx();
  image = makeImage(join(ngx.root, "disk.img"), SIZE, 7, { zeroEvery: 3 });
  local = readFileSync(image);
  mkdirSync(join(ngx.root, "private"));
  mkdirSync(join(ngx.root, "denied"));
  mkdirSync(join(ngx.root, "noranges"));
  mkdirSync(join(ngx.root, "slow"));
  for (const d of ["private", "denied", "noranges", "slow"]) symlinkSync(image, join(ngx.root, d, "disk.img"));
});

S("reads at block edges, the last byte and random ranges match the file", async () => {
  const d = await openRemoteImage(ngx.url("disk.img"), settings(), () => {});
  try {
    assert.is(d.size(), SIZE);
    const bs = 64 * KiB;
    for (const [off, len] of [[0, 1], [bs - 1, 2], [bs, bs], [3 * bs - 7, 2 * bs + 14], [SIZE - 1, 1], [SIZE - 12345, 12345], [SIZE - bs - 5, bs + 5]] as const) {
      bytesEqual(await read(d, off, len), local.subarray(off, off + len), `[${off}, +${len})`);
    }
    const r = rng(99);
    for (let i = 0; i < 200; i++) {
      const len = 1 + r(300 * KiB);
      const off = r(SIZE - len);
      bytesEqual(await read(d, off, len), local.subarray(off, off + len), `random [${off}, +${len})`);
    }
  } finally { await d.close(); }
});

S("the whole image twice: the second pass sends no GET; zero blocks stay holes in the cache", async () => {
  const cacheDir = join(dir, "twice");
  const d = await openRemoteImage(ngx.url("disk.img"), settings({ cacheDir }), () => {});
  try {
    const before = ngx.rangeGets("/disk.img");
    bytesEqual(await read(d, 0, SIZE), local, "first pass");
    assert.is(d.counters.cacheMisses, Math.ceil(SIZE / (64 * KiB)), "every block missed once");
    const mid = ngx.rangeGets("/disk.img");
    assert.ok(mid - before >= 1 && mid - before <= Math.ceil(SIZE / (256 * KiB)) + 1, `GETs for one pass: ${mid - before}`);
    bytesEqual(await read(d, 0, SIZE), local, "second pass (blocks still being written join their writes)");
    assert.is(ngx.rangeGets("/disk.img"), mid, "no GET for the second pass");
    await Bun.sleep(200); // the cache's writes end
    const misses = d.counters.cacheMisses;
    bytesEqual(await read(d, 0, SIZE), local, "third pass");
    assert.is(d.counters.cacheMisses, misses, "the third pass is all hits");
    const allocated = d.blocks.used;
    assert.ok(allocated < SIZE * 0.75, `zero MiBs are not stored (${allocated} of ${SIZE} bytes)`);
  } finally { await d.close(); }
});

S("blocks wanted in one tick go out as merged GETs; several GETs in flight", async () => {
  const d = await openRemoteImage(ngx.url("disk.img"), settings({ maxRequest: 4 * 64 * KiB }), () => {});
  try {
    const before = ngx.rangeGets("/disk.img");
    const ps = [];
    // 40 KiB of each block: reads of half a block or more fetch whole blocks
    for (let b = 0; b < 8; b++) ps.push(read(d, b * 64 * KiB + 100, 40 * KiB));
    const got = await Promise.all(ps);
    got.forEach((g, b) => bytesEqual(g, local.subarray(b * 64 * KiB + 100, b * 64 * KiB + 100 + 40 * KiB), `block ${b}`));
    assert.is(ngx.rangeGets("/disk.img") - before, 2, "8 neighbouring blocks in 2 GETs of 4 blocks");
    assert.ok(ngx.log().some((l) => l.includes(`"bytes=0-${4 * 64 * KiB - 1}"`)), "a GET of 4 blocks");
  } finally { await d.close(); }
});

S("a sequential reader gets readahead; a random one does not", async () => {
  const d = await openRemoteImage(ngx.url("disk.img"), settings({ readahead: 256 * KiB, maxRequest: 64 * KiB }), () => {});
  try {
    for (let off = 0; off < 3 * 64 * KiB; off += 32 * KiB) await read(d, off, 32 * KiB);
    await Bun.sleep(200);
    assert.ok(d.counters.readaheadRequests >= 3, `readahead GETs: ${d.counters.readaheadRequests}`);
    const misses = d.counters.cacheMisses;
    await read(d, 4 * 64 * KiB, 64 * KiB);
    assert.is(d.counters.cacheMisses, misses, "the block after a sequential run was fetched ahead");
  } finally { await d.close(); }
  const e = await openRemoteImage(ngx.url("disk.img"), settings({ readahead: 256 * KiB }), () => {});
  try {
    for (const b of [40, 3, 71, 20, 55]) await read(e, b * 64 * KiB, 4096);
    assert.is(e.counters.readaheadRequests, 0);
  } finally { await e.close(); }
});

S("a small read out of sequence fetches its 4 KiB pieces or its block, as --small-reads says; auto follows the store's round trip", async () => {
  // the ranges nginx logged since line `from` (a line is written just after its answer: wait a little)
  const ranges = async (from: number) => (await Bun.sleep(100), ngx.log()).slice(from).filter((l) => l.includes("/disk.img ") && !l.includes('"bytes=0-0"')).map((l) => /"bytes=(\d+)-(\d+)"/.exec(l)).filter((m) => m !== null).map((m) => [Number(m![1]), Number(m![2]) + 1]);
  const bs = 64 * KiB, off = 23 * bs + 5000; // block 23: in the second MiB, which holds data
  const pieces = await openRemoteImage(ngx.url("disk.img"), settings({ smallReads: "pieces" }), () => {});
  try {
    let mark = ngx.log().length;
    bytesEqual(await read(pieces, off, 6000), local.subarray(off, off + 6000), "pieces");
    assert.equal(await ranges(mark), [[23 * bs + 4096, 23 * bs + 12288]], "the two 4 KiB pieces the read touches");
    await Bun.sleep(100); // their cache write ends (the read was answered before it)
    mark = ngx.log().length;
    bytesEqual(await read(pieces, off + 1000, 3000), local.subarray(off + 1000, off + 4000), "again");
    assert.equal(await ranges(mark), [], "held pieces: no GET");
    bytesEqual(await read(pieces, 23 * bs, 4096), local.subarray(23 * bs, 23 * bs + 4096), "a piece not held yet");
    await Bun.sleep(100);
    assert.is(pieces.blocks.state[23], PARTIAL);
    bytesEqual(await read(pieces, 23 * bs, bs), local.subarray(23 * bs, 24 * bs), "the whole block");
    await Bun.sleep(100);
    assert.is(pieces.blocks.state[23], DATA, "a read of the whole block fetches it whole");
  } finally { await pieces.close(); }
  const blocks = await openRemoteImage(ngx.url("disk.img"), settings({ smallReads: "blocks" }), () => {});
  try {
    const mark = ngx.log().length;
    bytesEqual(await read(blocks, off, 6000), local.subarray(off, off + 6000), "blocks");
    assert.equal(await ranges(mark), [[23 * bs, 24 * bs]]);
  } finally { await blocks.close(); }
  const auto = await openRemoteImage(ngx.url("disk.img"), settings({ smallReads: "auto", blockSize: MiB }), () => {});
  try {
    assert.ok(auto.fetcher.roundTripMs !== null && auto.fetcher.roundTripMs < 50, `round trip measured by the probe at open: ${auto.fetcher.roundTripMs} ms`);
    let mark = ngx.log().length;
    await read(auto, 3 * MiB, 4096);
    assert.equal(await ranges(mark), [[3 * MiB, 3 * MiB + 4096]], "pieces from the first read");
    auto.fetcher.bytesPerMs = 100_000; // 100 MB/s: moving 1 MiB costs ~10 ms, far more than a round trip here
    mark = ngx.log().length;
    await read(auto, 100_000, 4096);
    assert.equal(await ranges(mark), [[98304, 106496]], "a round trip cheaper than a block: pieces");
    auto.fetcher.roundTripMs = 40; // as from an object store 40 ms away
    mark = ngx.log().length;
    await read(auto, 2 * MiB + 100_000, 4096);
    assert.equal(await ranges(mark), [[2 * MiB, 3 * MiB]], "a round trip dearer than a block: the whole block");
  } finally { await auto.close(); }
});

S("whenInFile: a large read settles once its blocks are in the cache file (for sendfile); small random reads, failures and evictions", async () => {
  const d = await openRemoteImage(ngx.url("disk.img"), settings({ smallReads: "pieces", cacheSize: 16 * 64 * KiB }), () => {});
  try {
    const bs = 64 * KiB, off = 20 * bs + 100, len = 3 * bs;
    const later = d.whenInFile(off, len);
    assert.ok(later !== null, "a read of three blocks will be in the file");
    await later;
    const out = { fd: -1, offset: 0 };
    assert.ok(d.fileRange(off, len, out), "then fileRange names it");
    const got = new Uint8Array(len);
    readSync(out.fd, got, 0, len, out.offset);
    bytesEqual(got, local.subarray(off, off + len), "the cache file's bytes");
    assert.is(d.whenInFile(40 * bs + 100, 4096), null, "a small read out of sequence fetches pieces instead");
    assert.ok(d.whenInFile(off + len, 4096) !== null, "one that continues a recent read takes whole blocks");
    await ngx.stop(true);
    const e = await rejects(() => d.whenInFile(60 * bs, bs)!, "store down");
    assert.is((e as NbdError).errno, NBD_EIO);
    await ngx.start();
    for (let b = 16; b < 80; b += 2) await read(d, b * bs, bs); // past the budget (MiB 0 and 3 are zeros, kept as holes): evictions
    assert.ok(d.blocks.evictions > 0);
    const e2 = d.whenInFile(70 * bs, bs);
    assert.ok(e2 !== null, "a cache that evicts still sends from the file (blocks being sent are pinned)");
    await e2;
  } finally { await d.close(); if (!ngx.running()) await ngx.start(); }
});

S("the cache survives a reopen (no GET) and a changed file gets a new entry", async () => {
  const cacheDir = join(dir, "persist");
  const a = await openRemoteImage(ngx.url("disk.img"), settings({ cacheDir }), () => {});
  await read(a, 0, SIZE);
  await a.close();
  const before = ngx.rangeGets("/disk.img");
  const b = await openRemoteImage(ngx.url("disk.img"), settings({ cacheDir }), () => {});
  try {
    bytesEqual(await read(b, 0, SIZE), local, "after reopen");
    assert.is(ngx.rangeGets("/disk.img"), before, "served from the persistent cache");
    assert.is(b.counters.cacheMisses, 0);
  } finally { await b.close(); }
});

S("the cache stays within its budget, evicting the least recently used blocks", async () => {
  const cacheDir = join(dir, "budget");
  const d = await openRemoteImage(ngx.url("disk.img"), settings({ cacheDir, cacheSize: 16 * 64 * KiB }), () => {});
  try {
    const r = rng(5);
    for (let i = 0; i < 150; i++) {
      const off = r(SIZE - 4096);
      bytesEqual(await read(d, off, 4096), local.subarray(off, off + 4096), `read ${i}`);
      assert.ok(d.blocks.used <= 16 * 64 * KiB, `cache holds ${d.blocks.used}`);
    }
    assert.ok(d.blocks.evictions > 0, "evicted some blocks");
    // a block being sent from the cache file is pinned: never evicted (its hole would be sent as
    // zeros) until the server releases it
    const off = 2 * MiB + 4096;
    await read(d, off, 4096);
    await Bun.sleep(100); // its cache write ends
    const out: FileRange = { fd: -1, offset: 0 };
    assert.ok(d.fileRange(off, 4096, out) && out.release, "cached, sent from the file, with a release");
    const b = Math.floor(off / (64 * KiB));
    for (let i = 0; i < 100; i++) await read(d, r(SIZE - 4096), 4096);
    assert.is.not(d.blocks.state[b], ABSENT, "a pinned block outlives the eviction of 100 reads");
    const got = new Uint8Array(4096);
    readSync(out.fd, got, 0, 4096, out.offset);
    bytesEqual(got, local.subarray(off, off + 4096), "its bytes in the file");
    out.release!();
    for (let i = 0; i < 100; i++) await read(d, r(SIZE - 4096), 4096);
    assert.is(d.blocks.state[b], ABSENT, "released, it is evicted like the others");
  } finally { await d.close(); }
});

S("a replaced file: uncached reads fail with EIO and a log line, cached reads keep the pinned bytes", async () => {
  const path = makeImage(join(ngx.root, "swap.img"), 2 * MiB, 1);
  const old = readFileSync(path);
  const logs = logSink();
  const d = await openRemoteImage(ngx.url("swap.img"), settings({ readahead: 0 }), logs.log);
  try {
    bytesEqual(await read(d, 0, 64 * KiB), old.subarray(0, 64 * KiB), "before the change");
    const next = makeImage(join(ngx.root, "swap.new"), 2 * MiB, 2);
    utimesSync(next, new Date(), new Date(Date.now() + 5000)); // another mtime: another ETag
    renameSync(next, path);
    const e = await rejects(() => read(d, MiB, 4096), "uncached read of a replaced object");
    assert.instance(e, NbdError);
    assert.is((e as NbdError).errno, NBD_EIO);
    assert.match(e.message, /changed since it was opened/);
    assert.ok(logs.has(/swap\.img changed since it was opened/), logs.lines.join("\n"));
    bytesEqual(await read(d, 0, 64 * KiB), old.subarray(0, 64 * KiB), "cached bytes are the pinned version");
    const straddle = await rejects(() => read(d, 60 * KiB, 8 * KiB), "a read half in the cache");
    assert.match(straddle.message, /changed/);
    await Bun.sleep(300);
    assert.ok(logs.has(/swap\.img now: 2097152 bytes, ETag/), logs.lines.join("\n"));
    assert.ok(d.counters.versionMismatches >= 2);
  } finally { await d.close(); }
});

S("errors at open name the URL and the status", async () => {
  const quiet = () => {};
  let e = await rejects(() => openRemoteImage(ngx.url("missing.img"), settings(), quiet), "404");
  assert.match(e.message, new RegExp(`${ngx.url("missing.img").replace(/[.]/g, "\\.")}: HTTP 404`));
  e = await rejects(() => openRemoteImage(ngx.url("denied/disk.img"), settings(), quiet), "403");
  assert.match(e.message, /denied\/disk\.img: HTTP 403/);
  e = await rejects(() => openRemoteImage(ngx.url("private/disk.img"), settings(), quiet), "401");
  assert.match(e.message, /HTTP 401/);
  e = await rejects(() => openRemoteImage(ngx.url("noranges/disk.img"), settings(), quiet), "no ranges");
  assert.match(e.message, /ignores range requests/);
  const port = await freePort();
  e = await rejects(() => openRemoteImage(`http://127.0.0.1:${port}/x.img`, settings(), quiet), "nothing listening");
  assert.match(e.message, new RegExp(`cannot reach http://127\\.0\\.0\\.1:${port}/x\\.img: connection refused`));
});

S("basic auth from the URL is sent but never printed", async () => {
  const url = ngx.url("private/disk.img").replace("http://", `http://${BASIC_USER}:${BASIC_PASSWORD}@`);
  const logs = logSink();
  const d = await openRemoteImage(url, settings(), logs.log);
  try {
    bytesEqual(await read(d, 70000, 5000), local.subarray(70000, 75000), "through basic auth");
    assert.not.ok(d.location.includes(BASIC_PASSWORD) || d.location.includes(BASIC_USER), d.location);
  } finally { await d.close(); }
});

S("store down mid-run: retries until the deadline, then EIO for that read only; reads recover", async () => {
  const logs = logSink();
  const d = await openRemoteImage(ngx.url("disk.img"), settings({ deadlineMs: 1200 }), logs.log);
  try {
    await read(d, 0, 4096); // block 0 cached
    await ngx.stop(true);
    const t0 = Date.now();
    const e = await rejects(() => read(d, 2 * MiB, 4096), "read while nginx is down");
    assert.is((e as NbdError).errno, NBD_EIO);
    assert.match(e.message, /gave up after \d+ attempts/);
    assert.ok(Date.now() - t0 >= 900, `gave up after ${Date.now() - t0} ms`);
    assert.ok(d.counters.retries > 0);
    assert.ok(logs.has(/retrying with backoff/), logs.lines.join("\n"));
    bytesEqual(await read(d, 0, 4096), local.subarray(0, 4096), "cached block while the store is down");
    const pending = read(d, 3 * MiB, 4096); // retried while nginx comes back
    await Bun.sleep(300);
    await ngx.start();
    bytesEqual(await pending, local.subarray(3 * MiB, 3 * MiB + 4096), "read that waited for the store");
    bytesEqual(await read(d, 2 * MiB, 4096), local.subarray(2 * MiB, 2 * MiB + 4096), "the failed range, after recovery");
    assert.ok(logs.has(/answers again/), logs.lines.join("\n"));
  } finally { await d.close(); if (!ngx.running()) await ngx.start(); }
});

S("a slow store never blocks the event loop", async () => {
  // /slow/ sends 128 KiB/s: one 64 KiB block takes about half a second
  const d = await openRemoteImage(ngx.url("slow/disk.img"), settings({ deadlineMs: 30_000, attemptTimeoutMs: 30_000 }), () => {});
  try {
    await read(d, 0, 8192); // its two 4 KiB pieces are cached (written just after the answer)
    for (let i = 0; i < 100 && !d.isCached(0, 8192); i++) await Bun.sleep(10);
    const slow = read(d, 3 * MiB, 4096);
    slow.catch(() => {}); // awaited below; a failed assertion before that must not end the run
    let ticks = 0;
    const timer = setInterval(() => { ticks++; }, 10);
    const t0 = Date.now();
    const cached = d.pread(new Uint8Array(4096), 100, 0);
    assert.not.ok(isPromise(cached), "a cached read completes synchronously while a GET is slow");
    await Bun.sleep(500);
    clearInterval(timer);
    assert.ok(ticks >= 25, `timer ticks in 500 ms while a GET crawls: ${ticks}`);
    assert.ok(Date.now() - t0 < 2000);
    bytesEqual(await slow, local.subarray(3 * MiB, 3 * MiB + 4096), "the slow read completes");
  } finally { await d.close(); }
});

runS();

// ---------------------------------------------------------------------------------------------
conformance("RemoteImage over nginx (64 KiB blocks, throw-away cache)", {
  ops: 150,
  make: async () => {
    if (ngx === undefined) throw new Error("nginx did not start: see the failures of \"remote: device over nginx\"");
    if (!ngx.running()) await ngx.start();
    const path = join(ngx.root, "conf.img");
    try { statSync(path); } catch { makeImage(path, 3 * MiB + 4097, 3, { zeroEvery: 2 }); }
    const device = await openRemoteImage(ngx.url("conf.img"), settings({ readahead: 128 * KiB }), () => {});
    return { device, expected: readFileSync(path), cleanup: () => device.close() };
  },
});
