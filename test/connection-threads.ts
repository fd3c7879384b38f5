// Connections on threads of their own (serve --threads; src/server/thread-pool.ts and
// connection-thread.ts): once the handshake chose a plain-file export the connection leaves the
// event loop for a thread that serves it with blocking calls. Each test first checks, by the
// server's own counters, that the connection really ran on a thread (or really did not), so a
// change that stops handing connections over fails here instead of passing on the event loop.
import * as assert from "uvu/assert";
import { copyFileSync, readFileSync, writeFileSync } from "node:fs";
import { availableParallelism } from "node:os";
import { join } from "node:path";
import { suite } from "uvu";
import { connect, type NbdClient } from "../src/client/index.ts";
import { RawFile } from "../src/devices/file.ts";
import { MemoryDevice } from "../src/devices/memory.ts";
import { silentLogger, type Logger } from "../src/server/log.ts";
import { NbdServer } from "../src/server/server.ts";
import { bytesEqual, deadline } from "./helpers/assert.ts";
import { BUN, CLI, ROOT, run, scratch } from "./helpers/env.ts";
import { serve as serveCli } from "./helpers/server.ts";
import { CMD, pattern, request, Wire } from "./robustness-wire.ts";

const test = suite("connection threads");
const dir = scratch("bun-nbd-threads-");
const SIZE = 8 * 1024 * 1024;
const MiB = 1024 * 1024;

function image(name: string): string {
  const p = join(dir, name);
  writeFileSync(p, pattern(SIZE, 0, 7));
  return p;
}

interface Served { server: NbdServer; port: number; file: RawFile; path: string; unix: string | null }

function serve(path: string, threads: number, opts: { log?: Logger; readOnly?: boolean; unix?: boolean } = {}): Served {
  const file = RawFile.open(path, { readOnly: opts.readOnly });
  const server = new NbdServer([{ name: "disk", device: file }], { threads, log: opts.log ?? silentLogger, handshakeTimeout: 0 });
  const { port } = server.listenTcp("127.0.0.1", 0);
  const unix = opts.unix ? `${path}.sock` : null;
  if (unix !== null) server.listenUnix(unix);
  return { server, port, file, path, unix };
}

const uri = (s: Served) => (s.unix !== null ? `nbd+unix:///disk?socket=${s.unix}` : `nbd://127.0.0.1:${s.port}/disk`);

async function until(what: string, ok: () => boolean, ms = 5000): Promise<void> {
  const limit = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > limit) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(5);
  }
}

/** What a request gave: its bytes, or its error's name. */
async function outcome(p: Promise<unknown>): Promise<string> {
  try {
    const r = await p;
    if (r instanceof Uint8Array) return `data ${Bun.hash(r).toString(16)} (${r.length})`;
    if (r instanceof Map) return `status ${JSON.stringify([...r])}`;
    return "ok";
  } catch (e) {
    return `error ${(e as { code?: string }).code ?? (e as Error).message}`;
  }
}

/** A fixed mix of every command, some out of range, with large reads (sendfile) and small ones (in place). */
async function workload(c: NbdClient, seed: number): Promise<string[]> {
  let x = seed;
  const rnd = (n: number) => { x = (x * 1103515245 + 12345) >>> 0; return x % n; };
  const out: string[] = [];
  for (let i = 0; i < 120; i++) {
    const off = rnd(SIZE / 4096) * 4096;
    const len = Math.min([4096, 65536, MiB, 3 * MiB][rnd(4)]!, SIZE - off);
    switch (rnd(8)) {
      case 0: case 1: out.push(await outcome(c.read(off, len))); break;
      case 2: out.push(await outcome(c.pwrite(pattern(len, off, seed + i), off, { fua: rnd(2) === 0 }))); break;
      case 3: out.push(await outcome(c.trim(off, len))); break;
      case 4: out.push(await outcome(c.zero(off, len, { noHole: rnd(2) === 0 }))); break;
      case 5: out.push(await outcome(c.flush())); break;
      case 6: out.push(await outcome(c.structured ? c.blockStatus(off, len) : c.cache(off, len))); break;
      case 7: out.push(await outcome(c.read(SIZE - len, len))); break; // the last bytes
    }
  }
  // Pipelined: 32 reads in flight at once, in place and by sendfile.
  const reads = [];
  for (let i = 0; i < 32; i++) reads.push(outcome(c.read((i * 257 * 1024) % (SIZE - MiB), i % 2 ? 4096 : MiB)));
  out.push(...(await Promise.all(reads)));
  return out;
}

