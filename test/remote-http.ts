// `bun-nbd serve http://...` end to end against a real nginx, with real clients: a byte-exact
// nbdcopy of a 1 GiB image and a second pass served from the cache (nginx's access log counts
// the GETs), random reads through libnbd against the local file, kill -9 while the cache fills
// (the cache stays consistent and is reused after a restart), nginx stopped mid-copy (EIO, the
// server survives, the next copy is exact), an image replaced while served (EIO and a log line,
// never bytes of the new version), a CUE sheet whose BINs sit next to it, credentials kept out of
// logs and LIST, and clear errors at start (and a throw-away overlay over the remote disc). BUN_NBD_REMOTE_BIG_MIB sets the big image's size.
// More in remote-http-faults.ts (5xx and stalls mid-run), remote-http-cache.ts (GETs in flight,
// the cache directory's bound) and remote-http-overlay.ts (an overlay's base identity).
import * as assert from "uvu/assert";
import { cpSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, readSync, renameSync, statSync, utimesSync, closeSync, writeFileSync, writeSync } from "node:fs";
import { join } from "node:path";
import { deadline } from "./helpers/assert.ts";
import { BUN, CLI, need, run, runOk, ROOT, scratch } from "./helpers/env.ts";
import { makeImage, whoseBlocks } from "./helpers/remote-images.ts";
import { serve, type Served } from "./helpers/server.ts";
import { checkPerClient, guardedSuite, nbdpy, PY } from "./interop-lib.ts";
import { BASIC_PASSWORD, BASIC_USER, freePort, startNginx, type Nginx } from "./services/nginx.ts";

const MiB = 1024 * 1024;
const BIG = Number(process.env.BUN_NBD_REMOTE_BIG_MIB ?? 1024) * MiB;
const dir = scratch("bun-nbd-remote-http-");
let ngx: Nginx;
let big: string, mid: string;

const { test, run: runSuite } = guardedSuite("remote over http (nginx)", async () => {
  need("nginx", "nbdcopy", "nbdinfo", "cmp");
  ngx = await startNginx();
  big = makeImage(join(ngx.root, "big.img"), BIG, 11, { dataEvery: 4 });
  mkdirSync(join(ngx.root, "medium"));
  mid = makeImage(join(ngx.root, "medium", "mid.img"), 96 * MiB + 4096, 12, { zeroEvery: 5 });
});

async function copyOk(uri: string, out: string, timeoutMs = 300_000): Promise<void> {
  await runOk(["nbdcopy", uri, out], { timeoutMs });
}
async function same(a: string, b: string): Promise<void> {
  const r = await run(["cmp", a, b], { timeoutMs: 120_000 });
  assert.is(r.code, 0, `${a} and ${b} differ: ${r.stdout}${r.stderr}`);
}
/** Wait until `cond` holds (server output arrives through a pipe, a little after the replies). */
async function waitFor(cond: () => boolean, what: string, s: Served, ms = 5000): Promise<void> {
  for (const end = Date.now() + ms; !cond(); await Bun.sleep(25)) {
    if (Date.now() > end) assert.unreachable(`${what}: not seen in ${ms} ms; server output:\n${s.output().slice(-3000)}`);
  }
}
async function stopped(s: Served): Promise<void> {
  assert.is(await s.stop(), 0, `server exit status; output:\n${s.output()}`);
}

test("nbdcopy of the big image is byte-exact; the second pass comes from the cache (no GET)", () => deadline(600_000, "big copy", async () => {
  const s = await serve(["--cache-dir", join(dir, "cache-big"), ngx.url("big.img")]);
  try {
    const t0 = Date.now();
    await copyOk(s.uri("big"), join(dir, "big1.out"));
    const cold = (Date.now() - t0) / 1000;
    const gets = ngx.rangeGets("/big.img");
    assert.ok(gets > 0 && gets <= BIG / MiB, `GETs for the first pass: ${gets}`);
    const t1 = Date.now();
    await copyOk(s.uri("big"), join(dir, "big2.out"));
    const warm = (Date.now() - t1) / 1000;
    assert.is(ngx.rangeGets("/big.img"), gets, "the second pass sends no GET");
    console.log(`  ${BIG / MiB} MiB over HTTP: cold ${cold.toFixed(1)} s, warm ${warm.toFixed(1)} s, ${gets} GETs`);
  } finally { await stopped(s); }
  await same(join(dir, "big1.out"), big);
  await same(join(dir, "big2.out"), big);
}));

