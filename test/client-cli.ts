// The client commands against real servers, checked against libnbd's own tools: `info`, `list`
// and `map` output compared with nbdinfo on the same exports (bun-nbd, nbdkit, qemu-nbd), and
// `copy` round trips of a sparse 256 MiB image (file -> NBD -> NBD -> file) that must come back
// byte-identical with the same holes (qemu-img map), with --sha256 equal to sha256sum.
import { randomBytes } from "node:crypto";
import { openSync, closeSync, writeSync, statSync } from "node:fs";
import { join } from "node:path";
import type { Subprocess } from "bun";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { Negotiation } from "../src/client/index.ts";
import { deadline } from "./helpers/assert.ts";
import { BUN, CLI, need, run, runOk, scratch, SYSTEM_PATH } from "./helpers/env.ts";
import { serve, type Served } from "./helpers/server.ts";

need("nbdkit", "qemu-nbd", "nbdinfo", "qemu-img", "sha256sum", "cmp");
const MiB = 1024 * 1024;
const dir = scratch("bun-nbd-client-cli-");
const procs: Subprocess[] = [];
const served: Served[] = [];

async function waitSocket(path: string): Promise<void> {
  const limit = Date.now() + 10_000;
  for (;;) {
    try {
      await (await Negotiation.open({ transport: "unix", path, exportName: "" }, { connectTimeoutMs: 1000 })).abort();
      return;
    } catch (e) {
      if (Date.now() > limit) throw e;
      await Bun.sleep(30);
    }
  }
}

async function daemon(name: string, cmd: string[]): Promise<string> {
  const sock = join(dir, `${name}.sock`);
  procs.push(Bun.spawn([...cmd.slice(0, 1), ...cmd.slice(1).map((a) => a.replace("SOCK", sock))], {
    stdout: "ignore", stderr: "ignore", env: { ...process.env, PATH: SYSTEM_PATH },
  }));
  await waitSocket(sock);
  return sock;
}

const bunNbd = (...args: string[]) => run([BUN, CLI, ...args], { timeoutMs: 60_000 });
const nbdinfo = (...args: string[]) => runOk(["nbdinfo", ...args], { timeoutMs: 30_000 });

function sparseFile(path: string, size: number, pieces: [number, number][]): void {
  const fd = openSync(path, "w");
  for (const [off, len] of pieces) writeSync(fd, randomBytes(len), 0, len, off);
  closeSync(fd);
  Bun.spawnSync(["truncate", "-s", String(size), path]);
}

// Exports for the nbdinfo comparisons.
const uris: Record<string, string> = {};
test.before(async () => {
  sparseFile(join(dir, "alpha.img"), 8 * MiB, [[0, 65536], [3 * MiB, 12345], [7 * MiB, MiB]]);
  sparseFile(join(dir, "beta.img"), 3 * MiB + 512, [[MiB, 4096]]);
  const b = await serve(["-q", join(dir, "alpha.img"), join(dir, "beta.img")]);
  served.push(b);
  uris["bun-nbd"] = b.uri("alpha");
  const k = await daemon("nbdkit", ["nbdkit", "-f", "-U", "SOCK", "--filter=exportname", "data",
    '"hello" @1048576 "world" @4194304 0 @^8388608 ( "x" * 4096 )', "exportname=one", "exportname=two",
    "exportname-list=explicit", "exportname-strict=true", "exportdesc=fixed:the data plugin"]);
  uris.nbdkit = `nbd+unix:///one?socket=${k}`;
  const q = await daemon("qemu", ["qemu-nbd", "-f", "raw", "-t", "-k", "SOCK", "-x", "disk", "-D", "a qemu disk", "-A", join(dir, "alpha.img")]);
  uris["qemu-nbd"] = `nbd+unix:///disk?socket=${q}`;
});

test.after(async () => {
  for (const s of served) await s.stop();
  for (const p of procs) p.kill("SIGTERM");
  await Promise.all(procs.map((p) => p.exited));
});

const dropContent = (s: string) => s.split("\n").filter((l) => !/^\tcontent: /.test(l)).join("\n");
function dropContentJson(s: string): unknown {
  const j = JSON.parse(s) as { exports: Record<string, unknown>[] };
  for (const e of j.exports) delete e.content;
  return j;
}

for (const name of ["bun-nbd", "nbdkit", "qemu-nbd"]) {
  test(`${name}: info, list and map print what nbdinfo prints`, () => deadline(30_000, name, async () => {
    const uri = uris[name]!;
    const info = await bunNbd("info", uri);
    assert.is(info.code, 0, info.stderr);
    assert.fixture(info.stdout, dropContent((await nbdinfo(uri)).stdout));
    const infoJson = await bunNbd("info", "--json", uri);
    assert.equal(JSON.parse(infoJson.stdout), dropContentJson((await nbdinfo("--json", uri)).stdout));
    const list = await bunNbd("list", uri);
    assert.is(list.code, 0, list.stderr);
    assert.fixture(list.stdout, (await nbdinfo("--list", uri)).stdout);
    assert.equal(JSON.parse((await bunNbd("list", "--json", uri)).stdout), JSON.parse((await nbdinfo("--list", "--json", uri)).stdout));
    const map = await bunNbd("map", uri);
    assert.is(map.code, 0, map.stderr);
    assert.fixture(map.stdout, (await nbdinfo("--map", uri)).stdout);
    assert.equal(JSON.parse((await bunNbd("map", "--json", uri)).stdout), JSON.parse((await nbdinfo("--map", "--json", uri)).stdout));
    assert.fixture((await bunNbd("map", "--totals", uri)).stdout, (await nbdinfo("--map", "--totals", uri)).stdout);
    if (name === "qemu-nbd") {
      const depth = await bunNbd("map", "--context", "qemu:allocation-depth", uri);
      assert.fixture(depth.stdout, (await nbdinfo("--map=qemu:allocation-depth", uri)).stdout);
    }
  }));
}