test("connections to a plain file go to threads, up to the limit; every byte written on one is read on the others", async () => {
  const s = serve(image("share.img"), 2);
  try {
    const clients = await Promise.all([0, 1, 2].map(() => connect(uri(s))));
    await until("two connections on threads", () => s.server.threadStats().running === 2);
    assert.is(s.server.connections, 3, "the third connection is served on the event loop");
    for (const [i, c] of clients.entries()) await c.pwrite(pattern(MiB, i * MiB, 40 + i), i * MiB, { fua: i === 1 });
    await clients[0]!.flush();
    for (const c of clients) {
      for (let i = 0; i < 3; i++) bytesEqual(await c.read(i * MiB, MiB), pattern(MiB, i * MiB, 40 + i), `block ${i} read back`);
    }
    await Promise.all(clients.map((c) => c.close()));
    await until("every connection closed", () => s.server.connections === 0 && s.server.threadStats().running === 0);
    assert.is(s.server.threadStats().served, 2);
  } finally {
    await s.server.close();
  }
  const disk = readFileSync(join(dir, "share.img"));
  for (let i = 0; i < 3; i++) bytesEqual(disk.subarray(i * MiB, (i + 1) * MiB), pattern(MiB, i * MiB, 40 + i), `block ${i} on disk`);
});

for (const [mode, unix] of [["structured", false], ["simple", false], ["extended", false], ["structured", true]] as const) {
  test(`every command on a thread answers as on the event loop (${mode} replies, ${unix ? "unix socket" : "TCP"})`, async () => {
    const base = image(`base-${mode}${unix ? "-unix" : ""}.img`);
    const other = join(dir, `loop-${mode}${unix ? "-unix" : ""}.img`);
    copyFileSync(base, other);
    const threaded = serve(base, 4, { unix });
    const loop = serve(other, 0, { unix });
    const opts = { structuredReplies: mode !== "simple", extendedHeaders: mode === "extended" };
    try {
      const a = await connect(uri(threaded), opts);
      const b = await connect(uri(loop), opts);
      assert.is(a.structured, mode !== "simple");
      await until("the connection on a thread", () => threaded.server.threadStats().running === 1);
      assert.is(loop.server.threadStats().served, 0);
      const got = await workload(a, 11);
      const want = await workload(b, 11);
      assert.equal(got, want);
      await a.close();
      await b.close();
    } finally {
      await threaded.server.close();
      await loop.server.close();
    }
    bytesEqual(readFileSync(base), readFileSync(other), "the two files after the same commands");
  });
}

test("requests sent right behind GO, before its reply, are served on the thread", async () => {
  const s = serve(image("pipelined.img"), 2);
  const w = await Wire.open({ port: s.port });
  try {
    await w.hello();
    // GO and three requests in one write: the requests reach the server with the handshake's last bytes.
    const go = Buffer.concat([Buffer.from("IHAVEOPT"), Buffer.from([0, 0, 0, 7]), Buffer.from([0, 0, 0, 10]), Buffer.from([0, 0, 0, 4]), Buffer.from("disk"), Buffer.from([0, 0])]);
    w.write(Buffer.concat([go, request(CMD.READ, 1n, 4096, 4096), request(CMD.WRITE, 2n, 0, 512, 0, pattern(512, 0, 99)), request(CMD.READ, 3n, 0, 512)]));
    const replies = await w.optionReplies();
    assert.is(replies.at(-1)!.type, 1, "GO acknowledged");
    const r1 = await w.simpleReply(4096);
    bytesEqual(r1.data!, pattern(SIZE, 0, 7).subarray(4096, 8192), "read behind GO");
    assert.is((await w.simpleReply()).error, 0);
    const r3 = await w.simpleReply(512);
    bytesEqual(r3.data!, pattern(512, 0, 99), "read after the pipelined write");
    // Refused on the thread as on the event loop: beyond the end, and a command that does not exist.
    w.write(Buffer.concat([request(CMD.READ, 4n, SIZE - 4096, 8192), request(42, 5n, 0, 0)]));
    assert.is((await w.simpleReply()).error, 22, "EINVAL beyond the end");
    assert.is((await w.simpleReply()).error, 22, "EINVAL for an unknown command");
    assert.is(s.server.threadStats().served, 1);
  } finally {
    w.destroy();
    await s.server.close();
  }
});

