// The qcow2 overlay device driven directly (no server): random operation sequences against an
// expected raw copy with qemu-img check/compare as oracles, overlays written by qemu-io read back
// like qemu-img convert, allocation reporting against qemu-img map, throw-away overlays, leak
// repair, QEMU-compatible locking.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { copyFileSync, existsSync, readdirSync, readFileSync, statSync, truncateSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { bytesEqual, rejects } from "./helpers/assert.ts";
import { need, run, runOk, scratch } from "./helpers/env.ts";
import { openOverlay, openImage } from "../src/devices/qcow2/index.ts";
import type { Qcow2Overlay } from "../src/devices/qcow2/image.ts";
import { EXTENT_HOLE, EXTENT_ZERO, FAST_ZERO, FUA, MAY_TRIM, type BlockDevice } from "../src/devices/types.ts";
import { assertClean, assertIdentical, KiB, makeBase, MiB, qemuCheck, qemuMap, randomOps, Rng, sha256 } from "./overlay-support.ts";

const test = suite("overlay-device");
const dir = scratch("bun-nbd-overlay-dev-");
const logs: string[] = [];
const log = (m: string) => { logs.push(m); };

test.before(() => need("qemu-img", "qemu-io"));

function deviceTarget(dev: BlockDevice) {
  return {
    write: (b: Uint8Array, off: number, fua: boolean) => dev.pwrite!(b, off, fua ? FUA : 0),
    zero: (off: number, len: number, mayTrim: boolean) => dev.zero!(off, len, mayTrim ? MAY_TRIM : 0),
    trim: (off: number, len: number) => dev.trim!(off, len, 0),
    flush: () => dev.flush!(0),
  };
}

async function readAll(dev: BlockDevice): Promise<Uint8Array> {
  const out = new Uint8Array(dev.size());
  await dev.pread(out, 0, 0);
  return out;
}

