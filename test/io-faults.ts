// Failing I/O, injected below an overlay (through its ImageFile seam) and a raw file (its RawIo
// seam), seen over NBD: a failed fdatasync or pwrite reaches the client as EIO on that request, on
// the next FLUSH and on every later write and flush (fsyncgate: once a sync failed, a later one that
// succeeds proves nothing), reads go on, the log says so once, and the image on disk stays usable.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { fdatasyncSync, mkdirSync, readFileSync, writeFileSync, writeSync } from "node:fs";
import { join } from "node:path";
import { bytesEqual, deadline } from "./helpers/assert.ts";
import { need, run, scratch } from "./helpers/env.ts";
import { connect, NbdRequestError, type NbdClient } from "../src/client/index.ts";
import { RawFile, type RawIo } from "../src/devices/file.ts";
import { createOverlayFile, openImage } from "../src/devices/qcow2/index.ts";
import type { ImageFile } from "../src/devices/qcow2/file.ts";
import type { BlockDevice } from "../src/devices/types.ts";
import { silentLogger } from "../src/server/log.ts";
import { NbdServer } from "../src/server/server.ts";
import { assertClean, KiB, makeBase, MiB, qemuCheck, Rng } from "./overlay-support.ts";

const test = suite("io-faults");
const dir = scratch("bun-nbd-io-faults-");

test.before(() => need("qemu-img"));

type Fault = "sync" | "write" | "metadata" | "pool-write";

const injected = (what: string) => Object.assign(new Error(`${what}: EIO (injected)`), { code: "EIO" });

/** Fails the next operation of the armed kind once; a failed sync does not sync (the pages are gone). */
class FaultyFile implements ImageFile {
  armed: Fault | null = null;
  fired = 0;
  constructor(private readonly inner: ImageFile) {}
  private fire(kind: Fault): boolean {
    if (this.armed !== kind) return false;
    this.armed = null;
    this.fired++;
    return true;
  }
  read(buf: Uint8Array, off: number, len: number, pos: number): void { this.inner.read(buf, off, len, pos); }
  write(buf: Uint8Array, off: number, len: number, pos: number): void {
    if (this.fire("write")) throw injected("pwrite");
    this.inner.write(buf, off, len, pos);
  }
  writeAll(buf: Uint8Array, pos: number): void {
    if (this.fire("metadata")) throw injected("pwrite");
    this.inner.writeAll(buf, pos);
  }
  syncNow(): void {
    if (this.fire("sync")) throw injected("fdatasync");
    this.inner.syncNow();
  }
  sync(): Promise<void> {
    if (this.fire("sync")) return Promise.reject(injected("fdatasync"));
    return this.inner.sync();
  }
  size(): number { return this.inner.size(); }
  truncate(len: number): void { this.inner.truncate(len); }
  punch(pos: number, len: number): void { this.inner.punch(pos, len); }
  close(): void { this.inner.close(); }
}

/** The same for a raw file's system calls. */
class FaultyIo implements RawIo {
  armed: Fault | null = null;
  fired = 0;
  pwrite(fd: number, buf: Uint8Array, off: number, len: number, pos: number): number {
    if (this.armed === "write") { this.armed = null; this.fired++; throw injected("pwrite"); }
    return writeSync(fd, buf, off, len, pos);
  }
  pwriteAsync(fd: number, buf: Uint8Array, off: number, len: number, pos: number): Promise<number> {
    if (this.armed === "write" || this.armed === "pool-write") { this.armed = null; this.fired++; return Promise.reject(injected("pwrite")); }
    return Promise.resolve(writeSync(fd, buf, off, len, pos));
  }
  fdatasync(fd: number): Promise<void> {
    if (this.armed === "sync") { this.armed = null; this.fired++; return Promise.reject(injected("fdatasync")); }
    fdatasyncSync(fd);
    return Promise.resolve();
  }
  fdatasyncNow(fd: number): void {
    if (this.armed === "sync") { this.armed = null; this.fired++; throw injected("fdatasync"); }
    fdatasyncSync(fd);
  }
}

async function expectEio(p: Promise<unknown>, what: string): Promise<void> {
  try {
    await p;
  } catch (e) {
    assert.ok(e instanceof NbdRequestError, `${what}: ${(e as Error).message}`);
    assert.is((e as NbdRequestError).code, "EIO", `${what}: ${(e as Error).message}`);
    return;
  }
  assert.unreachable(`${what}: expected EIO`);
}