test("a protocol error on a thread ends that connection only; the thread serves the next one", async () => {
  const lines: string[] = [];
  const log: Logger = { debugEnabled: false, debug() {}, info: (m) => lines.push(m), warn: (m) => lines.push(m), error: (m) => lines.push(m) };
  const s = serve(image("bad.img"), 1, { log });
  try {
    const w = await Wire.open({ port: s.port });
    await w.hello();
    await w.go("disk");
    await until("the connection on a thread", () => s.server.threadStats().running === 1);
    w.write(request(CMD.READ, 1n, 0, 4096, 0, undefined, 0x12345678));
    assert.ok(await w.closedWithin(5000), "the server closed the connection");
    await until("the thread free again", () => s.server.threadStats().running === 0 && s.server.connections === 0);
    assert.ok(lines.some((l) => l.includes("protocol error BAD_REQUEST_MAGIC")), lines.join("\n"));
    const c = await connect(uri(s));
    await until("the next connection on the thread", () => s.server.threadStats().served === 2);
    bytesEqual(await c.read(0, 4096), pattern(4096, 0, 7), "next client's read");
    await c.close();
  } finally {
    await s.server.close();
  }
});

test("a client that goes away with 64 MiB of replies unread frees its thread", async () => {
  const s = serve(image("gone.img"), 1);
  try {
    const w = await Wire.open({ port: s.port });
    await w.hello();
    await w.go("disk");
    await until("the connection on a thread", () => s.server.threadStats().running === 1);
    const reqs: Buffer[] = [];
    for (let i = 0; i < 64; i++) reqs.push(request(CMD.READ, BigInt(i), (i % 7) * MiB, MiB));
    w.write(Buffer.concat(reqs));
    await Bun.sleep(100);
    w.destroy();
    await deadline(10_000, "the thread ends", () => until("the thread free", () => s.server.threadStats().running === 0 && s.server.connections === 0, 10_000));
    const c = await connect(uri(s));
    bytesEqual(await c.read(MiB, 4096), pattern(SIZE, 0, 7).subarray(MiB, MiB + 4096), "read after");
    await c.close();
  } finally {
    await s.server.close();
  }
});

test("server close ends a connection waiting on its thread, and the client sees the end", async () => {
  const s = serve(image("close.img"), 1);
  const w = await Wire.open({ port: s.port });
  await w.hello();
  await w.go("disk");
  await until("the connection on a thread", () => s.server.threadStats().running === 1);
  w.write(request(CMD.WRITE, 1n, 0, 4096, 0, pattern(4096, 0, 5)));
  assert.is((await w.simpleReply()).error, 0);
  const t0 = Date.now();
  await s.server.close(5000);
  assert.ok(Date.now() - t0 < 3000, `close took ${Date.now() - t0} ms`);
  assert.is(s.server.connections, 0);
  assert.ok(await w.closedWithin(3000), "the client saw the connection end");
  bytesEqual(readFileSync(join(dir, "close.img")).subarray(0, 4096), pattern(4096, 0, 5), "the write is in the file");
});