test("info, list, map and copy fail clearly and exit non-zero", () => deadline(30_000, "errors", async () => {
  const refused = await bunNbd("info", "nbd://127.0.0.1:1/");
  assert.is(refused.code, 1);
  assert.match(refused.stderr, /cannot connect to 127\.0\.0\.1:1/);
  const tls = await bunNbd("list", "nbds://127.0.0.1:1/?tls-psk-file=/nonexistent/keys.psk");
  assert.is(tls.code, 1);
  assert.match(tls.stderr, /cannot read the PSK file \/nonexistent\/keys\.psk/);
  const missing = await bunNbd("map", uris.nbdkit!.replace("///one", "///nope"));
  assert.is(missing.code, 1);
  assert.match(missing.stderr, /ERR_UNKNOWN/);
  const ctx = await bunNbd("map", "--context", "qemu:nothing", uris.nbdkit!);
  assert.is(ctx.code, 1);
  assert.match(ctx.stderr, /qemu:nothing/);
  const usage = await bunNbd("copy", "only-one-arg");
  assert.is(usage.code, 2);
  const badSrc = await bunNbd("copy", "-q", join(dir, "does-not-exist.img"), "null:");
  assert.is(badSrc.code, 1);
  assert.match(badSrc.stderr, /ENOENT|no such file/i);
  const small = await bunNbd("copy", "-q", join(dir, "alpha.img"), uris["bun-nbd"]!.replace("alpha", "beta"));
  assert.is(small.code, 1);
  assert.match(small.stderr, /smaller than the source/);
}));

/** Data ranges of a file as qemu-img map reports them (merged). */
async function dataMap(path: string): Promise<[number, number][]> {
  const out = JSON.parse((await runOk(["qemu-img", "map", "--output=json", "-f", "raw", path])).stdout) as { start: number; length: number; data: boolean }[];
  const ranges: [number, number][] = [];
  for (const e of out) {
    if (!e.data) continue;
    const last = ranges[ranges.length - 1];
    if (last && last[0] + last[1] === e.start) last[1] += e.length;
    else ranges.push([e.start, e.length]);
  }
  return ranges;
}

test("copy: sparse 256 MiB round trip file -> nbdkit -> bun-nbd -> file keeps bytes and holes; --sha256", () => deadline(90_000, "copy", async () => {
  const size = 256 * MiB;
  const pieces: [number, number][] = [];
  for (let i = 0; i < 24; i++) pieces.push([i * 10 * MiB + (i % 3) * 65536, (i % 4 + 1) * 256 * 1024]);
  pieces.push([size - 4096, 4096]);
  const src = join(dir, "src.img");
  sparseFile(src, size, pieces);
  const srcMap = await dataMap(src);
  assert.ok(srcMap.length >= 20, "the source is sparse");

  // 1. file -> NBD: the destination starts fully allocated with 0xff; zero ranges must punch holes.
  const mid = join(dir, "mid.img");
  const fd = openSync(mid, "w");
  const ff = Buffer.alloc(16 * MiB, 0xff);
  for (let o = 0; o < size; o += ff.length) writeSync(fd, ff, 0, ff.length, o);
  closeSync(fd);
  const ksock = await daemon("copy-dst", ["nbdkit", "-f", "-U", "SOCK", "file", mid]);
  const c1 = await bunNbd("copy", "-q", "--flush", src, `nbd+unix:///?socket=${ksock}`);
  assert.is(c1.code, 0, c1.stderr);
  await runOk(["cmp", src, mid]);
  assert.equal(await dataMap(mid), srcMap, "holes punched on the NBD destination");

  // 2. NBD -> NBD: nbdkit -> bun-nbd serving an empty file.
  const third = join(dir, "third.img");
  Bun.spawnSync(["truncate", "-s", String(size), third]);
  const b = await serve(["-q", third]);
  served.push(b);
  const c2 = await bunNbd("copy", "-q", `nbd+unix:///?socket=${ksock}`, b.uri(""));
  assert.is(c2.code, 0, c2.stderr);

  // 3. NBD -> file, with the digest.
  const out = join(dir, "out.img");
  const c3 = await bunNbd("copy", "--sha256", b.uri(""), out);
  assert.is(c3.code, 0, c3.stderr);
  await runOk(["cmp", src, out]);
  assert.equal(await dataMap(out), srcMap, "holes kept on the file destination");
  assert.is(statSync(out).size, size);
  const want = (await runOk(["sha256sum", src])).stdout.split(" ")[0]!;
  assert.is(c3.stdout.split(" ")[0], want, "--sha256 equals sha256sum");
  assert.ok(!c3.stderr.includes("%"), "no progress bar when stderr is not a terminal");

  // 4. to null:, over one connection, and from a file source.
  const c4 = await bunNbd("copy", "-q", "--sha256", "-C", "1", "-R", "3", "--request-size", "65536", b.uri(""), "null:");
  assert.is(c4.stdout.split(" ")[0], want);
  const c5 = await bunNbd("copy", "-q", "--sha256", src, "/dev/null");
  assert.is(c5.stdout.split(" ")[0], want);
}));

test.run();