test("random reads through libnbd match the local file (structured and simple replies)", () => deadline(120_000, "random reads", async () => {
  const s = await serve(["--no-cache", "--block-size", "256K", ngx.url("medium/mid.img")]);
  try {
    // large reads are answered by sendfile once their blocks are in the cache file, in both reply forms
    const o = await nbdpy(s.uri("mid"), `
import random
random.seed(7)
simple = nbd.NBD()
simple.set_request_structured_replies(False)
simple.connect_uri(uri)
size = h.get_size()
f = open(${JSON.stringify(mid)}, 'rb')
bad = []
for i in range(300):
    n = random.choice([1, 512, 4096, 65536, 300000, 2 * 1024 * 1024 + 3])
    off = random.randrange(0, size - n)
    got = (h if i % 2 else simple).pread(n, off)
    f.seek(off)
    if got != f.read(n): bad.append([off, n])
out['bad'] = bad
out['size'] = size
`, { timeoutMs: 120_000 });
    assert.equal(o.bad, []);
    assert.is(o.size, 96 * MiB + 4096);
  } finally { await stopped(s); }
}));

/**
 * Blocks a cache entry marks as held (whole or in part), checked against the image: [marked, wrong,
 * held in part].
 * The map: a 4096-byte header, a state byte per block (1 data, 2 zeros, 3 in part), then a bitmap
 * of 4 KiB pieces per block.
 */
function checkCacheEntry(cacheDir: string, image: string, blockSize: number): [number, number, number] {
  const maps = readdirSync(cacheDir).filter((n) => n.endsWith(".map"));
  assert.is(maps.length, 1, `one cache entry in ${cacheDir}: ${maps}`);
  const size = statSync(image).size, blocks = Math.ceil(size / blockSize), bitmap = blockSize / 4096 / 8;
  const file = readFileSync(join(cacheDir, maps[0]!));
  const map = file.subarray(4096, 4096 + blocks);
  const data = openSync(join(cacheDir, maps[0]!.replace(/\.map$/, ".data")), "r");
  const src = openSync(image, "r");
  const a = new Uint8Array(blockSize), b = new Uint8Array(blockSize);
  let marked = 0, wrong = 0, partial = 0;
  try {
    map.forEach((state, i) => {
      if (state === 0) return;
      marked++;
      const na = readSync(data, a, 0, blockSize, i * blockSize);
      const nb = readSync(src, b, 0, blockSize, i * blockSize);
      if (state === 2) { if (b.subarray(0, nb).some((x) => x !== 0)) wrong++; return; }
      if (state === 3) {
        partial++;
        const bits = file.subarray(4096 + blocks + i * bitmap, 4096 + blocks + (i + 1) * bitmap);
        for (let p = 0; p * 4096 < nb; p++) {
          if ((bits[p >> 3]! & (1 << (p & 7))) === 0) continue;
          const at = p * 4096, end = Math.min(nb, at + 4096);
          if (Buffer.compare(a.subarray(at, Math.min(na, end)), b.subarray(at, end)) !== 0) { wrong++; return; }
        }
        return;
      }
      if (na !== nb || Buffer.compare(a.subarray(0, na), b.subarray(0, nb)) !== 0) wrong++;
    });
  } finally { closeSync(data); closeSync(src); }
  return [marked, wrong, partial];
}

test("kill -9 while the cache fills: every block it marks is right, and a restart reuses them", () => deadline(180_000, "kill -9", async () => {
  const cache = join(dir, "cache-kill");
  const url = ngx.url("medium/mid.img");
  let s = await serve(["--cache-dir", cache, url]);
  const before = ngx.rangeGets("/medium/mid.img");
  const copy = run(["nbdcopy", s.uri("mid"), join(dir, "mid-killed.out")], { timeoutMs: 120_000 });
  for (let i = 0; i < 500 && ngx.rangeGets("/medium/mid.img") - before < 12; i++) await Bun.sleep(20);
  s.proc.kill("SIGKILL");
  await s.proc.exited;
  const r = await copy;
  assert.ok(r.code !== 0, "the copy cannot finish once the server is killed");
  const [marked, wrong] = checkCacheEntry(cache, mid, 1024 * 1024);
  assert.is(wrong, 0, `${wrong} of ${marked} marked blocks hold wrong bytes`);
  assert.ok(marked > 0, "some blocks were cached before the kill");
  const total = Math.ceil((96 * MiB + 4096) / MiB);
  assert.ok(marked < total, `the kill came before the end (${marked} of ${total} blocks)`);
  s = await serve(["--cache-dir", cache, url]);
  const mark = ngx.rangeGets("/medium/mid.img");
  try {
    await copyOk(s.uri("mid"), join(dir, "mid-after.out"), 120_000);
  } finally { await stopped(s); }
  await same(join(dir, "mid-after.out"), mid);
  const refetched = ngx.rangeGets("/medium/mid.img") - mark;
  assert.ok(refetched <= total - marked, `after the restart ${refetched} GETs for ${total - marked} missing blocks`);
  assert.equal(checkCacheEntry(cache, mid, 1024 * 1024).slice(0, 2), [total, 0]);
}));