test("a write that fails on one thread's view of a file fails every other's writes and flushes", () => {
  // Threads share the descriptor, and Linux reports a failed writeback to one fdatasync of it
  // only: a FLUSH on another connection must not succeed after it. A read-only descriptor that
  // believes it may write makes a real failing pwrite (EBADF).
  const path = image("latch.img");
  const owner = RawFile.open(path, { readOnly: true });
  const spec = { ...owner.recipe()!, readOnly: false };
  const logs: string[] = [];
  const a = RawFile.shared(spec, (m) => logs.push(m));
  const b = RawFile.shared(spec, (m) => logs.push(m));
  const code = (f: () => unknown) => { try { f(); return "ok"; } catch (e) { return (e as { code?: string }).code ?? (e as Error).message; } };
  assert.is(code(() => b.flush()), "ok", "before the failure");
  assert.is(code(() => a.pwrite(pattern(4096, 0, 1), 0, 0)), "EBADF");
  assert.ok(logs.some((l) => /write failed/.test(l)), logs.join("\n"));
  let err: unknown = null;
  try { b.flush(); } catch (e) { err = e; }
  assert.match(String((err as Error)?.message), /failed on another connection's thread/);
  assert.throws(() => b.pwrite(pattern(4096, 0, 1), 0, 0), /another connection's thread/);
  assert.throws(() => owner.flush(), /another connection's thread/);
  void owner.close();
});

test("other devices, and files written through a test's system calls, stay on the event loop", async () => {
  const server = new NbdServer([{ name: "mem", device: new MemoryDevice(SIZE) }], { threads: 4, log: silentLogger });
  const { port } = server.listenTcp("127.0.0.1", 0);
  try {
    const c = await connect(`nbd://127.0.0.1:${port}/mem`);
    await c.pwrite(pattern(4096, 0, 3), 0);
    bytesEqual(await c.read(0, 4096), pattern(4096, 0, 3), "memory export");
    assert.is(server.threadStats().served, 0);
    await c.close();
  } finally {
    await server.close();
  }
});

test("a read-only export stays read-only on its thread", async () => {
  const s = serve(image("ro.img"), 1, { readOnly: true });
  const w = await Wire.open({ port: s.port });
  try {
    await w.hello();
    const { flags } = await w.go("disk");
    assert.ok(flags & 2, "NBD_FLAG_READ_ONLY");
    await until("the connection on a thread", () => s.server.threadStats().running === 1);
    w.write(request(CMD.WRITE, 1n, 0, 4096, 0, pattern(4096, 0, 5)));
    assert.is((await w.simpleReply()).error, 1, "EPERM");
    w.write(request(CMD.READ, 2n, 0, 4096));
    bytesEqual((await w.simpleReply(4096)).data!, pattern(4096, 0, 7), "read");
  } finally {
    w.destroy();
    await s.server.close();
  }
  bytesEqual(readFileSync(join(dir, "ro.img")).subarray(0, 4096), pattern(4096, 0, 7), "the file is untouched");
});

test("--metrics: connections on threads are counted while they run and after they end", async () => {
  const img = image("metrics.img");
  const s = await serveCli(["-v", "--metrics", "127.0.0.1:0", img]);
  try {
    const url = /Metrics at (http:\/\/\S+)/.exec(s.output())![1]!;
    const clients = [await connect(s.uri("metrics")), await connect(s.uri("metrics"))];
    for (const [k, c] of clients.entries()) for (let i = 0; i < 12; i++) await c.pread(new Uint8Array(4096), (k * 12 + i) * 4096);
    await clients[1]!.pwrite(pattern(65536, 0, 3), MiB);
    await until("both on threads", () => (s.output().match(/served on a thread of its own/g)?.length ?? 0) === 2);
    const scrape = async () => await (await fetch(url)).text();
    for (const [when, conns] of [["while connected", 2], ["after both closed", 0]] as const) {
      const text = await scrape();
      assert.match(text, /^bun_nbd_read_bytes_total\{export="metrics"\} 98304$/m, `${when}\n${text}`);
      assert.match(text, /^bun_nbd_written_bytes_total\{export="metrics"\} 65536$/m, when);
      assert.match(text, /^bun_nbd_requests_total\{export="metrics",command="read"\} 24$/m, when);
      assert.match(text, /^bun_nbd_request_duration_seconds_count\{export="metrics"\} 25$/m, when);
      assert.match(text, new RegExp(`^bun_nbd_export_connections\\{export="metrics"\\} ${conns}$`, "m"), when);
      if (conns === 2) {
        await Promise.all(clients.map((c) => c.close()));
        await until("both closed", () => (s.output().match(/\] closed/g)?.length ?? 0) === 2);
      }
    }
  } finally {
    assert.is(await s.stop(), 0);
  }
});

test("a partitioned disk, its partition and an ISO are served on threads, each its own view of the file", async () => {
  // An MBR with one Linux partition of 4 MiB at 1 MiB; an "ISO" with a volume descriptor at sector 16.
  const disk = pattern(SIZE, 0, 21);
  disk.fill(0, 446, 512);
  disk[446 + 4] = 0x83;
  disk.writeUInt32LE(2048, 446 + 8);
  disk.writeUInt32LE(8192, 446 + 12);
  disk[510] = 0x55;
  disk[511] = 0xaa;
  const diskPath = join(dir, "parted.img");
  writeFileSync(diskPath, disk);
  const iso = pattern(4 * MiB, 0, 22);
  iso.set([1, 0x43, 0x44, 0x30, 0x30, 0x31, 1], 16 * 2048);
  const isoPath = join(dir, "disc.iso");
  writeFileSync(isoPath, iso);
  const s = await serveCli(["-v", "--threads", "3", diskPath, isoPath]);
  try {
    const whole = await connect(s.uri("parted"));
    const part = await connect(s.uri("parted/p1"));
    const disc = await connect(s.uri("disc"));
    await until("three connections on threads", () => (s.output().match(/served on a thread of its own/g)?.length ?? 0) === 3);
    assert.is(part.size, 4 * MiB);
    bytesEqual(await part.read(0, 65536), disk.subarray(MiB, MiB + 65536), "the partition starts 1 MiB in");
    await part.pwrite(pattern(8192, 0, 23), 4096);
    await part.flush();
    bytesEqual(await whole.read(MiB + 4096, 8192), pattern(8192, 0, 23), "a write to the partition, read through the disk");
    bytesEqual(await disc.read(0, 2 * MiB), iso.subarray(0, 2 * MiB), "the ISO's bytes");
    assert.ok(disc.info.readOnly, "the ISO is read-only");
    for (const c of [whole, part, disc]) await c.close();
  } finally {
    assert.is(await s.stop(), 0);
  }
  bytesEqual(readFileSync(diskPath).subarray(MiB + 4096, MiB + 4096 + 8192), pattern(8192, 0, 23), "in the file");
});

test("a CD's cooked data track on a thread reads as on the event loop", async () => {
  const cue = join(ROOT, "test/fixtures/cd/mixed/mixed.cue");
  const threaded = await serveCli(["-v", "--threads", "2", cue]);
  const loop = await serveCli(["--threads", "0", cue]);
  try {
    const a = await connect(threaded.uri("mixed"));
    const b = await connect(loop.uri("mixed"));
    await until("the connection on a thread", () => /served on a thread of its own/.test(threaded.output()));
    assert.is(a.size, b.size);
    // Reads that start and end inside sectors, span sectors, and cover the whole track.
    for (const [off, len] of [[0, a.size], [100, 2048], [2047, 4098], [65536 + 5, 70000], [a.size - 3000, 3000]] as const) {
      bytesEqual(await a.read(off, len), await b.read(off, len), `cooked bytes at ${off} (+${len})`);
    }
    await a.close();
    await b.close();
  } finally {
    assert.is(await threaded.stop(), 0);
    assert.is(await loop.stop(), 0);
  }
});

test("serve: one thread per core by default, --threads 0 keeps every connection on the event loop, bad values refused", async () => {
  const img = image("cli.img");
  for (const [args, threaded] of [[[], true], [["--threads", "0"], false]] as const) {
    const s = await serveCli(["-v", ...args, img]);
    try {
      const c = await connect(s.uri("cli"));
      bytesEqual(await c.read(0, 4096), pattern(4096, 0, 7), "read");
      await c.close();
      await until("the connection's end", () => /\[1\] closed/.test(s.output()));
      assert.is(new RegExp(`\\[1\\] served on a thread of its own \\(1 of at most ${availableParallelism()}\\)`).test(s.output()), threaded, s.output());
    } finally {
      assert.is(await s.stop(), 0);
    }
  }
  for (const bad of ["x", "-1", "1025"]) {
    const r = await run([BUN, CLI, "serve", "-p", "0", `--threads=${bad}`, img]);
    assert.is(r.code, 2, r.stderr);
    assert.match(r.stderr, /invalid --threads/);
  }
  const cfg = join(dir, "threads.toml");
  writeFileSync(cfg, `[server]\nthreads = -1\n\n[[export]]\nname = "d"\nfile = "${img}"\n`);
  const r = await run([BUN, CLI, "serve", "--config", cfg]);
  assert.is(r.code, 1, r.stderr);
  assert.match(r.stderr, /threads\.toml:2: server\.threads: must be "auto" \(one per core\) or a whole number from 0 to 1024 \(0: none\), not the number -1/);
  for (const [value, shown] of [["4", "4"], ['"auto"', '"auto"']]) {
    writeFileSync(cfg, `[server]\nthreads = ${value}\n\n[[export]]\nname = "d"\nfile = "${img}"\n`);
    const printed = await run([BUN, CLI, "serve", "--config", cfg, "--print-config"]);
    assert.ok(printed.stdout.split("\n").includes(`threads = ${shown}`), printed.stdout);
  }
});

test.run();
