// Regression tests for what the fuzzer (test/fuzz/) found: one test per bug, each with the smallest
// input that showed it. Run alone with: bun x --bun uvu test "fuzz-regressions\.ts$"
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { NBD_OPT_GO, NBD_OPT_LIST, NBD_REP_ACK, NBD_REP_ERR_INVALID } from "../src/protocol/constants.ts";
import { MemoryDevice } from "../src/devices/memory.ts";
import { parseCue } from "../src/devices/cd/cue.ts";
import { ccdTrackEnd, parseCcd } from "../src/devices/cd/ccd.ts";
import { openImage, Qcow2Error } from "../src/devices/qcow2/index.ts";
import { writeNewImage } from "../src/devices/qcow2/format.ts";
import { closeSync, openSync, readFileSync, truncateSync, writeFileSync, writeSync } from "node:fs";
import { join } from "node:path";
import { need, runOk, scratch } from "./helpers/env.ts";
import { serve } from "./helpers/server.ts";
import { openExports } from "../src/devices/open.ts";
import { CMD, Wire, request as rawRequest } from "./robustness-wire.ts";
import { deadline } from "./helpers/assert.ts";
import { cat, clientFlags, fakeSession, option, parseServer } from "./helpers/wire.ts";

const test = suite("fuzz regressions");
const MiB = 1024 * 1024;

test("an option dribbled in one byte at a time is buffered in linear time (was quadratic: a CPU DoS)", () => deadline(10_000, "dribbled option", async () => {
  // A 512 KiB GO option (its name length lies), then LIST, fed byte by byte. The handshake used to
  // copy everything pending on every chunk: 512 Ki chunks x 256 KiB = 128 GiB of copying.
  const { t, s } = fakeSession([{ name: "disk", device: new MemoryDevice(MiB) }]);
  const data = new Uint8Array(512 * 1024).fill(0x61);
  const input = cat(clientFlags(), option(NBD_OPT_GO, data), option(NBD_OPT_LIST));
  for (let i = 0; i < input.length; i++) {
    s.onData(input.subarray(i, i + 1));
    if (i % 4096 === 0) await new Promise((r) => setImmediate(r)); // let the deadline fire
  }
  const replies = parseServer(t.bytes()).filter((m) => m.kind === "optreply");
  assert.equal(replies.map((m) => m.kind === "optreply" && [m.option, m.type]).slice(0, 1), [[NBD_OPT_GO, NBD_REP_ERR_INVALID]]);
  assert.equal(replies.at(-1)!.kind === "optreply" && replies.at(-1)!.type, NBD_REP_ACK);
}));

test("CUE: a file's last track without INDEX 01 is refused at the next FILE line (was a TypeError when laid out)", () => {
  const sheet = 'FILE "a.bin" BINARY\n  TRACK 01 MODE1/2352\nFILE "b.bin" BINARY\n  TRACK 02 MODE1/2352\n    INDEX 01 00:00:00\n';
  assert.throws(() => parseCue(new TextEncoder().encode(sheet), "x.cue"), /x\.cue:2: TRACK 01 has no INDEX 01/);
});

test("a client that resets the connection while large READs go out with sendfile is not an error (was EPIPE -> EIO, logged as an error)", () => deadline(60_000, "reset during sendfile", async () => {
  const d = scratch("bun-nbd-fuzzreg-sf-");
  const img = join(d, "disk.img");
  writeFileSync(img, "");
  truncateSync(img, 64 * MiB);
  const srv = await serve(["-q", img]);
  try {
    for (let round = 0; round < 20; round++) {
      const w = await Wire.open({ port: srv.port });
      await w.hello();
      await w.go("disk");
      const reqs: Buffer[] = [];
      for (let i = 0; i < 16; i++) reqs.push(rawRequest(CMD.READ, BigInt(i), i * MiB, MiB));
      w.write(Buffer.concat(reqs));
      await new Promise((r) => setTimeout(r, round % 4));
      w.sock.resetAndDestroy();
    }
    await new Promise((r) => setTimeout(r, 500));
    assert.is(srv.proc.exitCode, null, "the server is still running");
    const errors = srv.output().split("\n").filter((l) => / error: /.test(l));
    assert.equal(errors, [], "no error logged for a client's hang-up");
  } finally {
    await srv.stop();
  }
}));