async function differential(name: string, opts: { compat?: boolean; qemuCreate?: string[]; baseSize: number; count: number; big: number; seed: number }) {
  const d = join(dir, name);
  await runOk(["mkdir", "-p", d]);
  const basePath = join(d, "base.img");
  const base = makeBase(basePath, opts.baseSize, opts.seed);
  const before = sha256(basePath);
  const ov = join(d, "ov.qcow2");
  if (opts.qemuCreate) await runOk(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.img", "-F", "raw", ...opts.qemuCreate, ov]);
  const expected = new Uint8Array(Math.ceil(opts.baseSize / 512) * 512);
  expected.set(base);
  const rng = new Rng(opts.seed);
  let dev = await openOverlay({ base: basePath, overlay: ov, compat: opts.compat, log });
  assert.is(dev.size(), expected.length, "overlay size = base size rounded up to 512");
  const half = Math.floor(opts.count / 2);
  const ops = await randomOps(deviceTarget(dev), expected, rng, { count: half, size: expected.length, big: opts.big });
  await dev.close!();
  // reopen (persistence) and go on
  dev = await openOverlay({ base: basePath, overlay: ov, log });
  ops.push(...await randomOps(deviceTarget(dev), expected, rng, { count: opts.count - half, size: expected.length, big: opts.big }));
  bytesEqual(await readAll(dev), expected, `${name}: overlay reads after ${ops.length} ops`);
  await dev.close!();
  const raw = join(d, "expected.raw");
  writeFileSync(raw, expected);
  await assertClean(ov, name);
  await assertIdentical(ov, raw, name);
  assert.is(sha256(basePath), before, `${name}: base sha256 unchanged`);
  return { d, ov, basePath, raw };
}

test("random ops, extended L2 (bun-nbd's default overlay), with a 32 MiB write", async () => {
  const { ov } = await differential("ext", { baseSize: 40 * MiB + 1000, count: 240, big: 32 * MiB, seed: 11 });
  const info = JSON.parse((await runOk(["qemu-img", "info", "--output=json", ov])).stdout);
  assert.is(info["format-specific"].data["extended-l2"], true);
  assert.is(info["backing-filename"], "base.img", "backing name stored relative to the overlay");
  assert.is(info["backing-filename-format"], "raw");
});

test("random ops, standard L2 (--compat)", async () => {
  const { ov } = await differential("std", { compat: true, baseSize: 24 * MiB, count: 200, big: 8 * MiB, seed: 12 });
  const info = JSON.parse((await runOk(["qemu-img", "info", "--output=json", ov])).stdout);
  assert.is(info["format-specific"].data["extended-l2"], false);
});

test("random ops into overlays qemu-img made: 4 KiB clusters, 128 KiB extended L2", async () => {
  await differential("q4k", { qemuCreate: ["-o", "cluster_size=4096"], baseSize: 6 * MiB, count: 150, big: 2 * MiB, seed: 13 });
  await differential("q128x", { qemuCreate: ["-o", "cluster_size=131072,extended_l2=on"], baseSize: 6 * MiB, count: 150, big: 2 * MiB, seed: 14 });
});

// qemu-io operations covering data, zero flags (with and without unmap), discards, partial units
const QEMU_IO_OPS = [
  "write -P 0xaa 0x11000 0x1000", "write -P 0xbb 0x2fe00 0x400", "write -P 0xcc 0x40001 3",
  "write -z 0x60000 0x10000", "write -z 0x70800 0x1000", "discard 0x80000 0x10000", "discard 0x90000 0x8000",
  "write -z 0x10000 0x10000", "write -z -u 0x20000 0x10000", "discard 0x30000 0x10000",
  "write -P 0xdd 0x60000 0x200", "write -P 0xee 0xa0000 0x10000", "write -P 0x11 0x1f0000 0x30000",
  "write -z 0x1f8000 0x800", "write -z 0x1fc400 0x1400", "write -P 0x22 0x3ff000 0x1000",
];

for (const [name, opts] of [["standard", "cluster_size=65536"], ["extended", "cluster_size=65536,extended_l2=on"], ["4k", "cluster_size=4096"]] as const) {
  test(`qemu-io-written overlay (${name} L2) reads back like qemu-img convert`, async () => {
    const d = join(dir, `qio-${name}`);
    await runOk(["mkdir", "-p", d]);
    const basePath = join(d, "base.img");
    makeBase(basePath, 4 * MiB, 21);
    const ov = join(d, "ov.qcow2");
    await runOk(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "-b", "base.img", "-F", "raw", ov]);
    await runOk(["qemu-io", "-f", "qcow2", ...QEMU_IO_OPS.flatMap((c) => ["-c", c]), ov]);
    const conv = join(d, "conv.raw");
    await runOk(["qemu-img", "convert", "-O", "raw", ov, conv]);
    const dev = await openOverlay({ base: basePath, overlay: ov, log });
    bytesEqual(await readAll(dev), new Uint8Array(readFileSync(conv)), `${name}: bun-nbd read vs qemu-img convert`);
    // allocation depth and base:allocation agree with qemu-img map
    const map = await qemuMap(ov);
    const depth = collect(dev.metaContexts!()[0]!, dev.size());
    for (const m of map) {
      for (const e of depth) {
        const lo = Math.max(m.start, e.offset);
        const hi = Math.min(m.start + m.length, e.offset + e.length);
        if (lo < hi) assert.is(e.type, m.depth === 0 ? 1 : 2, `${name}: allocation depth at ${lo}`);
      }
    }
    const ext = collectExtents(dev, dev.size());
    for (const m of map) {
      if (m.depth !== 0 || !m.zero) continue;
      for (const e of ext) {
        const lo = Math.max(m.start, e.offset);
        const hi = Math.min(m.start + m.length, e.offset + e.length);
        if (lo < hi) assert.is(e.type, EXTENT_HOLE | EXTENT_ZERO, `${name}: zero cluster at ${lo} is a hole`);
      }
    }
    // and bun-nbd keeps writing into what QEMU made
    await dev.pwrite!(new Uint8Array(5000).fill(0x77), 0x1fe000, 0);
    await dev.close!();
    await assertClean(ov, `${name} after bun-nbd wrote`);
    const got = await runOk(["qemu-io", "-f", "qcow2", "-c", "read -P 0x77 0x1fe000 5000", ov]);
    assert.not.match(got.stdout, /Pattern verification failed/);
  });
}

function collect(p: { extents: BlockDevice["extents"] } & { extents(o: number, l: number, f: number, s: { add(o: number, l: number, t: number): boolean }): unknown }, size: number) {
  const out: { offset: number; length: number; type: number }[] = [];
  p.extents(0, size, 0, { add: (offset, length, type) => { out.push({ offset, length, type }); return true; } });
  return out;
}

