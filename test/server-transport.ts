// The reply path under pressure (socket-transport.ts): a client that stops reading fills the socket,
// so sendfile(2) (or its user-space twin copySend, with one reader) comes back short or with EAGAIN, Bun's writes come back short, and everything
// queued must go out in order once the client reads again. Each test waits until the server's own
// counters show the path it is about (a drain wait, a short sendfile) was taken before the client
// resumes, so a change that stops exercising the path fails here instead of passing vacuously.
// Also: small READ replies read in place into the output buffer (and detached when the device
// answers asynchronously), and a file that shrinks under a sendfile READ.
import * as assert from "uvu/assert";
import { closeSync, openSync, truncateSync, writeFileSync, writeSync } from "node:fs";
import { join } from "node:path";
import { suite } from "uvu";
import { NbdServer } from "../src/server/server.ts";
import { silentLogger } from "../src/server/log.ts";
import { RawFile } from "../src/devices/file.ts";
import { MemoryDevice } from "../src/devices/memory.ts";
import type { BlockDevice, FileRange } from "../src/devices/types.ts";
import { bytesEqual, deadline } from "./helpers/assert.ts";
import { scratch } from "./helpers/env.ts";
import { SlowDevice } from "./helpers/slow-device.ts";
import { CMD, pattern, request, type Target, Wire } from "./robustness-wire.ts";

const test = suite("server transport");
const dir = scratch("bun-nbd-transport-");
const SIZE = 16 * 1024 * 1024;
const data = pattern(SIZE, 0, 11);
const img = join(dir, "disk.img");
const shrink = join(dir, "shrink.img");
const sparse = join(dir, "sparse.img");
/** sparse.img: 4 MiB with data in 64 KiB runs at every third run (the rest holes), and what it reads as. */
const SPARSE_SIZE = 4 * 1024 * 1024;
const sparseData = new Uint8Array(SPARSE_SIZE);
function writeSparseImage(): void {
  writeFileSync(sparse, new Uint8Array(0));
  truncateSync(sparse, SPARSE_SIZE);
  const fd = openSync(sparse, "r+");
  for (let off = 0; off < SPARSE_SIZE; off += 3 * 65536) {
    const run = pattern(65536, off, 5);
    sparseData.set(run, off);
    writeSync(fd, run, 0, run.length, off);
  }
  closeSync(fd);
}
let server: NbdServer;
let tcp: Target;
let unix: Target;
let memory: MemoryDevice;

/**
 * Even 1 MiB blocks answer synchronously; in odd ones the first half of a read is filled at once and
 * the rest after a timer (as a device with a partial cache would), so a buffer that is reused
 * before the read completes shows up as wrong bytes.
 */
class HalfAsync implements BlockDevice {
  constructor(private readonly sync: MemoryDevice, private readonly slow: SlowDevice) {}
  size(): number { return this.sync.size(); }
  capabilities() { return this.sync.capabilities(); }
  pread(buf: Uint8Array, offset: number): void | Promise<void> {
    if (Math.floor(offset / (1024 * 1024)) % 2 === 0) return this.sync.pread(buf, offset);
    const half = buf.length >> 1;
    this.sync.pread(buf.subarray(0, half), offset);
    return this.slow.pread(buf.subarray(half), offset + half, 0);
  }
}

/** Writes land after a timer, copied only then: a payload buffer reused before that shows up as wrong bytes. */
class LateWriter implements BlockDevice {
  constructor(private readonly mem: MemoryDevice) {}
  size(): number { return this.mem.size(); }
  capabilities() { return this.mem.capabilities(); }
  pread(buf: Uint8Array, offset: number): void { this.mem.pread(buf, offset); }
  pwrite(buf: Uint8Array, offset: number): Promise<void> {
    return new Promise((resolve) => setTimeout(() => { this.mem.pwrite(buf, offset); resolve(); }, 1 + (offset % 3)));
  }
}
let late: MemoryDevice;

