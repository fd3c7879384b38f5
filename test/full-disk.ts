// Full disks: an overlay (extended and standard L2, 64 KiB and small clusters, so that new L2 tables
// are needed too) and a sparse raw file on a size-limited tmpfs, served next to another export on
// the ordinary disk. A write that cannot be allocated fails with ENOSPC, nothing leaks (qemu-img
// check stays clean), reads and the other export keep working, and writes succeed once space is
// freed. A remote image whose cache directory is full is served without keeping what it fetches.
// Needs root for `mount -t tmpfs`; skips with a message where mounting is refused.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { closeSync, ftruncateSync, mkdirSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from "node:fs";
import { join } from "node:path";
import { bytesEqual, deadline } from "./helpers/assert.ts";
import { need, run, scratch } from "./helpers/env.ts";
import { connect, NbdRequestError, type NbdClient } from "../src/client/index.ts";
import { RawFile } from "../src/devices/file.ts";
import { createOverlayFile, openOverlay, type Qcow2Overlay } from "../src/devices/qcow2/index.ts";
import type { BlockDevice } from "../src/devices/types.ts";
import { createLogger } from "../src/server/log.ts";
import { NbdServer } from "../src/server/server.ts";
import { assertIdentical, KiB, makeBase, MiB, Rng } from "./overlay-support.ts";
import { logSink, makeImage } from "./helpers/remote-images.ts";
import { startNginx } from "./services/nginx.ts";
import { openRemoteImage } from "../src/devices/remote/index.ts";

const test = suite("full-disk");
const dir = scratch("bun-nbd-full-disk-");

test.before(() => need("qemu-img"));

/** Mount a tmpfs of `bytes` at `at`; false (with the reason printed) where that is refused. */
async function mountTmpfs(at: string, bytes: number): Promise<boolean> {
  mkdirSync(at, { recursive: true });
  const r = await run(["mount", "-t", "tmpfs", "-o", `size=${bytes}`, "tmpfs", at]);
  if (r.code !== 0) {
    console.log(`  skipped: mount -t tmpfs refused (${(r.stderr || r.stdout).trim()}); these tests need root`);
    return false;
  }
  return true;
}

async function unmount(at: string): Promise<void> {
  await run(["umount", at]);
}

/** Fill the file system holding `path` until a write fails with ENOSPC, leaving about `leave` bytes. */
function fill(path: string, leave = 0): void {
  const fd = openSync(path, "a");
  try {
    const chunk = new Uint8Array(4 * KiB).fill(0x5a);
    const big = new Uint8Array(256 * KiB).fill(0x5a);
    let pos = 0;
    const st = () => { const s = Bun.spawnSync(["stat", "-f", "-c", "%a %S", path]).stdout.toString().trim().split(" "); return Number(s[0]) * Number(s[1]); };
    try {
      while (st() - big.length > leave) pos += writeSync(fd, big, 0, big.length, pos);
      while (st() - chunk.length >= leave) pos += writeSync(fd, chunk, 0, chunk.length, pos);
      if (leave === 0) for (;;) pos += writeSync(fd, chunk, 0, chunk.length, pos);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "ENOSPC") throw e;
    }
  } finally {
    closeSync(fd);
  }
}

async function expectErrno(p: Promise<unknown>, code: string, what: string): Promise<void> {
  try {
    await p;
  } catch (e) {
    assert.ok(e instanceof NbdRequestError, `${what}: ${(e as Error).message}`);
    assert.is((e as NbdRequestError).code, code, `${what}: ${(e as Error).message}`);
    return;
  }
  assert.unreachable(`${what}: expected ${code}`);
}

/** Every byte of `now` equals `expected`, or (inside [from, to)) the old or the new value. */
function oldOrNew(now: Uint8Array, old: Uint8Array, neu: Uint8Array, from: number, to: number, what: string): void {
  for (let i = from; i < to; i++) {
    if (now[i] !== old[i] && now[i] !== neu[i - from]) assert.unreachable(`${what}: byte ${i} is ${now[i]}, neither old ${old[i]} nor new ${neu[i - from]}`);
  }
}