async function withServer(d: string, device: BlockDevice, fn: (c: NbdClient) => Promise<void>): Promise<void> {
  const server = new NbdServer([{ name: "x", device }], { log: silentLogger });
  const sock = join(d, "sock");
  server.listenUnix(sock);
  try {
    const c = await connect(`nbd+unix:///x?socket=${sock}`);
    await fn(c);
    await c.close();
  } finally {
    await server.close(); // must not hang or throw on a failed device, and must close its files
  }
}

/**
 * The common script: data flushed before the fault, more data written, the fault armed, then
 * `trigger` must fail with EIO, and so must the next FLUSH, a later FLUSH (the disk is fine again
 * by then), writes, zeroes, trims and FUA writes; reads go on. Returns what was durable.
 */
async function script(c: NbdClient, size: number, before: Uint8Array, arm: () => void, trigger: (c: NbdClient) => Promise<unknown>,
  logs: string[], what: string): Promise<{ durable: Uint8Array; after: [number, Uint8Array][] }> {
  const rng = new Rng(size + what.length);
  const durable = before.slice();
  const a = rng.bytes(100 * KiB);
  await c.pwrite(a, 3 * MiB + 5);
  durable.set(a, 3 * MiB + 5);
  await c.flush();
  const b = rng.bytes(70 * KiB);
  await c.pwrite(b, MiB + 7);
  arm();
  await expectEio(trigger(c), `${what}: the request that met the fault`);
  await expectEio(c.flush(), `${what}: the next FLUSH`);
  await expectEio(c.flush(), `${what}: a later FLUSH (the storage works again, but pages may have been dropped)`);
  await expectEio(c.pwrite(rng.bytes(4 * KiB), 5 * MiB), `${what}: a later WRITE`);
  await expectEio(c.pwrite(rng.bytes(4 * KiB), 5 * MiB, { fua: true }), `${what}: a later FUA WRITE`);
  await expectEio(c.zero(6 * MiB, 64 * KiB), `${what}: a later WRITE_ZEROES`);
  await expectEio(c.trim(6 * MiB, 64 * KiB), `${what}: a later TRIM`);
  const now = await c.read(0, size);
  bytesEqual(now.subarray(3 * MiB + 5, 3 * MiB + 5 + a.length), a, `${what}: flushed data reads back`);
  const said = logs.filter((l) => /fail with EIO/.test(l));
  assert.is(said.length, 1, `${what}: the log says once that writes and flushes now fail: ${logs.join(" | ")}`);
  // after the fault, the ranges written since the last good flush hold old or new bytes
  return { durable, after: [[MiB + 7, b], [7 * MiB, TRIGGER_DATA]] };
}

/** Bytes equal to `durable`, except in the `maybe` ranges, whose bytes may be old or new. */
function checkContent(now: Uint8Array, durable: Uint8Array, maybe: [number, Uint8Array][], what: string): void {
  const copy = now.slice();
  for (const [off, b] of maybe) {
    for (let i = 0; i < b.length; i++) {
      const v = now[off + i];
      if (v !== durable[off + i] && v !== b[i]) assert.unreachable(`${what}: byte ${off + i} is neither old nor new`);
    }
    copy.set(durable.subarray(off, off + b.length), off);
  }
  bytesEqual(copy, durable, what);
}

/** What the request that meets the fault writes (at 7 MiB). */
const TRIGGER_DATA = new Uint8Array(8 * KiB).fill(9);

const overlayFaults: { fault: Fault; what: string; trigger: (c: NbdClient) => Promise<unknown> }[] = [
  { fault: "sync", what: "fdatasync fails during FLUSH", trigger: (c) => c.flush() },
  { fault: "sync", what: "fdatasync fails during a FUA write", trigger: (c) => c.pwrite(TRIGGER_DATA, 7 * MiB, { fua: true }) },
  { fault: "write", what: "pwrite of guest data fails", trigger: (c) => c.pwrite(TRIGGER_DATA, 7 * MiB) },
  { fault: "metadata", what: "pwrite of metadata fails during FLUSH", trigger: (c) => c.flush() },
];