test("kill -9 during random small reads: every piece it marks is right; after a restart they are served without a GET", () => deadline(180_000, "kill -9 pieces", async () => {
  const cache = join(dir, "cache-kill-pieces");
  const url = ngx.url("medium/mid.img");
  // 4 KiB reads at random offsets, 16 in flight: fetched and cached as 4 KiB pieces
  const reads = (uri: string, n: number) => `
import nbd, random
random.seed(11)
h = nbd.NBD()
h.connect_uri(${JSON.stringify(uri)})
size = h.get_size()
f = open(${JSON.stringify(mid)}, 'rb')
offs = [random.randrange(0, size // 4096) * 4096 + random.choice([0, 512, 1000]) for i in range(${n})]
bufs = {}
bad = 0
for i, off in enumerate(offs):
    while h.aio_in_flight() >= 16:
        h.poll(-1)
    b = nbd.Buffer(4096)
    c = h.aio_pread(b, off)
    bufs[c] = (b, off)
    for c in [c for c in bufs if h.aio_command_completed(c)]:
        b, o = bufs.pop(c)
        f.seek(o)
        if b.to_bytearray() != f.read(4096): bad += 1
while h.aio_in_flight() > 0:
    h.poll(-1)
for c, (b, o) in bufs.items():
    f.seek(o)
    if b.to_bytearray() != f.read(4096): bad += 1
print("bad", bad)
`;
  let s = await serve(["--cache-dir", cache, "--small-reads", "pieces", url]);
  const before = ngx.rangeGets("/medium/mid.img");
  const pending = run([PY, "-c", reads(s.uri("mid"), 20000)], { timeoutMs: 120_000 });
  for (let i = 0; i < 500 && ngx.rangeGets("/medium/mid.img") - before < 300; i++) await Bun.sleep(20);
  s.proc.kill("SIGKILL");
  await s.proc.exited;
  assert.ok((await pending).code !== 0, "the reads cannot finish once the server is killed");
  const [marked, wrong, partial] = checkCacheEntry(cache, mid, 1024 * 1024);
  assert.is(wrong, 0, `${wrong} of ${marked} marked blocks hold wrong bytes in marked pieces`);
  assert.ok(partial > 10, `blocks held in part before the kill: ${partial}`);
  s = await serve(["--cache-dir", cache, "--small-reads", "pieces", url]);
  try {
    const mark = ngx.rangeGets("/medium/mid.img");
    const r = await run([PY, "-c", reads(s.uri("mid"), 200)], { timeoutMs: 120_000 });
    assert.is(r.code, 0, r.stderr);
    assert.match(r.stdout, /bad 0/);
    // the same first 200 reads: those whose pieces were marked before the kill send no GET
    assert.ok(ngx.rangeGets("/medium/mid.img") - mark < 200, `${ngx.rangeGets("/medium/mid.img") - mark} GETs for 200 reads after the restart`);
  } finally { await stopped(s); }
  assert.is(checkCacheEntry(cache, mid, 1024 * 1024)[1], 0);
}));

