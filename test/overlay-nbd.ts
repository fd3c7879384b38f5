// Overlay exports through the real server (`bun-nbd serve --overlay/--snapshot`): random operation
// sequences over NBD against an expected raw copy, two connections writing into the same
// unallocated clusters at once, allocation reporting seen by nbdinfo, throw-away snapshots that
// leave nothing behind (SIGTERM and kill -9), and qemu-nbd serving the same overlay afterwards.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { bytesEqual } from "./helpers/assert.ts";
import { need, run, runOk, scratch } from "./helpers/env.ts";
import { serve } from "./helpers/server.ts";
import { connect } from "../src/client/index.ts";
import { assertClean, assertIdentical, makeBase, MiB, qemuMap, randomOps, Rng, sha256 } from "./overlay-support.ts";

const test = suite("overlay-nbd");
const dir = scratch("bun-nbd-overlay-nbd-");

test.before(() => need("qemu-img", "nbdinfo"));

function setup(name: string, size: number, seed: number) {
  const d = join(dir, name);
  mkdirSync(d, { recursive: true });
  const basePath = join(d, "base.img");
  const base = makeBase(basePath, size, seed);
  return { d, basePath, base, ov: join(d, "ov.qcow2"), sha: sha256(basePath) };
}

for (const compat of [false, true]) {
  test(`random ops over NBD (${compat ? "standard" : "extended"} L2), 32 MiB writes included`, async () => {
    const s = setup(`diff-${compat}`, 36 * MiB, compat ? 5 : 6);
    const srv = await serve(["--overlay", s.ov, ...(compat ? ["--compat"] : []), s.basePath], { socket: join(s.d, "sock") });
    const expected = s.base.slice();
    try {
      const nbd = await connect(srv.uri("base"));
      await randomOps({
        write: (b, off, fua) => nbd.pwrite(b, off, { fua }),
        zero: (off, len, mayTrim) => nbd.zero(off, len, { noHole: !mayTrim }),
        trim: (off, len) => nbd.trim(off, len),
        flush: () => nbd.flush(),
      }, expected, new Rng(compat ? 7 : 8), { count: compat ? 120 : 160, size: expected.length, big: 32 * MiB });
      bytesEqual(await nbd.read(0, expected.length), expected, "read back over NBD");
      await nbd.close();
    } finally {
      assert.is(await srv.stop(), 0, `server exit status\n${srv.output()}`);
    }
    writeFileSync(join(s.d, "expected.raw"), expected);
    await assertClean(s.ov, "after serving");
    await assertIdentical(s.ov, join(s.d, "expected.raw"), "overlay vs expected");
    assert.is(sha256(s.basePath), s.sha, "base sha256 unchanged");
  });
}

for (const compat of [false, true]) {
  test(`two connections writing into the same unallocated clusters at once (${compat ? "standard" : "extended"} L2)`, async () => {
    const s = setup(`conc-${compat}`, 8 * MiB, 9);
    const srv = await serve(["--overlay", s.ov, ...(compat ? ["--compat"] : []), s.basePath], { socket: join(s.d, "sock") });
    const expected = s.base.slice();
    try {
      const [a, b] = await Promise.all([connect(srv.uri("base")), connect(srv.uri("base"))]);
      const pending: Promise<void>[] = [];
      const rng = new Rng(compat ? 10 : 11);
      // Per cluster: both connections write different parts of the same (sub)cluster, partial
      // units included, so each write on its own would copy the base's bytes over the other's.
      for (let k = 0; k < 96; k++) {
        const c = k * 65536;
        const pieces: [typeof a, number, number][] = [
          [a, c + 100, 700], [b, c + 900, 1000], [a, c + 3000, 5000], [b, c + 8000 + rng.int(100), 20000],
          [a, c + 40000, 123], [b, c + 40200, 25000],
        ];
        for (const [conn, off, len] of pieces) {
          const data = rng.bytes(len);
          expected.set(data, off);
          pending.push(conn.pwrite(data, off));
        }
        if (k % 7 === 0) pending.push((k % 2 ? a : b).flush());
      }
      await Promise.all(pending);
      await a.flush();
      bytesEqual(await b.read(0, expected.length), expected, "both connections' bytes, read by the other one");
      await Promise.all([a.close(), b.close()]);
    } finally {
      assert.is(await srv.stop(), 0, `server exit status\n${srv.output()}`);
    }
    writeFileSync(join(s.d, "expected.raw"), expected);
    await assertClean(s.ov, "after concurrent writers");
    await assertIdentical(s.ov, join(s.d, "expected.raw"), "overlay vs expected");
  });
}