function collectExtents(dev: BlockDevice, size: number) {
  const out: { offset: number; length: number; type: number }[] = [];
  dev.extents!(0, size, 0, { add: (offset, length, type) => { out.push({ offset, length, type }); return true; } });
  return out;
}

test("extents: base holes, overlay data, zeroed ranges; trimmed ranges never resurface the base", async () => {
  const d = join(dir, "extents");
  await runOk(["mkdir", "-p", d]);
  const basePath = join(d, "base.img");
  const base = makeBase(basePath, 2 * MiB, 31); // chunk 3 (0x30000-0x40000) is a hole
  const dev = await openOverlay({ base: basePath, overlay: join(d, "ov.qcow2"), log });
  const ext0 = collectExtents(dev, dev.size());
  assert.ok(ext0.some((e) => e.offset === 0x30000 && e.length === 0x10000 && e.type === (EXTENT_HOLE | EXTENT_ZERO)), `base hole reported: ${JSON.stringify(ext0.slice(0, 4))}`);
  await dev.trim!(0x100000, 0x20000, 0);
  await dev.trim!(0x10123, 0x345, 0); // partial: still reads as zeros
  await dev.pwrite!(new Uint8Array(4096).fill(1), 0x30000, 0);
  const got = await readAll(dev);
  bytesEqual(got.subarray(0x100000, 0x120000), new Uint8Array(0x20000), "trimmed range");
  bytesEqual(got.subarray(0x10123, 0x10123 + 0x345), new Uint8Array(0x345), "partially trimmed range");
  bytesEqual(got.subarray(0x10000, 0x10123), base.subarray(0x10000, 0x10123), "bytes before the partial trim");
  const ext = collectExtents(dev, dev.size());
  const at = (o: number) => ext.find((e) => e.offset <= o && o < e.offset + e.length)!;
  assert.is(at(0x100000).type, EXTENT_HOLE | EXTENT_ZERO, "trimmed range is hole+zero");
  assert.is(at(0x30000).type, 0, "written range is data");
  assert.is(at(0x31000).type, EXTENT_HOLE | EXTENT_ZERO, "rest of the base hole");
  // FAST_ZERO: whole units succeed, a partial unit that needs data writes is refused untouched
  dev.zero!(0x40000, 0x10000, FAST_ZERO);
  const e = await rejects(async () => dev.zero!(0x50001, 10, FAST_ZERO), "fast zero of a partial unit");
  assert.match(e.message, /fast zero/);
  const after = new Uint8Array(10);
  await dev.pread(after, 0x50001, 0);
  bytesEqual(after, base.subarray(0x50001, 0x5000b), "range untouched after a refused fast zero");
  await dev.close!();
  await assertClean(join(d, "ov.qcow2"), "extents");
});

test("throw-away overlay: nothing in TMPDIR while open, writes visible, base untouched", async () => {
  const d = join(dir, "snap");
  const tmp = join(d, "tmp");
  await runOk(["mkdir", "-p", tmp]);
  const basePath = join(d, "base.img");
  const base = makeBase(basePath, 3 * MiB, 41);
  const before = sha256(basePath);
  const saved = process.env.TMPDIR;
  process.env.TMPDIR = tmp;
  let dev: BlockDevice;
  try {
    dev = await openOverlay({ base: basePath, log });
  } finally {
    if (saved === undefined) delete process.env.TMPDIR; else process.env.TMPDIR = saved;
  }
  assert.equal(readdirSync(tmp), [], "the temporary overlay is unlinked while open");
  await dev.pwrite!(new Uint8Array(100000).fill(9), 12345, FUA);
  const got = await readAll(dev);
  const exp = base.slice();
  exp.fill(9, 12345, 112345);
  bytesEqual(got, exp, "reads through the throw-away overlay");
  await dev.close!();
  assert.is(sha256(basePath), before, "base unchanged");
  assert.equal(readdirSync(tmp), [], "nothing left after close");
});