test("nginx stopped mid-copy: EIO for the reads it hits, the server survives, the next copy is exact", () => deadline(180_000, "store down", async () => {
  const s = await serve(["--no-cache", "--remote-deadline", "2", ngx.url("medium/mid.img")]);
  try {
    const before = ngx.rangeGets("/medium/mid.img");
    const copy = run(["nbdcopy", s.uri("mid"), join(dir, "mid-down.out")], { timeoutMs: 120_000 });
    for (let i = 0; i < 500 && ngx.rangeGets("/medium/mid.img") - before < 6; i++) await Bun.sleep(20);
    await ngx.stop(true);
    const r = await copy;
    assert.ok(r.code !== 0, "nbdcopy fails while nginx is down");
    assert.match(r.stderr, /Input\/output error|EIO/i);
    assert.is(s.proc.exitCode, null, "the server is still running");
    await waitFor(() => /gave up after \d+ attempts?/.test(s.output()), "the server logs the EIO", s);
    const info = await run(["nbdinfo", "--size", s.uri("mid")]);
    assert.is(info.stdout.trim(), String(96 * MiB + 4096), "the server still answers");
    await ngx.start();
    await copyOk(s.uri("mid"), join(dir, "mid-up.out"), 120_000);
    await waitFor(() => /answers again/.test(s.output()), "the server logs the recovery", s);
  } finally {
    if (!ngx.running()) await ngx.start();
    await stopped(s);
  }
  await same(join(dir, "mid-up.out"), mid);
}));

test("an image replaced while served: EIO and a log line, never bytes of the new version", () => deadline(120_000, "replaced", async () => {
  const path = makeImage(join(ngx.root, "swap.img"), 16 * MiB, 21);
  const oldBytes = join(dir, "swap.old");
  cpSync(path, oldBytes);
  const s = await serve(["--no-cache", "--readahead", "0", "--small-reads", "pieces", ngx.url("swap.img")]);
  try {
    await nbdpy(s.uri("swap"), "h.pread(4 * 1024 * 1024, 0)"); // blocks 0-3 cached
    const next = makeImage(join(ngx.root, "swap.next"), 16 * MiB, 22);
    utimesSync(next, new Date(), new Date(Date.now() + 10_000));
    renameSync(next, path);
    const res = await whoseBlocks(s.uri("swap"), oldBytes, path, 16);
    // blocks 0-3 were read before the swap; of the last one, sniffing at open cached only the
    // 4 KiB pieces of its tail, so reading all of it needs the object
    assert.equal(res, [...Array(4).fill("old"), ...Array(12).fill("EIO")]);
    await waitFor(() => /swap\.img changed since it was opened/.test(s.output()), "the server logs the change", s);
  } finally { await stopped(s); }
}));

test("a CUE sheet over HTTP: BINs found next to it, exports equal to serving the files locally", () => deadline(120_000, "cue", async () => {
  const cds = join(ngx.root, "cds");
  mkdirSync(cds);
  const local = join(ROOT, "test/fixtures/cd/split");
  for (const f of readdirSync(local)) cpSync(join(local, f), join(cds, f));
  const remote = await serve(["--no-cache", ngx.url("cds/mixed.cue")]);
  const here = await serve([join(local, "mixed.cue")]);
  try {
    const names = (s: Served) => run(["nbdinfo", "--list", "--json", s.uri()]).then((r) => (JSON.parse(r.stdout).exports as { "export-name": string }[]).map((e) => e["export-name"]).sort());
    const want = await names(here);
    assert.equal(await names(remote), want);
    assert.ok(want.includes("mixed/t02.raw"), want.join(" "));
    for (const n of want) {
      await copyOk(remote.uri(n), join(dir, `cd-r-${n.replace(/\//g, "_")}`));
      await copyOk(here.uri(n), join(dir, `cd-l-${n.replace(/\//g, "_")}`));
      await same(join(dir, `cd-r-${n.replace(/\//g, "_")}`), join(dir, `cd-l-${n.replace(/\//g, "_")}`));
    }
  } finally { await stopped(remote); await stopped(here); }
  // a throw-away overlay over the remote disc's cooked view takes writes
  const snap = await serve(["--snapshot", "--no-cache", ngx.url("cds/mixed.cue")]);
  try {
    const o = await nbdpy(snap.uri("mixed"), "h.pwrite(b'\\x42' * 4096, 8192)\nout['back'] = h.pread(4096, 8192) == b'\\x42' * 4096\nout['ro'] = h.is_read_only()");
    assert.equal(o, { back: true, ro: false });
  } finally { await stopped(snap); }
}));