for (const compat of [false, true]) {
  for (const f of overlayFaults) {
    test(`overlay (${compat ? "standard" : "extended"} L2): ${f.what}`, () => deadline(60_000, f.what, async () => {
      const d = join(dir, `ov-${compat}-${f.fault}-${f.what.length}`);
      mkdirSync(d, { recursive: true });
      const size = 8 * MiB;
      const basePath = join(d, "base.img");
      const base = makeBase(basePath, size, 3);
      const ov = join(d, "ov.qcow2");
      createOverlayFile(ov, basePath, { compat });
      const logs: string[] = [];
      let faulty: FaultyFile | null = null;
      const img = openImage(ov, { readOnly: false, lock: true, log: (m) => logs.push(m), wrapFile: (f0) => (faulty = new FaultyFile(f0)) });
      let result: Awaited<ReturnType<typeof script>> | null = null;
      await withServer(d, img, async (c) => {
        result = await script(c, size, base, () => { faulty!.armed = f.fault; }, f.trigger, logs, f.what);
      });
      assert.is(faulty!.fired, 1, "the fault was met");
      // What is on disk is the last good flush, plus at most leaked clusters (a sync that failed
      // between the two phases): the next read-write open repairs them.
      const chk = await qemuCheck(ov);
      assert.ok(chk.code === 0 || chk.code === 3, `qemu-img check after the failure: exit ${chk.code} ${JSON.stringify(chk.json)}`);
      const again = openImage(ov, { readOnly: false, lock: true, log: () => {} });
      await again.close();
      await assertClean(ov, "after a read-write open");
      const raw = join(d, "now.raw");
      await run(["qemu-img", "convert", "-O", "raw", ov, raw]);
      checkContent(new Uint8Array(readFileSync(raw)), result!.durable, result!.after, `${f.what}: content on disk`);
    }));
  }
}

const rawFaults: { fault: Fault; what: string; trigger: (c: NbdClient) => Promise<unknown> }[] = [
  { fault: "sync", what: "fdatasync fails during FLUSH", trigger: (c) => c.flush() },
  { fault: "sync", what: "fdatasync fails during a FUA write", trigger: (c) => c.pwrite(TRIGGER_DATA, 7 * MiB, { fua: true }) },
  { fault: "write", what: "pwrite fails", trigger: (c) => c.pwrite(TRIGGER_DATA, 7 * MiB) },
  { fault: "pool-write", what: "a large pwrite on the thread pool fails", trigger: (c) => c.pwrite(new Uint8Array(256 * KiB).fill(9), 7 * MiB) },
  { fault: "pool-write", what: "a large FUA pwrite on the thread pool fails", trigger: (c) => c.pwrite(new Uint8Array(256 * KiB).fill(9), 7 * MiB, { fua: true }) },
];

for (const f of rawFaults) {
  test(`raw file: ${f.what}`, () => deadline(60_000, f.what, async () => {
    const d = join(dir, `raw-${f.fault}-${f.what.length}`);
    mkdirSync(d, { recursive: true });
    const size = 8 * MiB;
    const path = join(d, "disk.img");
    const before = new Rng(5).bytes(size);
    writeFileSync(path, before);
    const logs: string[] = [];
    const io = new FaultyIo();
    const dev = RawFile.open(path, { io, log: (m) => logs.push(m) });
    let result: Awaited<ReturnType<typeof script>> | null = null;
    await withServer(d, dev, async (c) => {
      result = await script(c, size, before, () => { io.armed = f.fault; }, f.trigger, logs, f.what);
    });
    assert.is(io.fired, 1, "the fault was met");
    checkContent(new Uint8Array(readFileSync(path)), result!.durable, result!.after, `${f.what}: content on disk`);
  }));
}

/** A disk whose fdatasync takes `ms` (on the thread pool, as the real one runs). */
class SlowSyncIo implements RawIo {
  syncs = 0;
  constructor(private readonly ms: number) {}
  pwrite(fd: number, buf: Uint8Array, off: number, len: number, pos: number): number { return writeSync(fd, buf, off, len, pos); }
  fdatasync(fd: number): Promise<void> {
    this.syncs++;
    return new Promise((resolve) => setTimeout(() => { fdatasyncSync(fd); resolve(); }, this.ms));
  }
  fdatasyncNow(fd: number): void { fdatasyncSync(fd); }
}

/** A disk under writeback pressure: a large write (on the thread pool, as the real ones run) takes `ms`. */
class SlowWriteIo implements RawIo {
  largeWrites = 0;
  constructor(private readonly ms: number) {}
  pwrite(fd: number, buf: Uint8Array, off: number, len: number, pos: number): number { return writeSync(fd, buf, off, len, pos); }
  pwriteAsync(fd: number, buf: Uint8Array, off: number, len: number, pos: number): Promise<number> {
    this.largeWrites++;
    return new Promise((resolve) => setTimeout(() => resolve(writeSync(fd, buf, off, len, pos)), this.ms));
  }
  fdatasync(fd: number): Promise<void> { fdatasyncSync(fd); return Promise.resolve(); }
  fdatasyncNow(fd: number): void { fdatasyncSync(fd); }
}