/** qemu-img check of an overlay the server still holds (-U): 0 = clean, 3 = leaked clusters. */
async function checkWhileServed(ov: string, what: string): Promise<void> {
  const r = await run(["qemu-img", "check", "-U", "--output=json", ov]);
  assert.is(r.code, 0, `${what}: qemu-img check exit ${r.code}: ${r.stdout}${r.stderr}`);
}

interface Served { server: NbdServer; sock: string; logs: string[] }

function serveInProcess(d: string, exports: { name: string; device: BlockDevice }[]): Served {
  const logs: string[] = [];
  const server = new NbdServer(exports, { log: createLogger("info", (l) => logs.push(l)) });
  const sock = join(d, "sock");
  server.listenUnix(sock);
  return { server, sock, logs };
}

const uri = (s: Served, name: string) => `nbd+unix:///${name}?socket=${s.sock}`;

/** The other export, on the ordinary disk: it must not notice the full tmpfs. */
async function otherExportWorks(b: NbdClient, rng: Rng, other: Uint8Array): Promise<void> {
  const off = rng.int(other.length - 64 * KiB);
  const data = rng.bytes(64 * KiB);
  await b.pwrite(data, off);
  await b.flush();
  other.set(data, off);
  bytesEqual(await b.read(0, other.length), other, "the other export");
}

const variants = [
  { name: "extended L2, 64 KiB clusters", compat: false, clusterBits: 16 },
  { name: "standard L2, 64 KiB clusters", compat: true, clusterBits: 16 },
  { name: "extended L2, 16 KiB clusters (16 MiB per L2 table)", compat: false, clusterBits: 14 },
  { name: "standard L2, 4 KiB clusters (2 MiB per L2 table)", compat: true, clusterBits: 12 },
];

