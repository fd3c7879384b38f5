// Remote images on the metrics endpoint, against a real nginx and the real CLI: a cold read sends
// GETs (as many as nginx logs), fetches bytes and misses the cache; the same read again only hits
// it. Every series carries the export and the redacted location, and neither the URL's user:password
// nor the AWS secret in the environment ever reaches a scrape. nginx stopped for a moment shows up
// as retries. Snapshots and per-client overlays count on their base, under their export. A reload
// that reopens an export sums its old and new image into one series while an old session reads
// on; one that renames it shows the old name until that session ends, then only the new one.
import * as assert from "uvu/assert";
import { cpSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { bytesEqual, deadline } from "./helpers/assert.ts";
import { need, scratch } from "./helpers/env.ts";
import { parseExposition, samplesOf, type Sample } from "./helpers/exposition.ts";
import { makeImage } from "./helpers/remote-images.ts";
import { serve, type Served } from "./helpers/server.ts";
import { guardedSuite } from "./interop-lib.ts";
import { BASIC_PASSWORD, BASIC_USER, startNginx, type Nginx } from "./services/nginx.ts";
import { connect } from "../src/client/index.ts";

const MiB = 1024 * 1024;
const KiB = 1024;
const AWS_SECRET = "wJalr-metrics-XUtnFEMI-K7MDENG-bPxRfiCY";
const AWS_KEY_ID = "AKIAMETRICSTEST12345";
const dir = scratch("bun-nbd-remote-metrics-");
let ngx: Nginx;
let image: Uint8Array;

const { test, run: runSuite } = guardedSuite("remote images on the metrics endpoint", async () => {
  need("nginx");
  ngx = await startNginx();
  const path = makeImage(join(ngx.root, "disk.img"), 8 * MiB, 21);
  mkdirSync(join(ngx.root, "private"), { recursive: true });
  cpSync(path, join(ngx.root, "private", "p.img"));
  image = readFileSync(path);
});

const FAMILIES = ["requests_total", "fetched_bytes_total", "cache_hits_total", "cache_misses_total", "retries_total",
  "readahead_requests_total", "evictions_total", "version_mismatches_total", "errors_total", "cached_bytes"].map((f) => `bun_nbd_remote_${f}`);

function metricsUrl(s: Served): string {
  const url = /Metrics at (http:\/\/127\.0\.0\.1:\d+\/metrics)/.exec(s.output())?.[1];
  assert.ok(url, s.output());
  return url!;
}

async function scrape(url: string): Promise<{ text: string; m: Sample[] }> {
  const text = await (await fetch(url)).text();
  return { text, m: parseExposition(text) };
}

/** The one sample of `family` with `labels`. */
function one(m: Sample[], family: string, labels: Record<string, string>): number {
  const x = samplesOf(m, family, labels);
  assert.is(x.length, 1, `${family} ${JSON.stringify(labels)}: ${JSON.stringify(x)}`);
  return x[0]!.value;
}

/** GETs nginx logged for `uri` (any status, the open's 1-byte probe aside), once the log has settled. */
async function loggedGets(uri: string): Promise<number> {
  let n = -1;
  for (let i = 0; i < 20; i++) {
    const now = ngx.requests(uri).filter((r) => r.method === "GET" && r.range !== "bytes=0-0").length;
    if (now === n) return n;
    n = now;
    await Bun.sleep(50);
  }
  return n;
}

const REMOTE = ["--block-size", "64K", "--readahead", "0"];

test("a cold read fetches and misses, the same read again only hits; labelled, no secret in a scrape", () => deadline(60_000, "cold/warm", async () => {
  const url = ngx.url("private/p.img").replace("http://", `http://${BASIC_USER}:${BASIC_PASSWORD}@`);
  const s = await serve(["--metrics", "127.0.0.1:0", "--cache-dir", join(dir, "cache-1"), ...REMOTE, url],
    { env: { AWS_SECRET_ACCESS_KEY: AWS_SECRET, AWS_ACCESS_KEY_ID: AWS_KEY_ID } });
  const texts: string[] = [];
  try {
    const murl = metricsUrl(s);
    const e = { export: "p", location: ngx.url("private/p.img") };
    const at = async () => {
      const { text, m } = await scrape(murl);
      texts.push(text);
      const v = (f: string) => one(m, `bun_nbd_remote_${f}`, e);
      return { m, requests: v("requests_total"), bytes: v("fetched_bytes_total"), hits: v("cache_hits_total"), misses: v("cache_misses_total"), cached: v("cached_bytes"), gets: await loggedGets("/private/p.img") };
    };
    /** A scrape once `ready` holds of it (cached bytes are counted when the cache's writes land, which may be just after the answer). */
    const atWhen = async (ready: (m: Awaited<ReturnType<typeof at>>) => boolean) => {
      for (let i = 0; ; i++) {
        const m = await at();
        if (ready(m) || i >= 100) return m;
        await Bun.sleep(50);
      }
    };
    const m0 = await at();
    // every family is there, and every remote series carries the export and the redacted location
    for (const f of FAMILIES) assert.is(samplesOf(m0.m, f).length, 1, `${f}: one series for the one image`);
    for (const x of m0.m.filter((x) => x.name.startsWith("bun_nbd_remote_"))) assert.equal(x.labels, e, `${x.name} labels`);
    assert.is(m0.requests, m0.gets, "the open's sniffing reads are GETs nginx saw");

    const c = await connect(s.uri("p"));
    try {
      // a small read out of sequence: one block missed (its 4 KiB pieces fetched), then hit
      const so = 3 * MiB + 8 * KiB, sl = 8 * KiB;
      bytesEqual(await c.read(so, sl), image.subarray(so, so + sl), "cold small read");
      const m1 = await atWhen((m) => m.cached - m0.cached >= sl);
      assert.ok(m1.requests > m0.requests, `GETs ${m0.requests} -> ${m1.requests}`);
      assert.is(m1.requests - m0.requests, m1.gets - m0.gets, "the GETs counted are the GETs nginx logged");
      assert.ok(m1.bytes - m0.bytes >= sl, `bytes fetched ${m0.bytes} -> ${m1.bytes}`);
      assert.is(m1.misses - m0.misses, 1, "one block missed");
      assert.is(m1.hits, m0.hits, "nothing was cached to hit");
      assert.ok(m1.cached - m0.cached >= sl, `cached bytes ${m0.cached} -> ${m1.cached}`);
      bytesEqual(await c.read(so, sl), image.subarray(so, so + sl), "warm small read");
      const m2 = await at();
      assert.is(m2.hits - m1.hits, 1, "the same block hit");
      assert.is(m2.requests, m1.requests, "no GET for a cached range");
      assert.is(m2.gets, m1.gets, "nginx saw no GET either");
      assert.is(m2.bytes, m1.bytes);
      assert.is(m2.misses, m1.misses);

      // a large read (whole blocks, sent from the cache file): three blocks missed, then hit.
      const lo = 4 * MiB + 4 * KiB, ll = 128 * KiB;
      bytesEqual(await c.read(lo, ll), image.subarray(lo, lo + ll), "cold large read");
      const m3 = await atWhen((m) => m.cached - m2.cached >= ll);
      assert.ok(m3.requests > m2.requests, `GETs ${m2.requests} -> ${m3.requests}`);
      assert.is(m3.requests - m2.requests, m3.gets - m2.gets, "the GETs counted are the GETs nginx logged");
      assert.ok(m3.bytes - m2.bytes >= ll, `bytes fetched ${m2.bytes} -> ${m3.bytes}`);
      assert.is(m3.misses - m2.misses, 3, "three blocks missed");
      assert.is(m3.hits, m2.hits, "and none hit: sent from the cache file once fetched, they were counted once");
      assert.ok(m3.cached - m2.cached >= ll, `cached bytes ${m2.cached} -> ${m3.cached}`);
      bytesEqual(await c.read(lo, ll), image.subarray(lo, lo + ll), "warm large read");
      const m4 = await at();
      assert.is(m4.hits - m3.hits, 3, "the same three blocks hit");
      assert.is(m4.requests, m3.requests, "no GET for a cached range");
      assert.is(m4.gets, m3.gets, "nginx saw no GET either");
      assert.is(m4.bytes, m3.bytes);
      assert.is(m4.misses, m3.misses);
      // the server's own series carry the same export label
      assert.is(one(m4.m, "bun_nbd_read_bytes_total", { export: "p" }), 2 * (sl + ll));
    } finally { await c.close(); }
  } finally { assert.is(await s.stop(), 0, s.output()); }
  for (const text of texts) {
    for (const secret of [BASIC_PASSWORD, `${BASIC_USER}:`, `${BASIC_USER}@`, AWS_SECRET, AWS_KEY_ID]) {
      assert.not.ok(text.includes(secret), `a scrape shows ${secret}`);
    }
  }
}));

test("nginx stopped for a moment: the read waits, retries are counted, no EIO", () => deadline(60_000, "retries", async () => {
  const s = await serve(["--metrics", "127.0.0.1:0", "--no-cache", ...REMOTE, ngx.url("disk.img")]);
  try {
    const murl = metricsUrl(s);
    const e = { export: "disk" };
    const c = await connect(s.uri("disk"));
    try {
      const before = (await scrape(murl)).m;
      await ngx.stop();
      const off = 5 * MiB, len = 64 * KiB;
      const read = c.read(off, len);
      await Bun.sleep(1500);
      await ngx.start();
      bytesEqual(await read, image.subarray(off, off + len), "the read after nginx came back");
      const after = (await scrape(murl)).m;
      const d = (f: string) => one(after, `bun_nbd_remote_${f}`, e) - one(before, `bun_nbd_remote_${f}`, e);
      assert.ok(d("retries_total") >= 1, `retries went up by ${d("retries_total")}`);
      assert.ok(d("requests_total") > d("retries_total"), "every attempt is a GET sent");
      assert.is(d("errors_total"), 0, "no EIO: the store came back within the deadline");
      assert.is(d("cache_misses_total"), 1);
    } finally { await c.close(); }
  } finally {
    if (!ngx.running()) await ngx.start();
    assert.is(await s.stop(), 0, s.output());
  }
}));

test("reload renames the export: the old image is reported while a session reads it, then dropped", () => deadline(60_000, "reload", async () => {
  const cfg = join(dir, "remote.toml");
  const conf = (name: string, extra = "") => `[server]\nlisten = ["127.0.0.1:0"]\n[[export]]\nname = "${name}"\nfile = "${ngx.url("disk.img")}"\n${extra}`;
  writeFileSync(cfg, conf("gold"));
  const s = await serve(["--config", cfg, "--metrics", "127.0.0.1:0", "--no-cache", ...REMOTE]);
  try {
    const murl = metricsUrl(s);
    const exports = async () => [...new Set((await scrape(murl)).m.filter((x) => x.name === "bun_nbd_remote_requests_total").map((x) => x.labels.export ?? ""))].sort();
    assert.equal(await exports(), ["gold"]);
    const old = await connect(s.uri("gold"));
    await old.read(0, 4096);
    const gets = async () => samplesOf((await scrape(murl)).m, "bun_nbd_remote_requests_total", { export: "gold" }).map((x) => x.value);
    const [g0] = await gets();
    const hup = async () => {
      const before = s.output().length;
      s.proc.kill("SIGHUP");
      for (const end = Date.now() + 10_000; !/reloaded /.test(s.output().slice(before)); await Bun.sleep(20)) {
        assert.ok(Date.now() < end, `no reload line:\n${s.output().slice(before)}`);
      }
    };
    // the same export reopened (now with a snapshot) while the old session reads the old image:
    // both images have the same labels, so they are one series, their sum
    writeFileSync(cfg, conf("gold", 'overlay = "snapshot"\n'));
    await hup();
    const g1 = await gets();
    assert.is(g1.length, 1, "one series per export and location");
    assert.ok(g1[0]! > g0!, `the old image's GETs and the new one's: ${g0} -> ${g1[0]}`);
    writeFileSync(cfg, conf("silver"));
    await hup();
    assert.equal(await exports(), ["gold", "silver"], "the old session's image is still in use");
    bytesEqual(await old.read(2 * MiB, 4096), image.subarray(2 * MiB, 2 * MiB + 4096), "the old session reads on");
    await old.close();
    let now: string[] = [];
    for (const end = Date.now() + 5000; Date.now() < end; await Bun.sleep(50)) if ((now = await exports()).length === 1) break;
    assert.equal(now, ["silver"], "the closed image is no longer reported");
  } finally { assert.is(await s.stop(), 0, s.output()); }
}));

test("overlays over a remote base (snapshot, per-client) report the base's counters under their export, once each", () => deadline(60_000, "overlays", async () => {
  const cfg = join(dir, "overlays.toml");
  const ov = join(dir, "farm");
  mkdirSync(ov, { recursive: true });
  const url = ngx.url("disk.img");
  writeFileSync(cfg, `[[export]]\nname = "plain"\nfile = "${url}"\n\n[[export]]\nname = "snap"\nfile = "${url}"\noverlay = "snapshot"\n\n` +
    `[[export]]\nname = "farm"\nfile = "${url}"\noverlay = "per-client"\noverlay-dir = "${ov}"\n`);
  const s = await serve(["--config", cfg, "--metrics", "127.0.0.1:0", "--no-cache", ...REMOTE]);
  try {
    const murl = metricsUrl(s);
    const misses = async () => {
      const x = samplesOf((await scrape(murl)).m, "bun_nbd_remote_cache_misses_total");
      for (const y of x) assert.is(y.labels.location, url);
      return Object.fromEntries(x.map((y) => [y.labels.export, y.value]));
    };
    const m0 = await misses();
    assert.equal(Object.keys(m0).sort(), ["farm", "plain", "snap"], "one series per remote image, by export");
    for (const [name, off] of [["farm@vm1", 6 * MiB], ["snap", 7 * MiB]] as const) {
      const c = await connect(s.uri(name));
      try {
        bytesEqual(await c.read(off, 4096), image.subarray(off, off + 4096), name);
      } finally { await c.close(); }
    }
    const m1 = await misses();
    assert.ok(m1.farm! > m0.farm!, `a client's overlay reads count on its base: ${JSON.stringify([m0, m1])}`);
    assert.ok(m1.snap! > m0.snap!, `a snapshot's reads count on its base: ${JSON.stringify([m0, m1])}`);
    assert.is(m1.plain, m0.plain, "another export's image is untouched");
  } finally { assert.is(await s.stop(), 0, s.output()); }
}));

runSuite();
