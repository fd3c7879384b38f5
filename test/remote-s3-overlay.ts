// Overlays over S3 objects against a real Ceph RGW (test/helpers/remote-s3.ts): QEMU boots
// examples/boot.img from a bucket through --snapshot; two bun-nbd processes on one bucket serve two
// clients (QEMU guests) with separate overlays; publish uploads an overlay merged with its base;
// a persistent overlay refuses a replaced object and overlay commit refuses a remote base.
import * as assert from "uvu/assert";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { bytesEqual } from "./helpers/assert.ts";
import { BUN, CLI, ROOT, run, runOk, scratch } from "./helpers/env.ts";
import { BUCKET, MiB, s3Suite, same, stopped } from "./helpers/remote-s3.ts";
import { makeImage } from "./helpers/remote-images.ts";
import { serve } from "./helpers/server.ts";
import { boot, fileBytes } from "./e2e/boot.ts";
import { expectedWrittenSector, hdExpectations } from "./e2e/images.ts";
import { nbdRead, nbdWrite } from "./e2e/nbdhost.ts";

const dir = scratch("bun-nbd-remote-s3-overlay-");
let mid = "";

const { s3test, run: runSuite } = s3Suite("remote over S3: overlays (Ceph RGW)", async (g) => {
  mid = makeImage(join(dir, "mid.img"), 48 * MiB + 2352, 32, { zeroEvery: 5 });
  await g.putFile(BUCKET, "golden/mid.img", mid);
  await g.putFile(BUCKET, "golden/boot.img", join(ROOT, "examples/boot.img"));
});

s3test("QEMU boots examples/boot.img from an S3 object through --snapshot; the object stays as it was", 120_000, async (g) => {
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
  // its own object and overlay (with a write in it), so that it does not depend on the tests above
  const url = `s3://${BUCKET}/refuse/base.img`, ov = join(dir, "refuse.qcow2");
  await g.putFile(BUCKET, "refuse/base.img", makeImage(join(dir, "refuse-v1.img"), 4 * MiB, 51));
  await runOk([BUN, CLI, "overlay", "create", ov, url], { env: g.env });
  const s = await serve(["--overlay", ov, "--no-cache", url], { env: g.env });
  try { await nbdWrite(s.uri("base"), 4096, new Uint8Array(4096).fill(0x3c)); } finally { await stopped(s); }
  const r0 = await run([BUN, CLI, "overlay", "commit", ov], { env: g.env });
  assert.is(r0.code, 1);
  assert.match(r0.stderr, /refusing to commit .*refuse\.qcow2: its base is the remote object s3 s3:\/\/images\/refuse\/base\.img/);
  assert.match(r0.stderr, /bun-nbd publish/);
  // the same object still opens (the refusal below is the new version's doing, not the overlay's)
  const again = await serve(["--overlay", ov, "--no-cache", url], { env: g.env });
  try {
    bytesEqual(await nbdRead(again.uri("base"), 4096, 4096), new Uint8Array(4096).fill(0x3c), "the overlay's write over its base");
  } finally { await stopped(again); }
  await g.putFile(BUCKET, "refuse/base.img", makeImage(join(dir, "refuse-v2.img"), 4 * MiB, 52)); // another version, same size
  const r = await run([BUN, CLI, "serve", "-p", "0", "--no-cache", "--overlay", ov, url], { env: g.env });
  assert.is(r.code, 1);
  assert.match(r.stderr, /refuse\.qcow2: its base differs \(version\): it was made over s3 s3:\/\/images\/refuse\/base\.img/);
});

runSuite();