test("remote ISO and fixed VHD are sniffed and served like the local files; a remote qcow2 is refused by name", () => deadline(120_000, "kinds", async () => {
  need("qemu-img");
  const raw = makeImage(join(dir, "kinds.raw"), 8 * MiB, 51);
  await runOk(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size=on", raw, join(ngx.root, "fixed.vhd")]);
  const iso = makeImage(join(ngx.root, "disc.iso"), 4 * MiB, 52);
  const fd = openSync(iso, "r+"); // a primary volume descriptor at sector 16 makes it an ISO
  writeSync(fd, Buffer.from("\x01CD001\x01"), 0, 7, 16 * 2048);
  closeSync(fd);
  await runOk(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, join(ngx.root, "kinds.qcow2")]);
  for (const [file, name] of [["fixed.vhd", "fixed"], ["disc.iso", "disc"]] as const) {
    const remote = await serve(["--no-cache", ngx.url(file)]);
    const here = await serve(["-r", join(ngx.root, file)]);
    try {
      const list = await runOk(["nbdinfo", "--list", remote.uri()]);
      assert.match(list.stdout, file === "fixed.vhd" ? /fixed VHD/ : /CD image/);
      await copyOk(remote.uri(name), join(dir, `${name}-r.out`));
      await copyOk(here.uri(name), join(dir, `${name}-l.out`));
    } finally { await stopped(remote); await stopped(here); }
    await same(join(dir, `${name}-r.out`), join(dir, `${name}-l.out`));
  }
  await same(join(dir, "fixed-r.out"), raw);
  const r = await run([BUN, CLI, "serve", "-p", "0", "--no-cache", ngx.url("kinds.qcow2")], { timeoutMs: 30_000 });
  assert.is(r.code, 1);
  assert.match(r.stderr, /kinds\.qcow2 is a qcow2 image: .*cannot be served from a remote store yet/);
}));

test("credentials in the URL are used but never printed, listed or logged", () => deadline(60_000, "credentials", async () => {
  mkdirSync(join(ngx.root, "private"), { recursive: true });
  cpSync(mid, join(ngx.root, "private", "p.img"));
  const url = ngx.url("private/p.img").replace("http://", `http://${BASIC_USER}:${BASIC_PASSWORD}@`);
  const s = await serve(["-v", "--no-cache", url]);
  try {
    const list = await runOk(["nbdinfo", "--list", s.uri()]);
    assert.ok(list.stdout.includes("/private/p.img"), list.stdout);
    await copyOk(s.uri("p"), join(dir, "p.out"));
  } finally { await stopped(s); }
  await same(join(dir, "p.out"), mid);
  for (const secret of [BASIC_PASSWORD, `${BASIC_USER}:`]) assert.not.ok(s.output().includes(secret), `server output shows ${secret}`);
}));

test("errors at start name the URL and the status; nothing is served", () => deadline(60_000, "start errors", async () => {
  let r = await run([BUN, CLI, "serve", "-p", "0", "--no-cache", ngx.url("nothing-here.img")]);
  assert.is(r.code, 1);
  assert.match(r.stderr, new RegExp(`${ngx.url("nothing-here.img").replace(/\./g, "\\.")}: HTTP 404 Not Found`));
  const port = await freePort();
  r = await run([BUN, CLI, "serve", "-p", "0", "--no-cache", `http://127.0.0.1:${port}/disk.img`]);
  assert.is(r.code, 1);
  assert.match(r.stderr, /cannot reach http:\/\/127\.0\.0\.1:\d+\/disk\.img: connection refused/);
  r = await run([BUN, CLI, "serve", "-p", "0", "--block-size", "3M", ngx.url("big.img")]);
  assert.is(r.code, 1);
  assert.match(r.stderr, /block size \d+: must be a power of two/);
  assert.not.ok(existsSync(join(dir, "never")));
}));

test("a config file names a remote base: served as is and as per-client overlays that keep their writes", () => deadline(120_000, "config", async () => {
  const ov = join(dir, "pc-overlays");
  mkdirSync(ov, { recursive: true });
  const conf = join(dir, "remote.toml");
  writeFileSync(conf, `[[export]]\nname = "mid"\nfile = "${ngx.url("medium/mid.img")}"\n\n` +
    `[[export]]\nname = "farm"\nfile = "${ngx.url("medium/mid.img")}"\noverlay = "per-client"\noverlay-dir = "${ov}"\n`);
  const s = await serve(["--config", conf, "--no-cache"]);
  try {
    await copyOk(s.uri("mid"), join(dir, "mid-conf.out"));
    await checkPerClient(s, "farm", mid);
  } finally { await stopped(s); }
  await same(join(dir, "mid-conf.out"), mid);
  assert.ok(existsSync(join(ov, "farm@vm1.qcow2")), "the client's overlay is on disk");
}));

runSuite();
