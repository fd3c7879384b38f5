// The client library against real servers: bun-nbd (our own serve CLI), nbdkit and qemu-nbd,
// each serving a copy of the same 16 MiB image with holes. Pipelined mixed requests, structured
// reads over holes, block status with and without REQ_ONE, and, where one server can stage it, an
// error chunk (nbdkit --filter=error), block-size splitting (--filter=blocksize-policy), an
// oldstyle handshake, an unknown export and a server killed with requests in flight.
import { randomBytes } from "node:crypto";
import { copyFileSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { Subprocess } from "bun";
import { test } from "uvu";
import * as assert from "uvu/assert";
import {
  connect, Negotiation, NbdDisconnectedError, NbdOptionError, NbdRequestError, NbdUsageError, NBD_STATE_HOLE, NBD_STATE_ZERO,
  type NbdClient,
} from "../src/client/index.ts";
import { bytesEqual, deadline, rejects } from "./helpers/assert.ts";
import { need, scratch, SYSTEM_PATH } from "./helpers/env.ts";
import { serve, type Served } from "./helpers/server.ts";

need("nbdkit", "qemu-nbd");
const MiB = 1024 * 1024;
const SIZE = 16 * MiB;
const dir = scratch("bun-nbd-client-interop-");

// The image: data in [0,1M) and [8M,9M), holes elsewhere.
const image = Buffer.alloc(SIZE);
randomBytes(MiB).copy(image, 0);
randomBytes(MiB).copy(image, 8 * MiB);
const base = join(dir, "base.img");
writeFileSync(base, image.subarray(0, 9 * MiB));
Bun.spawnSync(["truncate", "-s", String(SIZE), base]);
// Punch the hole explicitly (writeFileSync wrote zeros between the data ranges).
Bun.spawnSync(["fallocate", "--punch-hole", "-o", String(MiB), "-l", String(7 * MiB), base]);

const procs: Subprocess[] = [];
let bunServer: Served | null = null;

async function waitSocket(path: string): Promise<void> {
  const limit = Date.now() + 10_000;
  for (;;) {
    try {
      const n = await Negotiation.open({ transport: "unix", path, exportName: "" }, { connectTimeoutMs: 1000 });
      await n.abort();
      return;
    } catch (e) {
      if (Date.now() > limit) throw e;
      await Bun.sleep(30);
    }
  }
}

function spawn(cmd: string[]): Subprocess {
  const p = Bun.spawn(cmd, { stdout: "ignore", stderr: "ignore", env: { ...process.env, PATH: SYSTEM_PATH } });
  procs.push(p);
  return p;
}

async function nbdkit(name: string, args: string[]): Promise<{ uri: string; proc: Subprocess }> {
  const sock = join(dir, `${name}.sock`);
  const proc = spawn(["nbdkit", "-f", "-U", sock, ...args]);
  await waitSocket(sock);
  return { uri: `nbd+unix:///?socket=${sock}`, proc };
}

interface Srv { name: string; uri: string; img: string }
const servers: Srv[] = [];

test.before(async () => {
  for (const n of ["bun", "nbdkit", "qemu"]) copyFileSync(base, join(dir, `${n}.img`));
  for (const n of ["bun", "nbdkit", "qemu"]) Bun.spawnSync(["fallocate", "--punch-hole", "-o", String(MiB), "-l", String(7 * MiB), join(dir, `${n}.img`)]);
  bunServer = await serve(["-q", join(dir, "bun.img")]);
  servers.push({ name: "bun-nbd", uri: bunServer.uri(""), img: join(dir, "bun.img") });
  servers.push({ name: "nbdkit", uri: (await nbdkit("nbdkit", ["file", join(dir, "nbdkit.img")])).uri, img: join(dir, "nbdkit.img") });
  const qsock = join(dir, "qemu.sock");
  spawn(["qemu-nbd", "-f", "raw", "-t", "-A", "-k", qsock, "-x", "", join(dir, "qemu.img")]);
  await waitSocket(qsock);
  servers.push({ name: "qemu-nbd", uri: `nbd+unix:///?socket=${qsock}`, img: join(dir, "qemu.img") });
});

test.after(async () => {
  await bunServer?.stop();
  for (const p of procs) p.kill("SIGTERM");
  await Promise.all(procs.map((p) => p.exited));
});

function holeAt(ext: { offset: number; length: number; flags: number }[], at: number): number {
  const e = ext.find((x) => x.offset <= at && at < x.offset + x.length);
  if (!e) throw new Error(`no extent at ${at}`);
  return e.flags;
}

for (const name of ["bun-nbd", "nbdkit", "qemu-nbd"]) {
  const srv = () => servers.find((s) => s.name === name)!;

  test(`${name}: handshake, structured read over holes, block status, REQ_ONE`, () => deadline(20_000, name, async () => {
    const c = await connect(srv().uri, { metaContexts: ["base:allocation", "qemu:allocation-depth"] });
    try {
      assert.is(c.size, SIZE);
      assert.ok(c.structured, "structured replies");
      assert.ok(c.metaContexts.has("base:allocation"));
      assert.is(c.metaContexts.has("qemu:allocation-depth"), name === "qemu-nbd", "allocation-depth only on qemu-nbd -A");
      const all = await c.read(0, 12 * MiB);
      bytesEqual(all, image.subarray(0, 12 * MiB), "whole read");
      if (name === "qemu-nbd") assert.ok(c.stats.holeChunks > 0, "qemu-nbd sends OFFSET_HOLE chunks for holes");
      const ext = await c.extents(0, 12 * MiB);
      assert.is(ext.reduce((s, e) => s + e.length, 0), 12 * MiB);
      assert.is(holeAt(ext, 0) & NBD_STATE_ZERO, 0, "data at 0");
      assert.is(holeAt(ext, 4 * MiB), NBD_STATE_HOLE | NBD_STATE_ZERO, "hole at 4M");
      assert.is(holeAt(ext, 8 * MiB + 4096) & NBD_STATE_ZERO, 0, "data at 8M");
      const one = await c.blockStatus(MiB, 8 * MiB, { reqOne: true });
      const only = one.get("base:allocation")!;
      assert.is(only.length, 1, "REQ_ONE gives one extent");
      assert.ok(only[0]!.length <= 7 * MiB && only[0]!.length > 0, `REQ_ONE extent ${only[0]!.length}`);
      assert.is(only[0]!.flags, NBD_STATE_HOLE | NBD_STATE_ZERO);
      if (name === "qemu-nbd") {
        const depth = (await c.blockStatus(0, 2 * MiB)).get("qemu:allocation-depth")!;
        assert.is(depth[0]!.flags, 1, "local data has depth 1");
      }
    } finally {
      await c.close();
    }
  }));

  test(`${name}: pipelined mixed requests match a local model`, () => deadline(20_000, name, async () => {
    const c = await connect(srv().uri);
    try {
      const model = Buffer.from(image);
      const slot = 64 * 1024;
      const from = 12 * MiB;
      const ops: Promise<unknown>[] = [];
      const reads: [Uint8Array, number][] = [];
      const trimmed: number[] = [];
      for (let i = 0; i < 64; i++) {
        const off = from + i * slot;
        switch (i % 6) {
          case 0: case 1: {
            const d = randomBytes(slot);
            d.copy(model, off);
            ops.push(c.pwrite(d, off, { fua: i % 2 === 1 && c.info.canFua }));
            break;
          }
          case 2:
            model.fill(0, off, off + slot);
            ops.push(c.zero(off, slot, { noHole: i % 4 === 0 }));
            break;
          case 3: {
            const b = new Uint8Array(slot);
            reads.push([b, off]);
            ops.push(c.pread(b, off));
            break;
          }
          case 4:
            trimmed.push(off);
            ops.push(c.trim(off, slot));
            break;
          default:
            ops.push(c.cache(off, slot), c.flush());
        }
      }
      assert.ok(c.inFlight > 32, `pipelined: ${c.inFlight} requests in flight`);
      await Promise.all(ops);
      for (const [b, off] of reads) bytesEqual(b, image.subarray(off, off + slot), `read at ${off}`);
      await c.flush();
      const back = await c.read(from, 4 * MiB);
      for (const off of trimmed) model.copy(back, off - from, off, off + slot); // trimmed contents are unspecified
      bytesEqual(back, model.subarray(from, from + 4 * MiB), "after mixed requests");
      // Restore the region for the other tests.
      await c.zero(from, 4 * MiB);
    } finally {
      await c.close();
    }
  }));
}

test("nbdkit --filter=error: an error chunk fails that request only", () => deadline(20_000, "error", async () => {
  const trigger = join(dir, "error-trigger");
  const { uri } = await nbdkit("err", ["--filter=error", "memory", "4M", "error-pread=EIO", "error-pread-rate=1", `error-pread-file=${trigger}`]);
  const c = await connect(uri);
  try {
    await c.read(0, 4096);
    writeFileSync(trigger, "");
    const e = await rejects(() => c.read(0, 4096), "injected EIO");
    assert.instance(e, NbdRequestError);
    assert.is((e as NbdRequestError).code, "EIO");
    assert.is((e as NbdRequestError).command, "READ");
    assert.ok(c.stats.errorChunks >= 1, "sent as a structured error chunk");
    rmSync(trigger);
    bytesEqual(await c.read(0, 4096), new Uint8Array(4096), "the connection carries on");
  } finally {
    await c.close();
  }
}));

test("nbdkit --filter=blocksize-policy: large requests are split, misaligned ones refused", () => deadline(20_000, "blocksize", async () => {
  const { uri } = await nbdkit("bs", [
    "--filter=blocksize-policy", "memory", "8M", "blocksize-minimum=512", "blocksize-preferred=4096",
    "blocksize-maximum=65536", "blocksize-error-policy=error",
  ]);
  const c = await connect(uri);
  try {
    assert.equal(c.info.blockSize, { minimum: 512, preferred: 4096, maximum: 65536 });
    const data = randomBytes(MiB + 512);
    const before = c.stats.requests;
    await c.pwrite(data, 4096);
    assert.is(c.stats.requests - before, 17, "1 MiB + 512 in 64 KiB requests");
    bytesEqual(await c.read(4096, MiB + 512), data, "read back through split requests");
    for (const p of [() => c.read(100, 512), () => c.read(0, 1000), () => c.zero(512 + 1, 512)]) {
      assert.is(((await rejects(p, "misaligned")) as NbdUsageError).code, "MISALIGNED");
    }
    await c.zero(0, 8 * MiB);
    bytesEqual(await c.read(0, 8192), new Uint8Array(8192));
  } finally {
    await c.close();
  }
}));

test("nbdkit: oldstyle handshake and an unknown export", () => deadline(20_000, "oldstyle", async () => {
  const { uri } = await nbdkit("old", ["-o", "pattern", "1M"]);
  const c = await connect(uri);
  try {
    assert.is(c.style, "oldstyle");
    assert.ok(!c.structured);
    const b = Buffer.from(await c.read(8, 8));
    assert.is(Number(b.readBigUInt64BE(0)), 8, "pattern plugin: each 8 bytes hold their offset");
  } finally {
    await c.close();
  }
  const named = await nbdkit("named", ["--filter=exportname", "memory", "1M", "exportname=a", "exportname-strict=true"]);
  const e = await rejects(() => connect(named.uri.replace(":///", ":///b")), "unknown export");
  assert.instance(e, NbdOptionError);
  assert.is((e as NbdOptionError).code, "ERR_UNKNOWN");
  const ok = await connect(named.uri.replace(":///", ":///a"));
  assert.is(ok.size, MiB);
  await ok.close();
}));

test("a server killed with requests in flight: all of them fail, none hangs", () => deadline(20_000, "killed", async () => {
  const { uri, proc } = await nbdkit("slow", ["--filter=delay", "memory", "1M", "rdelay=10"]);
  const c = await connect(uri, { requestTimeoutMs: 60_000 });
  const ps = Array.from({ length: 16 }, (_, i) => c.read(i * 4096, 4096));
  await Bun.sleep(200);
  proc.kill("SIGKILL");
  const t0 = performance.now();
  for (const p of ps) assert.instance(await rejects(() => p, "read on killed server"), NbdDisconnectedError);
  assert.ok(performance.now() - t0 < 5000, "failed promptly");
}));

test("the image files are what the servers wrote", () => {
  // bun-nbd, nbdkit and qemu-nbd all restored [12M,16M) to zeros; the rest is the original.
  for (const s of servers) bytesEqual(readFileSync(s.img), image, `${s.name} image file`);
});

test.run();

export type { NbdClient };
