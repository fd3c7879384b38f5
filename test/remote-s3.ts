// `bun-nbd serve s3://bucket/key` end to end against a real Ceph RGW (started by this file with
// our copy of the recipe; skipped, saying why, only where the Ceph packages cannot be installed):
// a byte-exact nbdcopy of a big object and a second pass served from the cache (RGW's ops log
// counts the GETs), clear errors at start (bad secret, no such key or bucket, store down),
// credentials kept out of output and LIST, RGW stopped mid-copy (EIO, the server survives, the
// next copy is exact), an object replaced while served (EIO, a log line, never bytes of the new
// version) and a CUE sheet whose BINs are found relative to its key. Overlays: QEMU boots
// examples/boot.img from a bucket through --snapshot; two bun-nbd processes on one bucket serve two
// clients (QEMU guests) with separate overlays; publish uploads an overlay merged with its base;
// a persistent overlay refuses a replaced object and overlay commit refuses a remote base.
// BUN_NBD_REMOTE_S3_MIB sets the big object's size: 256 MiB by default, so that CI does not spend a
// minute uploading; BUN_NBD_REMOTE_S3_MIB=1024 runs the 1 GiB copy the issue asks for.
import * as assert from "uvu/assert";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { bytesEqual, deadline, rejects } from "./helpers/assert.ts";
import { openRemoteImage } from "../src/devices/remote/index.ts";
import { BUN, CLI, need, ROOT, run, runOk, scratch } from "./helpers/env.ts";
import { makeImage, whoseBlocks } from "./helpers/remote-images.ts";
import { serve, type Served } from "./helpers/server.ts";
import { guardedSuite, nbdpy } from "./interop-lib.ts";
import { ACCESS_KEY, SECRET_KEY, startRgw, type Rgw } from "./services/rgw.ts";
import { boot, fileBytes } from "./e2e/boot.ts";
import { expectedWrittenSector, hdExpectations } from "./e2e/images.ts";
import { nbdRead, nbdWrite } from "./e2e/nbdhost.ts";

const MiB = 1024 * 1024;
const BIG = Number(process.env.BUN_NBD_REMOTE_S3_MIB ?? 256) * MiB;
const BUCKET = "images";
const dir = scratch("bun-nbd-remote-s3-");
let rgw: Rgw | null = null;
let big = "", mid = "";