test("leaked clusters: reported, repaired by check --repair and by a read-write open", async () => {
  const d = join(dir, "leak");
  await runOk(["mkdir", "-p", d]);
  const basePath = join(d, "base.img");
  makeBase(basePath, 2 * MiB, 51);
  const ov = join(d, "ov.qcow2");
  const dev = await openOverlay({ base: basePath, overlay: ov, log });
  await dev.pwrite!(new Uint8Array(70000).fill(3), 5000, 0);
  await dev.close!();
  const leak = async () => {
    // a cluster counted but referenced by nothing, as a crash between the phases leaves it
    const size = statSync(ov).size;
    const c = Math.ceil(size / 65536);
    truncateSync(ov, (c + 1) * 65536);
    const info = JSON.parse((await runOk(["qemu-img", "info", "--output=json", ov])).stdout);
    assert.ok(info["cluster-size"] === 65536);
    // the refcount block is the cluster at 0x20000 (qemu-img create layout): entry c
    const fd = (await import("node:fs")).openSync(ov, "r+");
    const be = new Uint8Array([0, 1]);
    (await import("node:fs")).writeSync(fd, be, 0, 2, 0x20000 + c * 2);
    (await import("node:fs")).closeSync(fd);
  };
  await leak();
  assert.is((await qemuCheck(ov)).code, 3, "qemu-img check sees the leak");
  const cli = ["bun", "src/cli.ts", "overlay"];
  const r1 = await run([process.execPath, "src/cli.ts", "overlay", "check", ov]);
  assert.is(r1.code, 3, `overlay check reports the leak: ${r1.stdout}${r1.stderr}`);
  assert.match(r1.stdout, /1 leaked cluster/);
  const r2 = await run([process.execPath, "src/cli.ts", "overlay", "check", "--repair", ov]);
  assert.is(r2.code, 0, `overlay check --repair: ${r2.stdout}${r2.stderr}`);
  assert.match(r2.stdout, /1 leaked cluster\(s\) repaired/);
  await assertClean(ov, "after check --repair");
  void cli;
  await leak();
  logs.length = 0;
  const dev2 = await openOverlay({ base: basePath, overlay: ov, log });
  await dev2.close!();
  assert.ok(logs.some((m) => /repaired 1 leaked/.test(m)), `open logs the repair: ${logs.join(" | ")}`);
  await assertClean(ov, "after a read-write open");
});

test("locks: QEMU cannot open a served overlay for writing, nor write its base; released at close", async () => {
  const d = join(dir, "locks");
  await runOk(["mkdir", "-p", d]);
  const basePath = join(d, "base.img");
  makeBase(basePath, 1 * MiB, 61);
  const ov = join(d, "ov.qcow2");
  const dev = await openOverlay({ base: basePath, overlay: ov, log });
  const q = await run(["qemu-io", "-f", "qcow2", "-c", "write 0 512", ov]);
  assert.is.not(q.code, 0);
  assert.match(q.stderr + q.stdout, /Failed to get "write" lock/);
  const qb = await run(["qemu-io", "-f", "raw", "-c", "write 0 512", basePath]);
  assert.match(qb.stderr + qb.stdout, /Failed to get "write" lock/, "the base is protected from writers");
  const info = await run(["qemu-img", "info", "-U", ov]);
  assert.is(info.code, 0, "qemu-img info -U still works");
  const second = await rejects(() => openOverlay({ base: basePath, overlay: ov, log }), "second rw open");
  assert.match(second.message, /lock/);
  await dev.close!();
  await runOk(["qemu-io", "-f", "qcow2", "-c", "write -P 5 0 512", ov]);
  const reopened = await openOverlay({ base: basePath, overlay: ov, log });
  // and the other way round: while QEMU holds it, bun-nbd refuses
  await reopened.close!();
});