/** A file whose sendfile ranges must be given back (as a remote image's cache pins its blocks): counts grants and releases. */
class Leased implements BlockDevice {
  granted = 0;
  released = 0;
  twice = 0;
  constructor(private readonly file: RawFile) {}
  size(): number { return this.file.size(); }
  capabilities() { return this.file.capabilities(); }
  pread(buf: Uint8Array, offset: number) { return this.file.pread(buf, offset); }
  fileRange(offset: number, length: number, out: FileRange): boolean {
    if (!this.file.fileRange(offset, length, out)) return false;
    this.granted++;
    let done = false;
    out.release = () => { if (done) this.twice++; done = true; this.released++; };
    return true;
  }
}
let leased: Leased;

test.before(async () => {
  writeFileSync(img, data);
  writeFileSync(shrink, data.subarray(0, 1024 * 1024));
  writeSparseImage();
  memory = new MemoryDevice(SIZE);
  memory.pwrite(data, 0);
  const shrinking = RawFile.open(shrink, { readOnly: true });
  truncateSync(shrink, 512 * 1024 + 1000); // after open: the export keeps its 1 MiB size
  server = new NbdServer([
    { name: "file", device: RawFile.open(img) },
    { name: "memory", device: memory },
    { name: "shrunk", device: shrinking },
    { name: "sparse", device: RawFile.open(sparse, { readOnly: true }) },
    { name: "mixed", device: new HalfAsync(memory, new SlowDevice(data, { maxDelayMs: 2 })) },
    { name: "late", device: new LateWriter(late = new MemoryDevice(SIZE)) },
    { name: "leased", device: leased = new Leased(RawFile.open(img, { readOnly: true })) },
  ], { log: silentLogger });
  tcp = { port: server.listenTcp("127.0.0.1", 0).port };
  const sock = join(dir, "s.sock");
  server.listenUnix(sock);
  unix = { path: sock };
});

test.after(async () => {
  await server.close(1000);
});

interface Req { cookie: bigint; offset: number; length: number }

/** Poll the server's counters until `ok` holds (the path under test was taken). */
async function until(what: string, ok: () => boolean): Promise<void> {
  for (let i = 0; i < 1000 && !ok(); i++) await Bun.sleep(5);
  assert.ok(ok(), what);
}

/** Send `reqs` as READs while not reading, wait for `ready`, then read every reply and check its bytes. */
async function pipelined(t: Target, name: string, structured: boolean, reqs: Req[], expect: Uint8Array, ready: () => boolean, what: string): Promise<void> {
  const w = await Wire.open(t);
  await w.hello();
  await w.go(name, { structured });
  w.sock.pause();
  w.write(Buffer.concat(reqs.map((r) => request(CMD.READ, r.cookie, r.offset, r.length))));
  await until(what, ready);
  w.sock.resume();
  for (const r of reqs) { // a single-threaded server answers in order
    if (structured) {
      const c = await w.chunk();
      assert.is(c.cookie, r.cookie);
      assert.is(c.type, 1, "OFFSET_DATA");
      assert.is(c.data.readUInt32BE(4), r.offset);
      bytesEqual(c.data.subarray(8), expect.subarray(r.offset, r.offset + r.length), `read ${r.cookie}`);
    } else {
      const rep = await w.simpleReply(r.length);
      assert.is(rep.cookie, r.cookie);
      assert.is(rep.error, 0);
      bytesEqual(rep.data!, expect.subarray(r.offset, r.offset + r.length), `read ${r.cookie}`);
    }
  }
  w.destroy();
}

/** 64 reads (17 MB) mixing sendfile sizes (384 KiB, odd ones) and small copies (4 KiB, in place): more than socket buffers hold. */
function mixed(): Req[] {
  const reqs: Req[] = [];
  for (let i = 0; i < 64; i++) {
    const length = i % 3 === 2 ? 4096 : 384 * 1024 + (i % 5) * 4096 + (i % 2);
    reqs.push({ cookie: BigInt(i + 1), offset: (i * 211 * 1024) % (SIZE - length), length });
  }
  return reqs;
}

