// Compressed images in an S3 bucket (a real Ceph RGW): a multi-block .xz and a deflated zip member
// named as s3://BUCKET/ARCHIVE.zip/MEMBER, made by the real xz and zip tools, copied byte-exact
// through NBD; a small read of the .xz costs RGW about one block's compressed bytes (its counters).
import * as assert from "uvu/assert";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { bytesEqual } from "./helpers/assert.ts";
import { need, runOk, scratch } from "./helpers/env.ts";
import { fillPattern } from "./helpers/remote-images.ts";
import { BUCKET, MiB, s3Suite, stopped } from "./helpers/remote-s3.ts";
import { serve } from "./helpers/server.ts";
import { nbdpy } from "./interop-lib.ts";

const SIZE = 32 * MiB;
const dir = scratch("bun-nbd-remote-compressed-s3-");
const p = (f: string) => join(dir, f);
let raw: Uint8Array;

const { s3test, run: runSuite } = s3Suite("remote compressed images (S3, Ceph RGW)", async (g) => {
  need("xz", "zip");
  raw = new Uint8Array(SIZE);
  for (let i = 0; i < SIZE / MiB; i++) {
    const m = raw.subarray(i * MiB, (i + 1) * MiB);
    fillPattern(m, i * MiB, 77);
    if (i % 2) for (let j = 0; j < m.length; j++) m[j] = 0x30 + (m[j]! & 15);
  }
  writeFileSync(p("disk.img"), raw);
  await runOk(["sh", "-c", "xz -T2 --block-size=1MiB -k disk.img && zip -q a.zip disk.img"], { cwd: dir, timeoutMs: 300_000 });
  await g.putFile(BUCKET, "packed/x.img.xz", p("disk.img.xz"));
  await g.putFile(BUCKET, "packed/a.zip", p("a.zip"));
});

s3test("s3:// .xz and ARCHIVE.zip/MEMBER: byte-exact; a small .xz read fetches about one block", 300_000, async (g) => {
  const s = await serve(["--no-cache", "--block-size", "64K", `s3://${BUCKET}/packed/x.img.xz`, `s3://${BUCKET}/packed/a.zip/disk.img`],
    { env: { ...g.env, BUN_NBD_CACHE_DIR: p("idx") }, timeoutMs: 120_000 });
  try {
    const p0 = await g.perf();
    const at = 20 * MiB + 999; // a pseudo-random MiB: about 1 MiB compressed
    const o = await nbdpy(s.uri("x.img"), `out['d'] = h.pread(4096, ${at}).hex()`, { timeoutMs: 60_000 });
    bytesEqual(Uint8Array.from(Buffer.from(o.d, "hex")), raw.subarray(at, at + 4096), "small read");
    const p1 = await g.perf();
    const bytes = p1.getBytes - p0.getBytes + (p1.gets - p0.gets); // RGW counts each ranged GET one byte short
    assert.ok(bytes >= MiB && bytes <= MiB + 3 * 65536, `${bytes} bytes fetched for one block of about 1 MiB`);
    for (const name of ["x.img", "disk"]) {
      const out = p(`${name}.out`);
      await runOk(["nbdcopy", s.uri(name), out], { timeoutMs: 120_000 });
      bytesEqual(new Uint8Array(readFileSync(out)), raw, name);
    }
  } finally { await stopped(s); }
});

runSuite();