const { test, run: runSuite } = guardedSuite("remote over S3 (Ceph RGW)", async () => {
  need("nbdcopy", "nbdinfo", "cmp", "curl");
  rgw = await startRgw();
  if (rgw === null) return;
  await rgw.createBucket(BUCKET);
  big = makeImage(join(dir, "big.img"), BIG, 31, { dataEvery: 4 });
  mid = makeImage(join(dir, "mid.img"), 48 * MiB + 2352, 32, { zeroEvery: 5 });
  const t0 = Date.now();
  await rgw.putFile(BUCKET, "golden/big.img", big);
  await rgw.putFile(BUCKET, "golden/mid.img", mid);
  console.log(`  RGW up at ${rgw.endpoint}; uploaded ${((BIG + 48 * MiB) / MiB).toFixed(0)} MiB in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
});

/** A test that needs the store: skipped (with the reason printed once at setup) when there is none. */
const s3test = (name: string, ms: number, fn: (rgw: Rgw) => Promise<void>) =>
  test(name, () => rgw === null ? Promise.resolve() : deadline(ms, name, () => fn(rgw!)));

const getsOf = (g: Rgw, key: string) => g.ops().filter((o) => o.op === "get_obj" && o.status === "206" && o.uri.startsWith(`GET /${BUCKET}/${key}?`)).length;
async function same(a: string, b: string): Promise<void> {
  const r = await run(["cmp", a, b], { timeoutMs: 120_000 });
  assert.is(r.code, 0, `${a} and ${b} differ: ${r.stdout}${r.stderr}`);
}
async function stopped(s: Served): Promise<void> {
  assert.is(await s.stop(), 0, `server exit status; output:\n${s.output()}`);
}
async function waitFor(cond: () => boolean, what: string, s: Served, ms = 5000): Promise<void> {
  for (const end = Date.now() + ms; !cond(); await Bun.sleep(25)) {
    if (Date.now() > end) assert.unreachable(`${what}: not seen in ${ms} ms; server output:\n${s.output().slice(-3000)}`);
  }
}

/** `count()` once it has stopped changing for a second (RGW writes its ops log after the responses, later under load). */
async function settled(count: () => number, ms = 20_000): Promise<number> {
  let last = count();
  for (const end = Date.now() + ms; Date.now() < end;) {
    await Bun.sleep(1000);
    const now = count();
    if (now === last) return now;
    last = now;
  }
  return last;
}

s3test("nbdcopy of the big object is byte-exact; the second pass comes from the cache (no GET in the ops log)", 900_000, async (g) => {
  const s = await serve(["-v", "--cache-dir", join(dir, "cache-big"), `s3://${BUCKET}/golden/big.img`], { env: g.env });
  try {
    const t0 = Date.now();
    await runOk(["nbdcopy", s.uri("big"), join(dir, "big1.out")], { timeoutMs: 600_000 });
    const cold = (Date.now() - t0) / 1000;
    // the ops log is written after the responses, later under load: count once it stops growing
    const gets = await settled(() => getsOf(g, "golden/big.img"));
    assert.ok(gets > 0, "GETs in the ops log");
    const t1 = Date.now();
    await runOk(["nbdcopy", s.uri("big"), join(dir, "big2.out")], { timeoutMs: 600_000 });
    const warm = (Date.now() - t1) / 1000;
    assert.is(await settled(() => getsOf(g, "golden/big.img")), gets, "no GET for the second pass");
    console.log(`  ${BIG / MiB} MiB over S3: cold ${cold.toFixed(1)} s, warm ${warm.toFixed(1)} s, ${gets} GETs`);
  } finally { await stopped(s); }
  await same(join(dir, "big1.out"), big);
  await same(join(dir, "big2.out"), big);
  const out = s.output();
  for (const secret of [SECRET_KEY, ACCESS_KEY, "X-Amz-Signature"]) assert.not.ok(out.includes(secret), `server output shows ${secret}`);
});

s3test("edges (where S3File slices go wrong): the last byte, a partial last block, a 1-byte object, an empty one", 60_000, async (g) => {
  const c = g.client(BUCKET);
  const odd = makeImage(join(dir, "odd.img"), 3 * MiB + 7, 33);
  await g.putFile(BUCKET, "edge/odd.img", odd);
  await c.write("edge/one.img", new Uint8Array([0x7f]));
  await c.write("edge/empty.img", new Uint8Array(0));
  const s3 = { endpoint: g.endpoint, accessKeyId: ACCESS_KEY, secretAccessKey: SECRET_KEY };
  const opts = { cacheDir: null, blockSize: 64 * 1024, s3 };
  const want = readFileSync(odd);
  const d = await openRemoteImage(`s3://${BUCKET}/edge/odd.img`, opts, () => {});
  try {
    assert.is(d.size(), 3 * MiB + 7);
    for (const [off, len] of [[3 * MiB + 6, 1], [3 * MiB, 7], [3 * MiB - 70_000, 70_007], [0, 1], [65535, 2], [0, 3 * MiB + 7]] as const) {
      const b = new Uint8Array(len);
      await d.pread(b, off, 0);
      bytesEqual(b, want.subarray(off, off + len), `[${off}, +${len})`);
    }
  } finally { d.close(); }
  const one = await openRemoteImage(`s3://${BUCKET}/edge/one.img`, opts, () => {});
  try {
    const b = new Uint8Array(1);
    await one.pread(b, 0, 0);
    assert.equal([one.size(), b[0]], [1, 0x7f]);
  } finally { one.close(); }
  const e = await rejects(() => openRemoteImage(`s3://${BUCKET}/edge/empty.img`, opts, () => {}), "an empty object");
  assert.match(e.message, /s3:\/\/images\/edge\/empty\.img is empty/);
});

s3test("credentials never appear in LIST or in the server's output", 60_000, async (g) => {
  const s = await serve(["-v", "--no-cache", `s3://${BUCKET}/golden/mid.img`], { env: g.env });
  let list;
  try {
    list = await runOk(["nbdinfo", "--list", s.uri()]);
    await nbdpy(s.uri("mid"), "h.pread(65536, 0)");
  } finally { await stopped(s); }
  assert.ok(list.stdout.includes(`s3://${BUCKET}/golden/mid.img`), list.stdout);
  for (const text of [list.stdout, s.output()]) {
    for (const secret of [SECRET_KEY, ACCESS_KEY, "X-Amz-"]) assert.not.ok(text.includes(secret), `${secret} shown:\n${text}`);
  }
});

s3test("errors at start name the object and the status", 60_000, async (g) => {
  const attempt = (url: string, env: Record<string, string>) => run([BUN, CLI, "serve", "-p", "0", "--no-cache", url], { env: { ...g.env, ...env } });
  let r = await attempt(`s3://${BUCKET}/golden/mid.img`, { AWS_SECRET_ACCESS_KEY: "wrong-secret" });
  assert.is(r.code, 1);
  assert.match(r.stderr, new RegExp(`s3://${BUCKET}/golden/mid\\.img: HTTP 403 Forbidden \\(SignatureDoesNotMatch\\)`));
  assert.not.ok(r.stderr.includes("wrong-secret"));
  r = await attempt(`s3://${BUCKET}/golden/none.img`, {});
  assert.match(r.stderr, /s3:\/\/images\/golden\/none\.img: HTTP 404 Not Found \(NoSuchKey\)/);
  r = await attempt("s3://no-such-bucket/x.img", {});
  assert.match(r.stderr, /s3:\/\/no-such-bucket\/x\.img: HTTP 404 Not Found \(NoSuchBucket\)/);
  r = await attempt(`s3://${BUCKET}/golden/mid.img`, { AWS_ENDPOINT_URL: "http://127.0.0.1:9" });
  assert.match(r.stderr, /cannot reach s3:\/\/images\/golden\/mid\.img: connection refused/);
});

s3test("RGW stopped mid-copy: EIO for the reads it hits, the server survives, the next copy is exact", 180_000, async (g) => {
  const s = await serve(["--no-cache", "--remote-deadline", "2", "--block-size", "64K", "--readahead", "0", "--remote-connections", "1", `s3://${BUCKET}/golden/mid.img`], { env: g.env });
  try {
    const before = getsOf(g, "golden/mid.img");
    const copy = run(["nbdcopy", s.uri("mid"), join(dir, "down.out")], { timeoutMs: 120_000 });
    for (let i = 0; i < 500 && getsOf(g, "golden/mid.img") - before < 4; i++) await Bun.sleep(20);
    await g.stopGateway();
    const r = await copy;
    assert.ok(r.code !== 0, "nbdcopy fails while RGW is down");
    assert.match(r.stderr, /Input\/output error/);
    assert.is(s.proc.exitCode, null, "the server is still running");
    await waitFor(() => /gave up after \d+ attempts?/.test(s.output()), "the server logs the EIO", s);
    await g.startGateway();
    await runOk(["nbdcopy", s.uri("mid"), join(dir, "up.out")], { timeoutMs: 600_000 });
    await waitFor(() => /answers again/.test(s.output()), "the server logs the recovery", s);
  } finally { await stopped(s); }
  await same(join(dir, "up.out"), mid);
});

s3test("an object replaced while served: EIO and a log line, never bytes of the new version", 120_000, async (g) => {
  const v1 = makeImage(join(dir, "swap1.img"), 8 * MiB, 41), v2 = makeImage(join(dir, "swap2.img"), 8 * MiB, 42);
  await g.putFile(BUCKET, "golden/swap.img", v1);
  const s = await serve(["--no-cache", "--readahead", "0", "--small-reads", "blocks", `s3://${BUCKET}/golden/swap.img`], { env: g.env });
  try {
    await nbdpy(s.uri("swap"), "h.pread(2 * 1024 * 1024, 0)");
    await g.putFile(BUCKET, "golden/swap.img", v2);
    const res = await whoseBlocks(s.uri("swap"), v1, v2, 8);
    assert.equal(res, ["old", "old", ...Array(5).fill("EIO"), "old"]); // the last block was read whole at open (its tail)
    await waitFor(() => /s3:\/\/images\/golden\/swap\.img changed since it was opened/.test(s.output()), "the change is logged", s);
  } finally { await stopped(s); }
});

s3test("a CUE sheet in a bucket: its BINs are found relative to its key", 120_000, async (g) => {
  const local = join(ROOT, "test/fixtures/cd/split");
  for (const f of readdirSync(local)) await g.putFile(BUCKET, `cds/split/${f}`, join(local, f));
  const remote = await serve(["--no-cache", `s3://${BUCKET}/cds/split/mixed.cue`], { env: g.env });
  const here = await serve([join(local, "mixed.cue")]);
  try {
    for (const n of ["mixed", "mixed/t01", "mixed/t02.raw", "mixed/t03.raw", "mixed/raw"]) {
      const a = join(dir, `cue-r-${n.replace(/\//g, "_")}`), b = join(dir, `cue-l-${n.replace(/\//g, "_")}`);
      await runOk(["nbdcopy", remote.uri(n), a]);
      await runOk(["nbdcopy", here.uri(n), b]);
      await same(a, b);
    }
  } finally { await stopped(remote); await stopped(here); }
});

s3test("QEMU boots examples/boot.img from an S3 object through --snapshot; the object stays as it was", 120_000, async (g) => {
  await g.putFile(BUCKET, "golden/boot.img", join(ROOT, "examples/boot.img"));
  const before = await g.client(BUCKET).stat("golden/boot.img");
  const want = hdExpectations(4 * MiB);
  const s = await serve(["--snapshot", "--cache-dir", join(dir, "cache-boot"), `s3://${BUCKET}/golden/boot.img`], { env: g.env });
  try {
    const { problems } = await boot("ide", s.uri("boot"), want.expect, join(dir, "log-boot"));
    assert.ok(problems.length === 0, problems.join("\n"));
    bytesEqual(await nbdRead(s.uri("boot"), want.writeLba * 512, 512), expectedWrittenSector(), "the written sector over a fresh connection");
  } finally { await stopped(s); }
  const after = await g.client(BUCKET).stat("golden/boot.img");
  assert.equal([after.etag, after.size], [before.etag, before.size], "the object is unchanged");
});

const A = new Uint8Array(4096).fill(0xaa), B = new Uint8Array(4096).fill(0xbb);
const ovA = join(dir, "host-a.qcow2"), ovB = join(dir, "host-b.qcow2");

s3test("two bun-nbd processes on one bucket serve two clients, each writing to its own overlay", 180_000, async (g) => {
  const url = `s3://${BUCKET}/golden/boot.img`;
  const a = await serve(["--overlay", ovA, "--cache-dir", join(dir, "cache-a"), url], { env: g.env });
  const b = await serve(["--overlay", ovB, "--cache-dir", join(dir, "cache-b"), url], { env: g.env });
  const want = hdExpectations(4 * MiB);
  try {
    const [ra, rb] = await Promise.all([
      boot("virtio", a.uri("boot"), want.expect, join(dir, "log-a")),
      boot("ide", b.uri("boot"), want.expect, join(dir, "log-b")),
    ]);
    assert.ok(ra.problems.length === 0 && rb.problems.length === 0, [...ra.problems, ...rb.problems].join("\n"));
    await nbdWrite(a.uri("boot"), 100 * 512, A);
    await nbdWrite(b.uri("boot"), 100 * 512, B);
    bytesEqual(await nbdRead(a.uri("boot"), 100 * 512, 4096), A, "host A reads its own write");
    bytesEqual(await nbdRead(b.uri("boot"), 100 * 512, 4096), B, "host B reads its own write");
  } finally { await stopped(a); await stopped(b); }
  const plain = await serve(["--no-cache", url], { env: g.env });
  try {
    bytesEqual(await nbdRead(plain.uri("boot"), 100 * 512, 4096), fileBytes(join(ROOT, "examples/boot.img"), 100 * 512, 4096), "the object itself is untouched");
  } finally { await stopped(plain); }
  const again = await serve(["--overlay", ovA, "--cache-dir", join(dir, "cache-a"), url], { env: g.env });
  try {
    bytesEqual(await nbdRead(again.uri("boot"), 100 * 512, 4096), A, "host A's overlay after a restart");
  } finally { await stopped(again); }
});

s3test("publish uploads an overlay merged with its base as a new object (multipart, progress)", 180_000, async (g) => {
  const dest = `s3://${BUCKET}/published/boot-a.img`;
  // under script(1), so that stderr is a terminal and the progress bar is drawn
  const cmd = [BUN, CLI, "publish", "--part-size", "5M", ovA, dest].map((a) => `'${a}'`).join(" ");
  const r = await run(["script", "-qec", cmd, "/dev/null"], { env: g.env, timeoutMs: 120_000 });
  assert.is(r.code, 0, r.stdout);
  assert.match(r.stdout, /uploading \[#+\] 100% 4 MiB \/ 4 MiB/);
  assert.match(r.stdout, /published s3:\/\/images\/published\/boot-a\.img: 4194304 bytes in 1 part in/);
  const pub = await serve(["--no-cache", dest], { env: g.env });
  const ov = await serve(["-r", "--no-cache", "--overlay", ovA, `s3://${BUCKET}/golden/boot.img`], { env: g.env });
  try {
    await runOk(["nbdcopy", pub.uri("boot-a"), join(dir, "published.out")]);
    await runOk(["nbdcopy", ov.uri("boot"), join(dir, "overlay-view.out")]);
  } finally { await stopped(pub); await stopped(ov); }
  await same(join(dir, "published.out"), join(dir, "overlay-view.out"));
  bytesEqual(fileBytes(join(dir, "published.out"), 100 * 512, 4096), A, "host A's write is in the published object");
  const again = await run([BUN, CLI, "publish", "-q", ovA, dest], { env: g.env });
  assert.is(again.code, 1);
  assert.match(again.stderr, /exists; publish never replaces an object unless given --force/);
});

s3test("overlay create over an S3 object, then publish in several parts: the new object is the base with the writes", 180_000, async (g) => {
  const ov = join(dir, "mid.qcow2");
  await runOk([BUN, CLI, "overlay", "create", ov, `s3://${BUCKET}/golden/mid.img`], { env: g.env });
  const s = await serve(["--overlay", ov, "--no-cache", `s3://${BUCKET}/golden/mid.img`], { env: g.env });
  const patch = new Uint8Array(3 * MiB).fill(0x5c);
  try { await nbdWrite(s.uri("mid"), 20 * MiB + 512, patch); } finally { await stopped(s); }
  const r = await run([BUN, CLI, "publish", "-q", "--part-size", "8M", ov, `s3://${BUCKET}/published/mid.img`], { env: g.env, timeoutMs: 120_000 });
  assert.is(r.code, 0, r.stderr);
  const size = Math.ceil((48 * MiB + 2352) / 512) * 512; // an overlay's size is the base's, rounded up to whole sectors
  assert.match(r.stdout, new RegExp(`published s3://images/published/mid\\.img: ${size} bytes in 7 parts`));
  // S3's ETag of a multipart object ends in "-<parts>" (RGW's ops log, tried before, drops entries)
  const st = await g.client(BUCKET).stat("published/mid.img");
  assert.match(String(st.etag), /-7"?$/, `an object uploaded in 7 parts (its ETag: ${st.etag})`);
  assert.is(st.size, size);
  const expected = new Uint8Array(size);
  expected.set(readFileSync(mid));
  expected.set(patch, 20 * MiB + 512);
  const pub = await serve(["--no-cache", `s3://${BUCKET}/published/mid.img`], { env: g.env });
  try { await runOk(["nbdcopy", pub.uri("mid"), join(dir, "pub-mid.out")]); } finally { await stopped(pub); }
  bytesEqual(readFileSync(join(dir, "pub-mid.out")), expected, "the published object");
});

s3test("a persistent overlay refuses a replaced base; overlay commit refuses a remote base", 60_000, async (g) => {
  const r0 = await run([BUN, CLI, "overlay", "commit", ovB], { env: g.env });
  assert.is(r0.code, 1);
  assert.match(r0.stderr, /refusing to commit .*host-b\.qcow2: its base is the remote object s3 s3:\/\/images\/golden\/boot\.img/);
  assert.match(r0.stderr, /bun-nbd publish/);
  await g.putFile(BUCKET, "golden/boot.img", join(dir, "published.out")); // another version of the object
  const r = await run([BUN, CLI, "serve", "-p", "0", "--no-cache", "--overlay", ovB, `s3://${BUCKET}/golden/boot.img`], { env: g.env });
  assert.is(r.code, 1);
  assert.match(r.stderr, /host-b\.qcow2: its base differs \(version\): it was made over s3 s3:\/\/images\/golden\/boot\.img/);
});

test("stop the store", async () => { await rgw?.stop(); });

runSuite();