test("refusals name the unsupported feature", async () => {
  const d = join(dir, "refuse");
  await runOk(["mkdir", "-p", d]);
  const basePath = join(d, "base.img");
  makeBase(basePath, 1 * MiB, 71);
  const mk = async (name: string, args: string[], post?: (p: string) => Promise<void> | void) => {
    const p = join(d, name);
    await runOk(["qemu-img", "create", "-q", "-f", "qcow2", ...args, p]);
    await post?.(p);
    return p;
  };
  const expectRefusal = async (p: string, re: RegExp, what: string) => {
    const e = await rejects(() => openOverlay({ base: basePath, overlay: p, log }), what);
    assert.match(e.message, re, `${what}: ${e.message}`);
    assert.ok(e.message.includes(p), `${what}: message names the file: ${e.message}`);
  };
  const bf = ["-b", "base.img", "-F", "raw"];
  const patch = (p: string, off: number, bytes: number[]) => {
    const b = readFileSync(p);
    bytes.forEach((v, k) => { b[off + k] = v; });
    writeFileSync(p, b);
  };
  await expectRefusal(await mk("snap.qcow2", bf, async (p) => { await runOk(["qemu-img", "snapshot", "-c", "s1", p]); }), /internal snapshots/, "internal snapshot");
  await expectRefusal(await mk("rc8.qcow2", [...bf, "-o", "refcount_bits=8"]), /8-bit refcounts/, "refcount width");
  await expectRefusal(await mk("datafile.qcow2", [...bf, "-o", `data_file=${join(d, "data.raw")}`]), /external data file/, "external data file");
  // LUKS: qemu-img times its key derivation and can fail on a loaded machine; retry a few times
  const luksArgs = ["--object", "secret,id=s0,data=pw", ...bf, "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10"];
  // (it measures per-thread CPU time, accounted in scheduler ticks, and gives up with "Unable to
  // get accurate CPU usage" when a calibration round measures 0 ms). If it never succeeds, mark
  // a plain overlay encrypted the way a LUKS image is: header crypt_method (offset 32) = 2.
  let luks: string | null = null;
  for (let attempt = 0; attempt < 4 && luks === null; attempt++) {
    try { luks = await mk(`luks${attempt}.qcow2`, luksArgs); } catch { await Bun.sleep(200); }
  }
  luks ??= await mk("luks-header.qcow2", bf, (p) => patch(p, 32, [0, 0, 0, 2]));
  await expectRefusal(luks, /encryption/, "LUKS encryption");
  await expectRefusal(await mk("aes.qcow2", bf, (p) => patch(p, 35, [1])), /encryption \(crypt_method 1\)/, "AES encryption (crypt_method 1)");
  await expectRefusal(await mk("v2.qcow2", [...bf, "-o", "compat=0.10"]), /qcow2 version 2/, "version 2 for writing");
  const q2 = join(d, "base.qcow2");
  await runOk(["qemu-img", "create", "-q", "-f", "qcow2", q2, "1M"]);
  await expectRefusal(await mk("qbacking.qcow2", ["-b", "base.qcow2", "-F", "qcow2"]), /backing format qcow2/, "non-raw backing");
  await expectRefusal(await mk("dirty.qcow2", bf, (p) => patch(p, 79, [1])), /dirty bit/, "dirty bit");
  await expectRefusal(await mk("corrupt.qcow2", bf, (p) => patch(p, 79, [2])), /corrupt bit/, "corrupt bit");
  await expectRefusal(await mk("future.qcow2", bf, (p) => patch(p, 79, [0x20])), /unknown incompatible feature bit 5|Unknown/i, "unknown incompatible feature");
  // compressed clusters: qemu-img convert -c into an overlay of the same base
  const src = join(d, "src.raw");
  writeFileSync(src, new Uint8Array(1 * MiB).fill(0x42));
  const comp = join(d, "comp.qcow2");
  await runOk(["qemu-img", "convert", "-c", "-O", "qcow2", "-B", "base.img", "-F", "raw", src, comp], { cwd: d });
  await expectRefusal(comp, /compressed clusters/, "compressed clusters");
  // a base whose size changed
  const okOv = await mk("ok.qcow2", bf);
  const grown = join(d, "grown.img");
  copyFileSync(basePath, grown);
  truncateSync(grown, 2 * MiB);
  await runOk(["qemu-img", "rebase", "-u", "-F", "raw", "-b", "grown.img", okOv]);
  const e = await rejects(() => openOverlay({ base: grown, overlay: okOv, log }), "base size changed");
  assert.match(e.message, /does not match base/);
  // a different base than the header names
  await runOk(["qemu-img", "rebase", "-u", "-F", "raw", "-b", "base.img", okOv]);
  const e2 = await rejects(() => openOverlay({ base: grown, overlay: okOv, log }), "wrong base");
  assert.match(e2.message, /backing file is/);
  // read-only opens tolerate what only matters for writing
  const dirty = join(d, "dirty.qcow2");
  const ro = openImage(dirty, { readOnly: true, lock: false, log });
  await ro.close();
  assert.ok(existsSync(dirty));
});

