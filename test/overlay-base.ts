// Overlays over a base that is not a raw file: a deliberately slow asynchronous device (concurrent
// overlapping writes, zeroes and reads against a model, then qemu-img check and compare), shared
// reference-counted bases under many overlays, the identity record and its refusals, and what QEMU
// tools do with an overlay whose backing format is "bun-nbd".
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { chmodSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { bytesEqual, rejects } from "./helpers/assert.ts";
import { need, run, runOk, scratch } from "./helpers/env.ts";
import { SlowDevice } from "./helpers/slow-device.ts";
import { deviceBase, openBase, openImage, openOverlay, type Qcow2Overlay } from "../src/devices/qcow2/index.ts";
import { MemoryDevice } from "../src/devices/memory.ts";
import { FUA, MAY_TRIM, isPromise } from "../src/devices/types.ts";
import { assertClean, assertIdentical, MiB, noBacking, rawBacking, Rng, sha256 } from "./overlay-support.ts";

const test = suite("overlay-base");
const dir = scratch("bun-nbd-overlay-base-");
const log = (_m: string) => {};

test.before(() => need("qemu-img", "qemu-io"));

function baseBytes(size: number, seed: number): Uint8Array {
  const b = new Rng(seed).bytes(size);
  for (let p = 3 * 65536; p < size; p += 5 * 65536) b.fill(0, p, Math.min(size, p + 65536)); // holes
  return b;
}

const settle = (r: unknown) => (isPromise(r) ? r : Promise.resolve(r));

/**
 * Batches of operations issued at once (without awaiting in between) into a few neighbouring
 * clusters of an overlay over a slow asynchronous base, so copy-on-writes of the same cluster and
 * subcluster wait for base bytes at the same time. Within a batch the writes and zeroes touch
 * disjoint bytes (the result is then exact); reads overlap them and must see, byte by byte, either
 * the value before or after the batch. Overlapping-write batches must leave every byte as one of
 * the writes covering it.
 */
async function concurrentModel(name: string, compat: boolean, seed: number) {
  const d = join(dir, name);
  mkdirSync(d, { recursive: true });
  const size = 3 * MiB + 12345; // not a multiple of 512: the overlay's last bytes lie past the base
  const bytes = baseBytes(size, seed);
  const dev = new SlowDevice(bytes, { maxDelayMs: 3, seed });
  const base = await deviceBase(dev, { kind: "test", location: "/nonexistent/slow-base", stack: "slow asynchronous test device" });
  const ovPath = join(d, "ov.qcow2");
  const ov = await openOverlay({ base, overlay: ovPath, compat, log });
  await base.release(); // the overlay holds its own reference
  const model = new Uint8Array(ov.size());
  model.set(bytes);
  const rng = new Rng(seed + 1);
  const cs = 65536;
  const clusters = Math.floor(ov.size() / cs);
  let ops = 0;
  for (let batch = 0; batch < 70; batch++) {
    const hot = rng.int(clusters - 2) * cs;
    const span = 3 * cs;
    const hotEnd = Math.min(hot + span, ov.size());
    const before = model.slice(hot, hotEnd);
    const pending: Promise<unknown>[] = [];
    const overlapping = batch % 5 === 4;
    const covering: { off: number; data: Uint8Array }[] = [];
    if (!overlapping) {
      // disjoint pieces: cut points at random bytes and at subcluster boundaries
      const cuts = new Set<number>([hot, hotEnd]);
      for (let k = 0; k < 10; k++) cuts.add(hot + (rng.int(2) ? rng.int(span) : rng.int(span / 2048) * 2048));
      const pts = [...cuts].filter((p) => p <= hotEnd).sort((a, b) => a - b);
      for (let k = 0; k + 1 < pts.length; k++) {
        const off = pts[k]!;
        const len = pts[k + 1]! - off;
        if (len === 0) continue;
        const what = rng.int(10);
        if (what < 6) {
          const data = rng.bytes(len);
          pending.push(settle(ov.pwrite(data, off, rng.int(8) === 0 ? FUA : 0)));
          model.set(data, off);
        } else if (what < 8) {
          pending.push(settle(rng.int(2) ? ov.zero(off, len, rng.int(2) ? MAY_TRIM : 0) : ov.trim(off, len, 0)));
          model.fill(0, off, off + len);
        }
        ops++;
        if (rng.int(6) === 0) pending.push(ov.flush(0));
      }
    } else {
      for (let k = 0; k < 4; k++) {
        const off = hot + rng.int(span - 1);
        const len = 1 + rng.int(Math.min(hotEnd - off, 40000));
        const data = rng.bytes(len);
        covering.push({ off, data });
        pending.push(settle(ov.pwrite(data, off, 0)));
        ops++;
      }
    }
    // reads overlapping all of it, issued in between
    const reads: { off: number; buf: Uint8Array; p: Promise<unknown> }[] = [];
    for (let k = 0; k < 4; k++) {
      const off = hot + rng.int(span - 1);
      const buf = new Uint8Array(1 + rng.int(Math.min(hotEnd - off, 70000)));
      reads.push({ off, buf, p: settle(ov.pread(buf, off, 0)) });
    }
    await Promise.all([...pending, ...reads.map((r) => r.p)]);
    const got = new Uint8Array(hotEnd - hot);
    await settle(ov.pread(got, hot, 0));
    if (overlapping) {
      for (let i = 0; i < got.length; i++) {
        const pos = hot + i;
        const cands = covering.filter((w) => pos >= w.off && pos < w.off + w.data.length).map((w) => w.data[pos - w.off]!);
        const ok = cands.length === 0 ? got[i] === before[i] : cands.includes(got[i]!);
        if (!ok) assert.unreachable(`${name} batch ${batch}: byte ${pos} is ${got[i]}, expected one of ${cands.length ? cands : [before[i]]}`);
      }
      model.set(got, hot);
    } else {
      bytesEqual(got, model.subarray(hot, hotEnd), `${name} batch ${batch}: the hot clusters after the batch`);
    }
    for (const r of reads) {
      for (let i = 0; i < r.buf.length; i++) {
        const pos = r.off + i;
        const v = r.buf[i]!;
        const old = before[pos - hot]!;
        const now = got[pos - hot]!;
        const inflight = covering.some((w) => pos >= w.off && pos < w.off + w.data.length && w.data[pos - w.off] === v);
        if (v !== old && v !== now && !inflight) {
          assert.unreachable(`${name} batch ${batch}: a concurrent read saw ${v} at ${pos}, neither the old ${old} nor the new ${now}`);
        }
      }
    }
  }
  await ov.flush(0);
  const all = new Uint8Array(ov.size());
  await settle(ov.pread(all, 0, 0));
  bytesEqual(all, model, `${name}: the whole overlay after ${ops} operations`);
  assert.ok(dev.maxInflight > 1, `base reads overlapped (at most ${dev.maxInflight} in flight)`);
  await ov.close();
  assert.is(dev.closes, 1, "the base device closed with the overlay (its last reference)");
  const baseRaw = join(d, "base.raw");
  writeFileSync(baseRaw, bytes);
  const expected = join(d, "expected.raw");
  writeFileSync(expected, model);
  await assertClean(noBacking(ovPath), `${name}: qemu-img check`);
  await assertIdentical(rawBacking(ovPath, baseRaw), expected, `${name}: qemu-img compare`);
}

test("slow async base, extended L2: concurrent overlapping writes, zeroes and reads match the model", async () => {
  await concurrentModel("async-ext", false, 101);
});

test("slow async base, standard L2: concurrent overlapping writes, zeroes and reads match the model", async () => {
  await concurrentModel("async-std", true, 102);
});

test("base read errors: the request fails, nothing is allocated, other requests go on", async () => {
  const d = join(dir, "errors");
  mkdirSync(d, { recursive: true });
  const bytes = baseBytes(2 * MiB, 15);
  const bad = MiB;
  const dev = new SlowDevice(bytes, { seed: 16, failFrom: bad, failTo: bad + 65536 });
  const base = await deviceBase(dev, { kind: "test", location: "/nonexistent/failing", stack: "failing test device" });
  const ovPath = join(d, "ov.qcow2");
  const ov = await openOverlay({ base, overlay: ovPath, log });
  await base.release();
  // overlay data in between, so one read needs several base reads, some failing
  await settle(ov.pwrite(new Uint8Array(4096).fill(1), bad - 8192, 0));
  await settle(ov.pwrite(new Uint8Array(65536).fill(2), bad + 65536, 0));
  const e1 = await rejects(() => settle(ov.pread(new Uint8Array(300000), bad - 100000, 0)), "read over the bad range");
  assert.match(e1.message, /medium error/);
  const e2 = await rejects(() => settle(ov.pwrite(new Uint8Array(100).fill(3), bad + 1000, 0)), "copy-on-write from the bad range");
  assert.match(e2.message, /medium error/);
  const e3 = await rejects(() => settle(ov.zero(bad + 30000, 10, 0)), "zero data needing the bad range");
  assert.match(e3.message, /medium error/);
  // a whole-unit write needs no base bytes: it succeeds, and the rest of the overlay is intact
  await settle(ov.pwrite(new Uint8Array(2048).fill(4), bad + 2048, 0));
  const good = new Uint8Array(8192);
  await settle(ov.pread(good, bad - 8192, 0));
  const exp = bytes.slice(bad - 8192, bad);
  exp.fill(1, 0, 4096);
  bytesEqual(good, exp, "data before the bad range");
  const sub = new Uint8Array(2048);
  await settle(ov.pread(sub, bad + 2048, 0));
  bytesEqual(sub, new Uint8Array(2048).fill(4), "the whole subcluster written over the bad range");
  await ov.close();
  await assertClean(noBacking(ovPath), "after the failed requests");
});

test("a base with a 4 KiB minimum block: unaligned base reads are widened", async () => {
  const bytes = baseBytes(MiB, 7);
  const dev = new SlowDevice(bytes, { minimum: 4096, seed: 8 });
  const base = await deviceBase(dev, { kind: "test", location: "/nonexistent/aligned", stack: "4 KiB blocks" });
  const ov = await openOverlay({ base, log });
  await base.release();
  const buf = new Uint8Array(10000);
  await settle(ov.pread(buf, 4097, 0));
  bytesEqual(buf, bytes.subarray(4097, 14097), "unaligned read through the overlay");
  await settle(ov.pwrite(new Uint8Array(3).fill(9), 70001, 0)); // copy-on-write of a 2 KiB subcluster
  const back = new Uint8Array(6000);
  await settle(ov.pread(back, 68000, 0));
  const exp = bytes.slice(68000, 74000);
  exp.fill(9, 2001, 2004);
  bytesEqual(back, exp, "copy-on-write completed from the base");
  await ov.close();
});

test("shared bases: many overlays over one open base, each its own changes; closed with the last reference", async () => {
  const d = join(dir, "shared");
  mkdirSync(d, { recursive: true });
  const rawPath = join(d, "base.img");
  const bytes = baseBytes(2 * MiB, 9);
  writeFileSync(rawPath, bytes);
  const raw = openBase(rawPath);
  const mem = new MemoryDevice(2 * MiB);
  mem.pwrite(bytes, 0);
  let memCloses = 0;
  (mem as { close?: () => void }).close = () => { memCloses++; };
  const dev = await deviceBase(mem, { kind: "test", location: "/nonexistent/memory", stack: "memory device" });
  for (const base of [raw, dev]) {
    const clients: Qcow2Overlay[] = [];
    for (let k = 0; k < 12; k++) {
      // per-client overlays: throw-away ones, and persistent ones created over the open base
      clients.push(await openOverlay({ base, overlay: k % 2 ? join(d, `c${k}-${base === raw ? "raw" : "dev"}.qcow2`) : undefined, log }));
    }
    assert.is(base.references, 13, "one reference per overlay plus the opener's");
    for (const [k, c] of clients.entries()) await settle(c.pwrite(new Uint8Array(5000).fill(k + 1), 1000 + k * 7, 0));
    for (const [k, c] of clients.entries()) {
      const got = new Uint8Array(5000 + 200);
      await settle(c.pread(got, 900 + k * 7, 0));
      const exp = bytes.slice(900 + k * 7, 900 + k * 7 + 5200);
      exp.fill(k + 1, 100, 5100);
      bytesEqual(got, exp, `client ${k} sees its own change only`);
    }
    for (const c of clients) await c.close();
    assert.is(base.references, 1, "the overlays gave their references back");
  }
  // a raw base shared this way is still a raw base for QEMU
  const info = JSON.parse((await runOk(["qemu-img", "info", "--output=json", join(d, "c1-raw.qcow2")])).stdout);
  assert.is(info["backing-filename-format"], "raw");
  assert.is(memCloses, 0);
  await dev.release();
  assert.is(memCloses, 1, "the device closes with the last reference");
  await raw.release();
  const e = await rejects(() => openOverlay({ base: raw, log }), "overlay over a released base");
  assert.match(e.message, /already closed/);
});

test("identity: an overlay refuses a base that differs, naming both", async () => {
  const d = join(dir, "identity");
  mkdirSync(d, { recursive: true });
  const bytes = baseBytes(MiB, 11);
  const mk = (data: Uint8Array, stack = "memory device", kind = "test") => {
    const m = new MemoryDevice(data.length);
    m.pwrite(data, 0);
    return deviceBase(m, { kind, location: join(d, "disc.cue"), stack });
  };
  const a = await mk(bytes);
  const ovPath = join(d, "ov.qcow2");
  const ov = await openOverlay({ base: a, overlay: ovPath, log });
  await settle(ov.pwrite(new Uint8Array(100).fill(1), 0, 0));
  await ov.close();
  // the same base again (a fresh handle): fine
  const again = await openOverlay({ base: await mk(bytes), overlay: ovPath, log });
  await again.close();
  const other = bytes.slice();
  other[MiB - 1] = other[MiB - 1]! ^ 0xff; // one byte in the sampled tail
  const cases: [string, Promise<import("../src/devices/qcow2/base.ts").OverlayBase>, RegExp][] = [
    ["other content", mk(other), /base differs \(version\)/],
    ["other stack", mk(bytes, "cooked 2048-byte view of track 02 (MODE1/2352)"), /base differs \(device stack, version\)|base differs \(device stack\)/],
    ["other kind", mk(bytes, "memory device", "xz"), /base differs \(kind/],
  ];
  for (const [what, pb, re] of cases) {
    const b = await pb;
    const e = await rejects(() => openOverlay({ base: b, overlay: ovPath, log }), what);
    assert.match(e.message, re, `${what}: ${e.message}`);
    assert.match(e.message, /it was made over test .*disc\.cue \(memory device\)/, `${what}: names the recorded base: ${e.message}`);
    assert.match(e.message, /the base given is /, `${what}: names the given base: ${e.message}`);
    await b.release();
  }
  // a raw file where a device stack is recorded, and the other way round
  const rawPath = join(d, "disc.img");
  writeFileSync(rawPath, bytes);
  const e1 = await rejects(() => openOverlay({ base: rawPath, overlay: ovPath, log }), "raw base for a device overlay");
  assert.match(e1.message, /made over test .*disc\.cue \(memory device\).*not over the raw file .*disc\.img/);
  const rawOv = join(d, "raw.qcow2");
  await runOk(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "disc.img", "-F", "raw", rawOv]);
  const b = await mk(bytes);
  const e2 = await rejects(() => openOverlay({ base: b, overlay: rawOv, log }), "device base for a raw overlay");
  assert.match(e2.message, /made over the raw file .*disc\.img, not over test .*disc\.cue \(memory device\)/);
  await b.release();
});

test("QEMU tools and a bun-nbd overlay: info shows it, nothing reads the wrong bytes, the record survives header rewrites", async () => {
  const d = join(dir, "qemu");
  mkdirSync(d, { recursive: true });
  const bytes = baseBytes(MiB, 13);
  const cue = join(d, "disc.cue"); // what the backing name points at: QEMU must not read it as raw
  writeFileSync(cue, "FILE \"disc.bin\" BINARY\n  TRACK 01 MODE1/2352\n    INDEX 01 00:00:00\n");
  const m = new MemoryDevice(bytes.length);
  m.pwrite(bytes, 0);
  const base = await deviceBase(m, { kind: "test", location: cue, stack: "memory device" });
  const ovPath = join(d, "ov.qcow2");
  const ov = await openOverlay({ base, overlay: ovPath, log });
  await settle(ov.pwrite(new Uint8Array(70000).fill(0x42), 5000, 0));
  await ov.close();
  const info = JSON.parse((await runOk(["qemu-img", "info", "--output=json", ovPath])).stdout);
  assert.is(info["backing-filename"], "disc.cue");
  assert.is(info["backing-filename-format"], "bun-nbd");
  for (const cmd of [["check"], ["compare", ovPath.replace(/ov\.qcow2$/, "disc.cue")], ["map"], ["convert", "-O", "raw"], ["commit"]]) {
    const args = cmd[0] === "convert" ? ["qemu-img", ...cmd, ovPath, join(d, "out.raw")] : cmd[0] === "compare" ? ["qemu-img", "compare", ovPath, cmd[1]!] : ["qemu-img", ...cmd, ovPath];
    const r = await run(args);
    assert.is.not(r.code, 0, `qemu-img ${cmd[0]} must refuse`);
    assert.match(r.stderr, /Unknown driver 'bun-nbd'/, `qemu-img ${cmd[0]}: ${r.stderr}`);
  }
  const io = await run(["qemu-io", "-f", "qcow2", "-c", "read 0 512", ovPath]);
  assert.match(io.stderr + io.stdout, /Unknown driver 'bun-nbd'/);
  // the overlay alone is checkable; with the base's bytes as a raw backing it compares
  await assertClean(noBacking(ovPath), "check without the backing");
  const baseRaw = join(d, "base.raw");
  writeFileSync(baseRaw, bytes);
  const exp = bytes.slice();
  exp.fill(0x42, 5000, 75000);
  writeFileSync(join(d, "expected.raw"), exp);
  await assertIdentical(rawBacking(ovPath, baseRaw), join(d, "expected.raw"), "compare over the base's bytes");
  // QEMU rewrites the header (amend) and keeps the record
  await runOk(["qemu-img", "amend", "-o", "lazy_refcounts=on", noBacking(ovPath)]);
  await runOk(["qemu-img", "amend", "-o", "lazy_refcounts=off", noBacking(ovPath)]);
  const re = await openOverlay({ base, overlay: ovPath, log });
  const got = new Uint8Array(80000);
  await settle(re.pread(got, 0, 0));
  bytesEqual(got, exp.subarray(0, 80000), "read back after QEMU rewrote the header");
  await re.close();
  await base.release();
  const cli = await run([process.execPath, "src/cli.ts", "overlay", "info", "--json", ovPath]);
  assert.is(cli.code, 0, cli.stderr);
  const j = JSON.parse(cli.stdout);
  assert.is(j.backingFormat, "bun-nbd");
  assert.equal({ kind: j.baseIdentity.kind, stack: j.baseIdentity.stack, size: j.baseIdentity.size }, { kind: "test", stack: "memory device", size: MiB });
  assert.ok(j.changedBytes >= 70000);
  // metadata commands work without opening the base
  const chk = await run([process.execPath, "src/cli.ts", "overlay", "check", ovPath]);
  assert.is(chk.code, 0, chk.stdout + chk.stderr);
  // commit is refused: a device stack cannot take the changes back
  const before = sha256(cue);
  const c = await run([process.execPath, "src/cli.ts", "overlay", "commit", ovPath]);
  assert.is(c.code, 1);
  assert.match(c.stderr, /refusing to commit .*ov\.qcow2: its base is test .*disc\.cue \(memory device\).*not a raw file/);
  assert.is(sha256(cue), before);
  // a read-only base file
  const rd = join(d, "ro");
  mkdirSync(rd);
  writeFileSync(join(rd, "base.img"), bytes);
  const ro = await openOverlay({ base: join(rd, "base.img"), overlay: join(rd, "ov.qcow2"), log });
  await settle(ro.pwrite(new Uint8Array(10).fill(1), 0, 0));
  await ro.close();
  chmodSync(join(rd, "base.img"), 0o444);
  const rc = await run([process.execPath, "src/cli.ts", "overlay", "commit", join(rd, "ov.qcow2")]);
  assert.is(rc.code, 1);
  assert.match(rc.stderr, /refusing to commit .*its base .*base\.img is read-only/);
  bytesEqual(new Uint8Array(readFileSync(join(rd, "base.img"))), bytes, "read-only base unchanged");
  // opening for metadata without a base still refuses to read it
  const meta = openImage(ovPath, { readOnly: true, lock: false, log });
  const e = await rejects(async () => meta.pread(new Uint8Array(10), 900000, 0), "reading a detached base");
  assert.match(e.message, /is not open/);
  await meta.close();
  // The route to QEMU: save the base's bytes as a raw file and rebase onto it. QEMU then reads
  // through the overlay, and bun-nbd accepts the raw file because it holds the recorded content.
  writeFileSync(join(d, "disc.iso"), bytes);
  await runOk(["qemu-img", "rebase", "-u", "-F", "raw", "-b", "disc.iso", ovPath]);
  await assertClean(ovPath, "check after the rebase");
  await assertIdentical(ovPath, join(d, "expected.raw"), "QEMU reads the overlay over the saved view");
  const viaIso = await openOverlay({ base: join(d, "disc.iso"), overlay: ovPath, log });
  const got2 = new Uint8Array(80000);
  await settle(viaIso.pread(got2, 0, 0));
  bytesEqual(got2, exp.subarray(0, 80000), "bun-nbd over the saved view");
  await viaIso.close();
  const wrong = bytes.slice();
  wrong[10] = wrong[10]! ^ 1;
  writeFileSync(join(d, "disc.iso"), wrong);
  const e3 = await rejects(() => openOverlay({ base: join(d, "disc.iso"), overlay: ovPath, log }), "raw file with other bytes");
  assert.match(e3.message, /made over test .*disc\.cue \(memory device\).*not over the raw file .*disc\.iso/);
});

test.run();