/** A second connection that has read a file range and stays open: from then on file ranges go out with sendfile (bulkReaders). */
async function otherReader(t: Target): Promise<Wire> {
  const w = await Wire.open(t);
  await w.hello();
  await w.go("file");
  w.write(request(CMD.READ, 1n, 0, 128 * 1024)); // above 64 KiB: a file range (smaller reads are copied in place)
  const rep = await w.simpleReply(128 * 1024);
  bytesEqual(rep.data!, data.subarray(0, 128 * 1024), "the other reader's bytes");
  return w;
}

for (const [label, target] of [["TCP", () => tcp], ["unix socket", () => unix]] as const) {
  for (const structured of [false, true]) {
    const kind = structured ? "structured" : "simple";
    test(`${label}, ${kind}: sendfile replies (two readers) queued behind a full socket arrive whole and in order`, () => deadline(30_000, "sendfile backlog", async () => {
      const other = await otherReader(target());
      const before = server.transportStats();
      await pipelined(target(), "file", structured, mixed(), data,
        () => server.transportStats().drainWaits > before.drainWaits && server.transportStats().sendfileShort > before.sendfileShort,
        "the server found the socket full during sendfile");
      other.destroy();
      const after = server.transportStats();
      assert.ok(after.sendfileCalls > before.sendfileCalls, "sendfile was used");
      assert.ok(after.copiedFileBytes - before.copiedFileBytes < 4096, `file bytes copied through memory: ${after.copiedFileBytes - before.copiedFileBytes}`);
    }));
    test(`${label}, ${kind}: copied file replies (one reader) queued behind a full socket arrive whole and in order`, () => deadline(30_000, "copySend backlog", async () => {
      await Bun.sleep(50); // the other tests' connections have closed
      const before = server.transportStats();
      await pipelined(target(), "file", structured, mixed(), data,
        () => server.transportStats().drainWaits > before.drainWaits && server.transportStats().sendfileShort > before.sendfileShort,
        "the server found the socket full during copySend");
      const after = server.transportStats();
      assert.is(after.sendfileCalls, before.sendfileCalls, "no sendfile with one reader");
      assert.ok(after.copySends > before.copySends, "copySend was used");
      assert.ok(after.copiedFileBytes - before.copiedFileBytes > 10_000_000, "the payloads went through the buffer");
    }));
  }
  test(`${label}: copied replies (a memory export) written short by Bun are completed on drain`, () => deadline(30_000, "short writes", async () => {
    const before = server.transportStats();
    const reqs: Req[] = [];
    for (let i = 0; i < 24; i++) reqs.push({ cookie: BigInt(100 + i), offset: i * 600 * 1024, length: i % 4 === 3 ? 512 : 512 * 1024 + i });
    await pipelined(target(), "memory", true, reqs, data, () => server.transportStats().drainWaits > before.drainWaits, "a write came up short");
  }));
}