for (const v of variants) {
  test(`overlay on a full tmpfs: ${v.name}`, () => deadline(120_000, v.name, async () => {
    const d = join(dir, `ov-${v.compat ? "std" : "ext"}-${v.clusterBits}`);
    const mnt = join(d, "tmpfs");
    if (!await mountTmpfs(mnt, 3 * MiB)) return;
    let served: Served | null = null;
    try {
      const size = 40 * MiB;
      const basePath = join(d, "base.img");
      const base = makeBase(basePath, size, v.clusterBits);
      const expected = base.slice();
      const ov = join(mnt, "ov.qcow2");
      createOverlayFile(ov, basePath, { compat: v.compat, clusterBits: v.clusterBits });
      const otherPath = join(d, "other.img");
      const other = new Rng(7).bytes(4 * MiB);
      writeFileSync(otherPath, other);
      const devLogs: string[] = [];
      const device = await openOverlay({ base: basePath, overlay: ov, log: (m) => devLogs.push(m) });
      served = serveInProcess(d, [{ name: "ov", device }, { name: "other", device: RawFile.open(otherPath) }]);
      const a = await connect(uri(served, "ov"));
      const b = await connect(uri(served, "other"));
      const rng = new Rng(v.clusterBits * 31 + (v.compat ? 1 : 0));
      const cs = 2 ** v.clusterBits;
      // written while there is room: one write per 4 MiB, so new L2 tables are made with small clusters
      const early: number[] = [];
      for (let p = 0; p < size; p += 4 * MiB) {
        const off = p + rng.int(MiB);
        const data = rng.bytes(3000);
        await a.pwrite(data, off);
        expected.set(data, off);
        early.push(off);
      }
      await a.flush();

      // Nothing can be allocated: a write into a fresh cluster, and (between the 4 MiB steps, with
      // small clusters) one that needs a new L2 table, fail with ENOSPC.
      writeFileSync(join(mnt, "reserve"), new Uint8Array(160 * KiB).fill(1));
      fill(join(mnt, "filler"));
      const fresh = [6 * MiB + 3 * cs + 100, 30 * MiB + 5 * cs, 38 * MiB + 1];
      for (const off of fresh) {
        await expectErrno(a.pwrite(rng.bytes(Math.min(2000, cs)), off), "ENOSPC", `a write at ${off} on a full tmpfs`);
      }
      // Rewriting what is already allocated needs no space.
      const again = rng.bytes(1000);
      await a.pwrite(again, early[1]! + 500);
      expected.set(again, early[1]! + 500);
      await a.flush(); // nothing to regret: the flush succeeds
      await checkWhileServed(ov, "after writes failed on a full tmpfs");
      // (qemu-img does not count leaks past the end of the file: our own scan does)
      const scan = (device as Qcow2Overlay).scan(false);
      assert.equal([scan.leaks, scan.errors], [0, []], "our scan: no leaks, no errors");
      bytesEqual(await a.read(0, size), expected, "overlay read back on a full tmpfs");

      // A big write that runs out of space half-way: the clusters it got stay linked, the rest
      // fails; its bytes are old or new, and nothing leaks.
      rmSync(join(mnt, "reserve"));
      const bigOff = 2 * MiB + 12345;
      const big = rng.bytes(MiB);
      await expectErrno(a.pwrite(big, bigOff), "ENOSPC", "a 1 MiB write into 160 KiB of free space");
      await a.flush();
      await checkWhileServed(ov, "after a write ran out of space half-way");
      const now = await a.read(0, size);
      const bigOld = expected.slice(bigOff, bigOff + big.length);
      oldOrNew(now.subarray(bigOff, bigOff + big.length), bigOld, big, 0, big.length, "the write that ran out of space");
      now.set(bigOld, bigOff); // compared above
      bytesEqual(now, expected, "overlay read back on a full tmpfs (except the half-done write)");
      await otherExportWorks(b, rng, other);

      // Room again: the same writes succeed.
      rmSync(join(mnt, "filler"));
      await a.pwrite(big, bigOff);
      expected.set(big, bigOff);
      for (const off of fresh) {
        const data = rng.bytes(Math.min(2000, cs));
        await a.pwrite(data, off);
        expected.set(data, off);
      }
      await a.flush();
      bytesEqual(await a.read(0, size), expected, "overlay read back after space was freed");
      await otherExportWorks(b, rng, other);
      await a.close();
      await b.close();
      await served.server.close();
      served = null;
      assert.not.ok(devLogs.some((m) => /fail with EIO/.test(m)), `a full disk does not put the overlay in the failed state: ${devLogs.join("; ")}`);
      const fin = await run(["qemu-img", "check", "--output=json", ov]);
      assert.is(fin.code, 0, `qemu-img check after closing: ${fin.stdout}${fin.stderr}`);
      writeFileSync(join(d, "expected.raw"), expected);
      await assertIdentical(ov, join(d, "expected.raw"), "overlay vs expected");
    } finally {
      if (served) await served.server.close();
      await unmount(mnt);
    }
  }));
}