test("allocation through both layers: nbdinfo --map agrees with qemu-img map", async () => {
  const s = setup("map", 4 * MiB, 12);
  const srv = await serve(["--overlay", s.ov, s.basePath], { socket: join(s.d, "sock") });
  try {
    const nbd = await connect(srv.uri("base"));
    await nbd.pwrite(new Uint8Array(4096).fill(1), 0x11000);
    await nbd.zero(0x200000, 0x20000);
    await nbd.trim(0x300000, 0x10000);
    await nbd.flush();
    await nbd.close();
    const depth = await runOk(["nbdinfo", "--json", "--map=qemu:allocation-depth", srv.uri("base")]);
    const got = JSON.parse(depth.stdout) as { offset: number; length: number; type: number }[];
    const map = await qemuMap(s.ov);
    for (const m of map) {
      for (const e of got) {
        const lo = Math.max(m.start, e.offset);
        const hi = Math.min(m.start + m.length, e.offset + e.length);
        if (lo < hi) assert.is(e.type, m.depth === 0 ? 1 : 2, `depth at ${lo}`);
      }
    }
    const alloc = JSON.parse((await runOk(["nbdinfo", "--json", "--map", srv.uri("base")])).stdout) as { offset: number; length: number; type: number }[];
    const at = (o: number) => alloc.find((e) => e.offset <= o && o < e.offset + e.length)!.type;
    assert.is(at(0x11000), 0, "written: data");
    assert.is(at(0x200000), 3, "zeroed: hole,zero");
    assert.is(at(0x300000), 3, "trimmed: hole,zero");
    assert.is(at(0x30000), 3, "base hole: hole,zero");
    assert.is(at(0x0), 0, "base data: data");
  } finally {
    await srv.stop();
  }
});

test("--snapshot: changes visible while served, base untouched, nothing left after SIGTERM or kill -9", async () => {
  const s = setup("snap", 4 * MiB, 13);
  const tmp = join(s.d, "tmp");
  mkdirSync(tmp);
  const saved = process.env.TMPDIR;
  process.env.TMPDIR = tmp;
  try {
    for (const signal of ["SIGTERM", "SIGKILL"] as const) {
      const srv = await serve(["--snapshot", s.basePath], { socket: join(s.d, `sock-${signal}`) });
      assert.equal(readdirSync(tmp), [], "no visible temporary file while serving");
      const nbd = await connect(srv.uri("base"));
      await nbd.pwrite(new Uint8Array(200000).fill(0x5a), 1000);
      await nbd.flush();
      bytesEqual(await nbd.read(1000, 200000), new Uint8Array(200000).fill(0x5a), "snapshot write visible");
      await nbd.close();
      await srv.stop(signal);
      assert.equal(readdirSync(tmp), [], `nothing left after ${signal}`);
      assert.is(sha256(s.basePath), s.sha, `base unchanged (${signal})`);
    }
  } finally {
    if (saved === undefined) delete process.env.TMPDIR; else process.env.TMPDIR = saved;
  }
});

test("the overlay bun-nbd served is served by qemu-nbd with the same bytes", async () => {
  need("qemu-nbd");
  const s = setup("qnbd", 4 * MiB, 14);
  const srv = await serve(["--overlay", s.ov, s.basePath], { socket: join(s.d, "sock") });
  const expected = s.base.slice();
  try {
    const nbd = await connect(srv.uri("base"));
    await randomOps({
      write: (b, off, fua) => nbd.pwrite(b, off, { fua }),
      zero: (off, len, mayTrim) => nbd.zero(off, len, { noHole: !mayTrim }),
      trim: (off, len) => nbd.trim(off, len),
      flush: () => nbd.flush(),
    }, expected, new Rng(15), { count: 60, size: expected.length, big: MiB });
    await nbd.close();
  } finally {
    await srv.stop();
  }
  const sock = join(s.d, "qsock");
  const q = Bun.spawn(["qemu-nbd", "-f", "qcow2", "-r", "-k", sock, "-t", s.ov], { stdout: "ignore", stderr: "pipe" });
  try {
    for (let i = 0; i < 100 && !readdirSync(s.d).includes("qsock"); i++) await Bun.sleep(30);
    const out = join(s.d, "via-qemu-nbd.raw");
    await runOk(["nbdcopy", `nbd+unix:///?socket=${sock}`, out]);
    bytesEqual(new Uint8Array(readFileSync(out)), expected, "qemu-nbd's view of the overlay");
  } finally {
    q.kill();
    await q.exited;
  }
  const r = await run(["qemu-img", "check", s.ov]);
  assert.is(r.code, 0, r.stdout);
});

test.run();