for (const [label, target] of [["TCP", () => tcp], ["unix socket", () => unix]] as const) {
  for (const readers of [1, 2]) {
    test(`${label}, ${readers} reader${readers > 1 ? "s" : ""}: large READs of a sparse file are hole chunks and data chunks sent from the file, covering the range`, () => deadline(30_000, "sparse reads", async () => {
      const other = readers > 1 ? await otherReader(target()) : null;
      await Bun.sleep(20);
      const before = server.transportStats();
      const w = await Wire.open(target());
      await w.hello();
      await w.go("sparse", { structured: true });
      const reqs = [[0, 1 << 20], [65536 - 512, 512 * 1024 + 1000], [3 << 20, 1 << 20]] as const;
      w.write(Buffer.concat(reqs.map(([offset, length], i) => request(CMD.READ, BigInt(i + 1), offset, length))));
      let holes = 0;
      for (const [i, [offset, length]] of reqs.entries()) {
        const got = new Uint8Array(length).fill(0xee);
        for (let done = false; !done;) {
          const c = await w.chunk();
          assert.is(c.cookie, BigInt(i + 1));
          done = (c.flags & 1) !== 0;
          const at = Number(c.data.readBigUInt64BE(0)) - offset;
          if (c.type === 2) { // OFFSET_HOLE
            got.fill(0, at, at + c.data.readUInt32BE(8));
            holes++;
          } else {
            assert.is(c.type, 1, "OFFSET_DATA");
            got.set(c.data.subarray(8), at);
          }
        }
        bytesEqual(got, sparseData.subarray(offset, offset + length), `read ${i + 1}`);
      }
      w.destroy();
      other?.destroy();
      assert.ok(holes >= 6, `holes were sent as hole chunks (${holes})`);
      const after = server.transportStats();
      if (readers === 1) assert.ok(after.copySends > before.copySends, "data chunks sent by copySend");
      else assert.ok(after.sendfileCalls > before.sendfileCalls, "data chunks sent by sendfile");
    }));
  }
  test(`${label}: large WRITE payloads taken straight from the socket land whole, in order with the requests around them`, () => deadline(30_000, "writes in place", async () => {
    const before = server.transportStats().receivedInPlace;
    const w = await Wire.open(target());
    await w.hello();
    await w.go("memory", { structured: true });
    const parts: Buffer[] = [];
    const writes: { offset: number; bytes: Buffer }[] = [];
    for (let i = 0; i < 12; i++) {
      const offset = i * 1300 * 1024 + (i % 3);
      const bytes = pattern(1024 * 1024 + i * 777, offset, 23);
      writes.push({ offset, bytes });
      parts.push(request(CMD.WRITE, BigInt(i + 1), offset, bytes.length, 0, bytes));
      parts.push(request(CMD.READ, BigInt(1000 + i), offset + 4096, 512)); // reads the write before it
    }
    w.write(Buffer.concat(parts));
    for (let i = 0; i < 12; i++) {
      const c = await w.chunk();
      assert.is(c.cookie, BigInt(i + 1));
      assert.is(c.type, 0, "write ok");
      const r = await w.chunk();
      assert.is(r.cookie, BigInt(1000 + i));
      bytesEqual(r.data.subarray(8), writes[i]!.bytes.subarray(4096, 4608), `read after write ${i}`);
    }
    w.destroy();
    for (const x of writes) {
      const got = new Uint8Array(x.bytes.length);
      memory.pread(got, x.offset);
      bytesEqual(got, x.bytes, `written at ${x.offset}`);
    }
    memory.pwrite(data, 0); // as the other tests expect it
    // Over TCP the kernel holds more of what this in-process client wrote than one chunk, so the
    // server finds the rest of a payload there; over a unix socket the client (on this same event
    // loop) has written no more than the socket buffer, so this checks the bytes, not the path.
    if (label === "TCP") assert.ok(server.transportStats().receivedInPlace > before, "payload bytes were received in place");
  }));
}

test("TCP: a stream of small writes read directly into a reused buffer, finished later by the device: every byte lands", () => deadline(30_000, "late writes", async () => {
  const before = server.transportStats().receivedInPlace;
  const w = await Wire.open(tcp);
  await w.hello();
  await w.go("late");
  const parts: Buffer[] = [];
  const writes: { offset: number; bytes: Buffer }[] = [];
  for (let i = 0; i < 400; i++) {
    const length = i % 50 === 49 || i >= 300 ? 40 * 1024 + i : 512 + (i % 9) * 1024; // small views, then large copies
    const offset = (i * 41 * 1024) % (SIZE - 64 * 1024);
    const bytes = pattern(length, offset, 97 + i);
    writes.push({ offset, bytes });
    parts.push(request(CMD.WRITE, BigInt(i + 1), offset, length, 0, bytes));
  }
  w.write(Buffer.concat(parts));
  const seen = new Set<bigint>();
  for (let i = 0; i < writes.length; i++) {
    const r = await w.simpleReply();
    assert.is(r.error, 0);
    seen.add(r.cookie);
  }
  assert.is(seen.size, writes.length, "every write answered once");
  w.destroy();
  let checked = 0;
  for (const [i, x] of writes.entries()) {
    // Overlapping writes land in the order of their timers: compare only writes no other one touches.
    if (writes.some((y, j) => j !== i && y.offset < x.offset + x.bytes.length && x.offset < y.offset + y.bytes.length)) continue;
    const got = new Uint8Array(x.bytes.length);
    late.pread(got, x.offset);
    bytesEqual(got, x.bytes, `write ${i + 1} at ${x.offset}`);
    checked++;
  }
  assert.ok(checked > 300, `${checked} writes compared`);
  assert.ok(server.transportStats().receivedInPlace > before, "the stream was read directly");
}));