test("sparse raw file on a full tmpfs: ENOSPC into holes, reads and the other export go on, writes succeed once space is freed", () => deadline(60_000, "raw", async () => {
  const d = join(dir, "raw");
  const mnt = join(d, "tmpfs");
  if (!await mountTmpfs(mnt, 2 * MiB)) return;
  let served: Served | null = null;
  try {
    const size = 16 * MiB;
    const path = join(mnt, "disk.img");
    const fd = openSync(path, "w");
    ftruncateSync(fd, size); // sparse: far bigger than the tmpfs
    closeSync(fd);
    const expected = new Uint8Array(size);
    const otherPath = join(d, "other.img");
    const other = new Rng(8).bytes(4 * MiB);
    writeFileSync(otherPath, other);
    served = serveInProcess(d, [
      { name: "raw", device: RawFile.open(path, { log: () => {} }) },
      { name: "other", device: RawFile.open(otherPath) },
    ]);
    const a = await connect(uri(served, "raw"));
    const b = await connect(uri(served, "other"));
    const rng = new Rng(99);
    const first = rng.bytes(256 * KiB);
    await a.pwrite(first, MiB);
    expected.set(first, MiB);
    await a.flush();
    fill(join(mnt, "filler"));
    const failed = rng.bytes(64 * KiB);
    await expectErrno(a.pwrite(failed, 8 * MiB), "ENOSPC", "a write into a hole on a full tmpfs");
    await expectErrno(a.zero(10 * MiB, 64 * KiB, { noHole: true }), "ENOSPC", "zeroes that must allocate on a full tmpfs");
    const over = rng.bytes(4 * KiB);
    await a.pwrite(over, MiB + 8 * KiB); // already allocated: fine
    expected.set(over, MiB + 8 * KiB);
    await a.flush();
    const now = await a.read(0, size);
    // the failed write may have filled part of its range before the disk was full
    oldOrNew(now, expected, failed, 8 * MiB, 8 * MiB + failed.length, "the write that failed");
    now.fill(0, 8 * MiB, 8 * MiB + failed.length);
    bytesEqual(now, expected, "raw file read back on a full tmpfs");
    await otherExportWorks(b, rng, other);
    rmSync(join(mnt, "filler"));
    const later = rng.bytes(64 * KiB);
    await a.pwrite(later, 8 * MiB);
    expected.set(later, 8 * MiB);
    await a.zero(10 * MiB, 64 * KiB, { noHole: true });
    await a.flush();
    bytesEqual(await a.read(0, size), expected, "raw file after space was freed");
    await a.close();
    await b.close();
    await served.server.close();
    served = null;
    bytesEqual(new Uint8Array(readFileSync(path)), expected, "the file itself");
  } finally {
    if (served) await served.server.close();
    await unmount(mnt);
  }
}));

test("a remote image whose cache is on a full tmpfs: every read right, served without keeping, each block fetched once, the log says why", () => deadline(60_000, "remote", async () => {
  need("nginx");
  const d = join(dir, "remote");
  const mnt = join(d, "tmpfs");
  if (!await mountTmpfs(mnt, 2 * MiB)) return;
  const ngx = await startNginx();
  let served: Served | null = null;
  try {
    const size = 16 * MiB;
    const image = readFileSync(makeImage(join(ngx.root, "disk.img"), size, 5));
    const logs = logSink();
    const device = await openRemoteImage(ngx.url("disk.img"), { cacheDir: join(mnt, "cache"), readahead: 0 }, logs.log);
    fill(join(mnt, "filler")); // after the cache entry exists: every block write now fails
    served = serveInProcess(d, [{ name: "remote", device }]);
    const a = await connect(uri(served, "remote"));
    for (let off = 0; off < size; off += MiB) bytesEqual(await a.read(off, MiB), image.subarray(off, off + MiB), `MiB ${off / MiB}`);
    assert.ok(logs.has(/cannot write: .*serving without caching/), logs.lines.join("\n"));
    await Bun.sleep(200); // nginx logs each GET just after answering it
    const gets = ngx.rangeGets("/disk.img");
    assert.ok(gets <= size / MiB + 1, `${gets} GETs for ${size / MiB} blocks: each fetched once, not again for a copy`);
    assert.is(device.blocks.used, 0, "nothing is held");
    bytesEqual(await a.read(3 * MiB + 100, 5000), image.subarray(3 * MiB + 100, 3 * MiB + 5100), "a small read, fetched again");
    await a.close();
  } finally {
    if (served) await served.server.close();
    await ngx.stop();
    await unmount(mnt);
  }
}));

test.run();