test("CloneCD: a lead-out before the last track's start is refused (was an export of negative size)", () => {
  const entry = (n: number, point: string, lba: number) => `[Entry ${n}]\nSession=1\nPoint=${point}\nADR=0x01\nControl=0x04\nPLBA=${lba}\n`;
  const ccd = `[CloneCD]\nVersion=3\n${entry(0, "0xa2", 6)}${entry(1, "0x01", 0)}${entry(2, "0x02", 40)}[TRACK 1]\nMODE=1\n[TRACK 2]\nMODE=1\n`;
  const sheet = parseCcd(new TextEncoder().encode(ccd), "x.ccd");
  const img = { path: "x.img", label: "x.img", size: 60 * 2352, fd: -1 };
  assert.is(ccdTrackEnd(sheet, 0, img, "x.ccd"), 40);
  assert.throws(() => ccdTrackEnd(sheet, 1, img, "x.ccd"), /x\.ccd: the lead-out of session 1 \(LBA 6\) is not after track 2's INDEX 1 \(LBA 40\)/);
});

test("xz: a corrupt block header fails that block's reads with EIO naming the file (was a bare Error, not remembered as damaged)", async () => {
  need("xz");
  const d = scratch("bun-nbd-fuzzreg-xz-");
  const raw = join(d, "disk.img");
  writeFileSync(raw, new Uint8Array(MiB).map((_, i) => (i >> 9) & 255));
  const xz = join(d, "disk.img.xz");
  await runOk(["sh", "-c", `xz -c --block-size=65536 ${raw} > ${xz}`]);
  // xz --robot -lvv lists each block: "block", stream, number in stream, number in file, compressed offset, ...
  const list = (await runOk(["xz", "--robot", "-lvv", xz])).stdout.split("\n").map((l) => l.split("\t"));
  const second = Number(list.find((f) => f[0] === "block" && f[3] === "2")![4]);
  const b = readFileSync(xz);
  b[second + 2] = b[second + 2]! ^ 0xff; // inside the block header: its CRC32 no longer matches
  writeFileSync(xz, b);
  const [exp] = await openExports([xz], { readOnly: true, log: () => {} });
  try {
    exp!.device.pread(new Uint8Array(65536), 0, 0); // block 1 is fine
    for (let k = 0; k < 2; k++) {
      let err: unknown = null;
      try { exp!.device.pread(new Uint8Array(4096), 65536, 0); } catch (e) { err = e; }
      assert.ok(err instanceof Error, "block 2 cannot be read");
      assert.is((err as { code?: string }).code, "EIO");
      assert.match((err as Error).message, /disk\.img\.xz: bytes 65536-131071 cannot be decoded/);
    }
  } finally {
    await exp!.device.close?.();
  }
});

// ---- qcow2 overlays: hostile headers and tables must be refused cleanly, legit large ones opened.

const dir = scratch("bun-nbd-fuzzreg-");
writeFileSync(join(dir, "base.img"), new Uint8Array(MiB).fill(3));

/** A fresh standard-L2 overlay (4 KiB clusters) over base.img with `patch` applied at byte offsets. */
function hostileOverlay(name: string, patch: [number, number[]][]): string {
  const path = join(dir, name);
  const fd = openSync(path, "w+");
  writeNewImage(fd, path, { size: MiB, backingName: "base.img", compat: true, clusterBits: 12 });
  for (const [at, bytes] of patch) writeSync(fd, Uint8Array.from(bytes), 0, bytes.length, at);
  closeSync(fd);
  return path;
}
const u64be = (v: number) => { const b = Buffer.alloc(8); b.writeBigUInt64BE(BigInt(v)); return [...b]; };
const u32be = (v: number) => { const b = Buffer.alloc(4); b.writeUInt32BE(v); return [...b]; };

function refusedCleanly(path: string, what: RegExp): void {
  for (const readOnly of [true, false]) {
    let err: unknown = null;
    try {
      openImage(path, { readOnly, log: () => {}, lock: false });
    } catch (e) { err = e; }
    assert.ok(err instanceof Qcow2Error, `${readOnly ? "read-only" : "read-write"} open: expected a Qcow2Error, got ${(err as Error)?.stack ?? err}`);
    assert.match((err as Error).message, what);
  }
}

test("qcow2: an L1 size above QEMU's limit is refused (was a 16 GiB allocation: RangeError)", () => {
  refusedCleanly(hostileOverlay("l1size.qcow2", [[36, u32be(0x7fffffff)]]), /L1 table of 2147483647 entries/);
});

test("qcow2: a refcount table entry far past the end of the file is refused (was a 2^40-entry scan: out of memory)", () => {
  // The refcount table is cluster 1 (offset 4096); its second entry is unused in a fresh image.
  refusedCleanly(hostileOverlay("rtentry.qcow2", [[4096 + 8, u64be(2 ** 52)]]), /refcount table entry 1 points past the end of the file/);
});

test("qcow2: an L1 entry beyond any possible file offset is refused (was a RangeError from readSync)", () => {
  const path = hostileOverlay("l1entry.qcow2", []);
  const h = readFileSync(path);
  const l1 = Number(h.readBigUInt64BE(40));
  writeFileSync(path, Buffer.concat([h.subarray(0, l1), Buffer.from(u64be(2 ** 55)), h.subarray(l1 + 8)]));
  refusedCleanly(path, /L1 entry 0 points beyond any possible file offset/);
});

test("qcow2: host offsets from 2 GiB on (bit 31 set) are read right (were negative: the image could not be opened)", async () => {
  need("qemu-img", "qemu-io");
  // QEMU's metadata preallocation (allowed over a backing file with extended L2) maps guest
  // offset 2600 MiB to a host offset above 2 GiB; both files stay sparse.
  const base = join(dir, "base3g.raw");
  writeFileSync(base, "");
  truncateSync(base, 3 * 1024 * MiB);
  const ov = join(dir, "prealloc.qcow2");
  await runOk(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,preallocation=metadata,cluster_size=65536", "-b", base, "-F", "raw", ov, "3G"]);
  await runOk(["qemu-io", "-c", "write -P 0x5a 2600M 64k", ov]);
  const map = JSON.parse((await runOk(["qemu-img", "map", "--output=json", ov])).stdout) as { start: number; offset?: number; data: boolean }[];
  const hit = map.find((e) => e.data && e.start <= 2600 * MiB && e.start + 65536 > 2600 * MiB)!;
  assert.ok(hit.offset! >= 2 ** 31, `QEMU placed the cluster at host offset ${hit.offset}, below 2 GiB: the test proves nothing`);
  for (const readOnly of [true, false]) {
    const img = openImage(ov, { readOnly, log: () => {}, lock: false });
    const b = new Uint8Array(65536);
    img.pread(b, 2600 * MiB, 0);
    await img.close();
    assert.ok(b.every((x) => x === 0x5a), `${readOnly ? "read-only" : "read-write"}: the data at 2600 MiB did not read back`);
  }
  await runOk(["qemu-img", "check", ov]);
});

test.run();