test("small replies in place, and detached when the device answers later: bytes stay right", () => deadline(30_000, "in place", async () => {
  const w = await Wire.open(tcp);
  await w.hello();
  await w.go("mixed", { structured: true });
  const reqs: Req[] = [];
  for (let i = 0; i < 200; i++) reqs.push({ cookie: BigInt(i + 1), offset: (i * 517 * 1024 + (i % 7) * 512) % (SIZE - 8192), length: 512 + (i % 8) * 1024 });
  w.write(Buffer.concat(reqs.map((r) => request(CMD.READ, r.cookie, r.offset, r.length))));
  const byCookie = new Map(reqs.map((r) => [r.cookie, r]));
  for (let n = 0; n < reqs.length; n++) { // asynchronous reads complete out of order
    const c = await w.chunk();
    const r = byCookie.get(c.cookie)!;
    assert.ok(r, `unknown cookie ${c.cookie}`);
    byCookie.delete(c.cookie);
    assert.is(c.data.readUInt32BE(4), r.offset);
    bytesEqual(c.data.subarray(8), data.subarray(r.offset, r.offset + r.length), `read ${r.cookie}`);
  }
  w.destroy();
}));

for (const [label, target, structured] of [["TCP, simple", () => tcp, false], ["unix socket, structured", () => unix, true]] as const) {
  test(`${label}: every file range sent is released once, whether sent, queued behind a full socket, or dropped when the client goes`, () => deadline(30_000, "release", async () => {
    const w = await Wire.open(target());
    await w.hello();
    await w.go("leased", { structured });
    const base = leased.granted;
    // 24 large reads, all read back: each range released once it has left
    const reqs: Req[] = [];
    for (let i = 0; i < 24; i++) reqs.push({ cookie: BigInt(i + 1), offset: i * 512 * 1024, length: 256 * 1024 + i });
    await pipelined(target(), "leased", structured, reqs, data, () => true, "");
    await until("every range sent was released", () => leased.released === leased.granted);
    assert.ok(leased.granted - base >= 24, `ranges granted: ${leased.granted - base}`);
    // 64 reads of 1 MiB never read by the client: the socket fills and ranges queue; then it goes
    const granted = leased.granted;
    w.write(Buffer.concat(Array.from({ length: 64 }, (_, i) => request(CMD.READ, BigInt(1000 + i), (i % 16) * 1024 * 1024, 1024 * 1024))));
    await until("the server queued ranges behind the full socket", () => leased.granted - leased.released > 1);
    assert.ok(leased.granted > granted);
    w.destroy();
    await until("ranges queued for a client that went are released", () => leased.released === leased.granted);
    assert.is(leased.twice, 0, "no range released twice");
  }));
}

test("a file that shrank under the export: a sendfile READ across the new end reads zeros after it", () => deadline(15_000, "shrunk", async () => {
  const end = 512 * 1024 + 1000;
  const expect = new Uint8Array(1024 * 1024);
  expect.set(data.subarray(0, end));
  const w = await Wire.open(tcp);
  await w.hello();
  await w.go("shrunk"); // simple replies: no hole scan, the READ goes out with sendfile
  w.write(Buffer.concat([request(CMD.READ, 1n, 256 * 1024, 512 * 1024), request(CMD.READ, 2n, 0, 4096)]));
  const r1 = await w.simpleReply(512 * 1024);
  assert.is(r1.cookie, 1n);
  bytesEqual(r1.data!, expect.subarray(256 * 1024, 768 * 1024), "data, then zeros past the end");
  const r2 = await w.simpleReply(4096);
  assert.is(r2.cookie, 2n, "the next reply follows in step");
  bytesEqual(r2.data!, data.subarray(0, 4096), "next read");
  w.destroy();
}));

test.run();