test("overlay commit equals qemu-img commit; diff, info --json and reset", async () => {
  const d = join(dir, "commit");
  await runOk(["mkdir", "-p", d]);
  const a = join(d, "a");
  const b = join(d, "b");
  await runOk(["mkdir", "-p", a, b]);
  makeBase(join(a, "base.img"), 5 * MiB, 81);
  copyFileSync(join(a, "base.img"), join(b, "base.img"));
  const dev = await openOverlay({ base: join(a, "base.img"), overlay: join(a, "ov.qcow2"), log }) as Qcow2Overlay;
  const expected = new Uint8Array(readFileSync(join(a, "base.img")));
  await randomOps(deviceTarget(dev), expected, new Rng(82), { count: 60, size: expected.length, big: 1 * MiB });
  await dev.close();
  copyFileSync(join(a, "ov.qcow2"), join(b, "ov.qcow2"));
  const cli = (...args: string[]) => run([process.execPath, "src/cli.ts", "overlay", ...args]);
  const info = await cli("info", "--json", join(a, "ov.qcow2"));
  assert.is(info.code, 0, info.stderr);
  const j = JSON.parse(info.stdout);
  assert.is(j.backingFile, "base.img");
  assert.ok(j.changedBytes > 0 && j.ranges.length > 0, "info lists changed ranges");
  const diffJson = JSON.parse((await cli("diff", "--json", join(a, "ov.qcow2"))).stdout) as { offset: number; length: number; kind: string }[];
  assert.equal(diffJson, j.ranges, "diff --json = info's ranges");
  const map = await qemuMap(join(a, "ov.qcow2"));
  const own = map.filter((m) => m.depth === 0).reduce((s, m) => s + m.length, 0);
  assert.is(j.changedBytes, own, "changed bytes = what qemu-img map shows at depth 0");
  await runOk(["qemu-img", "commit", "-q", join(a, "ov.qcow2")]);
  const c = await cli("commit", join(b, "ov.qcow2"));
  assert.is(c.code, 0, c.stdout + c.stderr);
  assert.match(c.stderr, /100%/, "progress shown");
  assert.is(sha256(join(a, "base.img")), sha256(join(b, "base.img")), "same base after both commits");
  bytesEqual(new Uint8Array(readFileSync(join(b, "base.img"))), expected, "the committed base holds the overlay's view");
  await assertClean(join(b, "ov.qcow2"), "after overlay commit");
  assert.equal(JSON.parse((await cli("diff", "--json", join(b, "ov.qcow2"))).stdout), [], "overlay empty after commit");
  // reset
  const dev2 = await openOverlay({ base: join(b, "base.img"), overlay: join(b, "ov.qcow2"), log });
  await dev2.pwrite!(new Uint8Array(300000).fill(0xab), 1000, 0);
  await dev2.zero!(2 * MiB, MiB, 0);
  await dev2.close!();
  const before = sha256(join(b, "base.img"));
  const r = await cli("reset", join(b, "ov.qcow2"));
  assert.is(r.code, 0, r.stderr);
  await assertClean(join(b, "ov.qcow2"), "after reset");
  await assertIdentical(join(b, "ov.qcow2"), join(b, "base.img"), "reset overlay reads as the base");
  assert.is(sha256(join(b, "base.img")), before, "reset does not touch the base");
  assert.ok(statSync(join(b, "ov.qcow2")).size <= 4 * 65536 + 8, `reset shrinks the file: ${statSync(join(b, "ov.qcow2")).size}`);
  // commit is refused while the overlay is open for writing
  const held = await openOverlay({ base: join(b, "base.img"), overlay: join(b, "ov.qcow2"), log });
  const busy = await cli("commit", join(b, "ov.qcow2"));
  assert.is(busy.code, 1);
  assert.match(busy.stderr, /lock/);
  await held.close!();
  const bad = await cli("info", join(d, "missing.qcow2"));
  assert.is(bad.code, 1);
  assert.match(bad.stderr, /missing\.qcow2/);
});

test.run();