test("raw file: a large WRITE that sleeps runs off the event loop (another client's reads are answered meanwhile); close waits for it", () => deadline(30_000, "slow write", async () => {
  const d = join(dir, "slow-write");
  mkdirSync(d, { recursive: true });
  const path = join(d, "disk.img");
  writeFileSync(path, new Uint8Array(2 * MiB).fill(7));
  const io = new SlowWriteIo(600);
  const dev = RawFile.open(path, { io });
  const server = new NbdServer([{ name: "x", device: dev }], { log: silentLogger });
  const sock = join(d, "sock");
  server.listenUnix(sock);
  let late: Promise<unknown> | null = null;
  try {
    const writer = await connect(`nbd+unix:///x?socket=${sock}`);
    const reader = await connect(`nbd+unix:///x?socket=${sock}`);
    const t0 = performance.now();
    let wrote = 0;
    const big = writer.pwrite(new Uint8Array(MiB).fill(9), 0).then(() => { wrote = performance.now() - t0; });
    // sent after it and overlapping it: applied after it, though it is small and the big one sleeps
    let smallDone = false;
    const small = writer.pwrite(new Uint8Array(4096).fill(6), 8192).then(() => { smallDone = true; });
    for (let i = 0; i < 20; i++) bytesEqual(await reader.read(MiB + i * 4096, 4096), new Uint8Array(4096).fill(7), `read ${i}`);
    // answered while the write still sleeps: the event loop was free (no timing needed to tell)
    assert.is(wrote, 0, "the write is still sleeping after 20 reads were answered");
    assert.is(smallDone, false, "the overlapping small write waits for the big one");
    await big;
    await small;
    assert.ok(wrote > 0);
    bytesEqual(await reader.read(8192, 4096), new Uint8Array(4096).fill(6), "requests apply in the order they came");
    bytesEqual(await reader.read(0, 4096), new Uint8Array(4096).fill(9), "the write is read back once answered");
    bytesEqual(await writer.read(4096, 4096), new Uint8Array(4096).fill(9), "through its own connection too");
    assert.is(io.largeWrites, 1, "one write of 1 MiB on the thread pool");
    // small writes stay synchronous
    await writer.pwrite(new Uint8Array(4096).fill(4), MiB);
    assert.is(io.largeWrites, 1, "a 4 KiB write did not go to the thread pool");
    late = writer.pwrite(new Uint8Array(256 * KiB).fill(5), MiB + 65536);
    await Bun.sleep(50);
    await writer.close().catch(() => {});
    await reader.close();
  } finally {
    await server.close(2000); // the device's close waits for the write still sleeping
  }
  await late?.catch(() => {});
  const back = readFileSync(path);
  assert.is(back[0], 9);
  assert.is(back[MiB], 4);
  assert.is(back[MiB + 65536], 5, "the write under way when the server closed reached the file");
}));

test("raw file: a slow FLUSH runs off the event loop (another client's reads are answered meanwhile); close waits for it", () => deadline(30_000, "slow flush", async () => {
  const d = join(dir, "slow-flush");
  mkdirSync(d, { recursive: true });
  const path = join(d, "disk.img");
  writeFileSync(path, new Uint8Array(MiB).fill(7));
  const io = new SlowSyncIo(600);
  const dev = RawFile.open(path, { io });
  const server = new NbdServer([{ name: "x", device: dev }], { log: silentLogger });
  const sock = join(d, "sock");
  server.listenUnix(sock);
  try {
    const writer = await connect(`nbd+unix:///x?socket=${sock}`);
    const reader = await connect(`nbd+unix:///x?socket=${sock}`);
    await writer.pwrite(new Uint8Array(4096).fill(9), 0);
    const t0 = performance.now();
    let flushed = 0;
    const flush = writer.flush().then(() => { flushed = performance.now() - t0; });
    for (let i = 0; i < 20; i++) bytesEqual(await reader.read(65536 + i * 4096, 4096), new Uint8Array(4096).fill(7), `read ${i}`);
    const readsTook = performance.now() - t0;
    assert.is(flushed, 0, "the flush is still running");
    assert.ok(readsTook < 400, `20 reads while the flush runs took ${readsTook.toFixed(0)} ms`);
    await flush;
    assert.ok(flushed >= 550, `the flush took its time (${flushed.toFixed(0)} ms)`);
    const fua = writer.pwrite(new Uint8Array(4096).fill(3), 8192, { fua: true });
    await Bun.sleep(50);
    await writer.close();
    await reader.close();
    await fua.catch(() => {});
    assert.ok(io.syncs >= 2, `FLUSH and the FUA write each synced (${io.syncs}; the disconnect flush may add one)`);
  } finally {
    await server.close(2000); // waits for the FUA write's sync before closing the file
  }
  const back = readFileSync(path);
  assert.is(back[0], 9);
  assert.is(back[8192], 3);
}));

test.run();
