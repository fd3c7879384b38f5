// The client's transports (src/client/transport*.ts) and reads by views: one conformance run per
// transport (Bun's native sockets and node:net) against nbdkit's memory plugin, with writes large
// enough that the socket takes them in several parts; and the view receiver fed by a fake peer
// (replies split across chunks, data chunks out of order, holes).
import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { EventEmitter } from "node:events";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import {
  NBD_FLAG_HAS_FLAGS, NBD_FLAG_SEND_FLUSH, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE,
} from "../src/protocol/constants.ts";
import {
  connect, copy, describeExport, FileDestination, Negotiation, NbdClient, NbdDisconnectedError, NbdEndpoint,
} from "../src/client/index.ts";
import type { Conn, Rx } from "../src/client/conn.ts";
import { useTransport } from "../src/client/transport.ts";
import { bytesEqual, deadline } from "./helpers/assert.ts";
import { replyChunk, simpleReply } from "./helpers/wire.ts";
import { need, scratch, SYSTEM_PATH } from "./helpers/env.ts";

need("nbdkit");
const MiB = 1024 * 1024;
const dir = scratch("bun-nbd-client-transport-");

// ----------------------------------------------------------------------------------------------
// Views from a fake peer

class FakeConn extends EventEmitter {
  written: Buffer[] = [];
  write(b: Uint8Array): boolean {
    this.written.push(Buffer.from(b));
    return true;
  }
  end(): void {
    queueMicrotask(() => this.destroy());
  }
  destroyed = false;
  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    queueMicrotask(() => this.emit("close"));
  }
}

function cookieOf(w: Buffer, i: number): number {
  return w.readUInt32BE(28 * i + 12);
}
function fake(owned: boolean) {
  const sock = new FakeConn();
  const rx = { on: (_b: Buffer, _n: number) => {}, owned };
  const client = new NbdClient({
    socket: sock as unknown as Conn, rx, info: describeExport("", MiB, NBD_FLAG_HAS_FLAGS, true), structured: true,
    metaContexts: new Map(), leftover: [], style: "newstyle-fixed",
  });
  return { client, sock, feed: (b: Buffer) => rx.on(b, b.length) };
}

const concat = (views: Uint8Array[]) => Buffer.concat(views);

test("readViews: null unless the transport hands over owned buffers", async () => {
  const { client } = fake(false);
  assert.is(client.readViews(0, 512), null);
  await client.close();
});

test("readViews: simple reply split over chunks, structured data out of order, holes", async () => {
  const { client, sock, feed } = fake(true);
  const a = randomBytes(300);
  const b = randomBytes(200);
  const p1 = client.readViews(0, 300)!;
  const p2 = client.readViews(4096, 1000)!;
  await Promise.resolve();
  const w = sock.written[0]!;
  // Simple reply for p1, cut at every chunk boundary the receiver may see.
  const r1 = simpleReply(cookieOf(w, 0), 0, a);
  feed(Buffer.from(r1.subarray(0, 20)));
  feed(Buffer.from(r1.subarray(20, 170)));
  feed(Buffer.from(r1.subarray(170)));
  // p2: data at +800, a hole at +200..+800, data at 0 last (out of order).
  const c2 = cookieOf(w, 1);
  const data = (off: number, d: Uint8Array) => {
    const p = Buffer.alloc(8 + d.length);
    p.writeUInt32BE(4096 + off, 4);
    p.set(d, 8);
    return replyChunk(c2, 0, NBD_REPLY_TYPE_OFFSET_DATA, p);
  };
  const hole = Buffer.alloc(12);
  hole.writeUInt32BE(4096 + 200, 4);
  hole.writeUInt32BE(600, 8);
  const tail = randomBytes(200);
  feed(Buffer.concat([data(800, tail), replyChunk(c2, 0, NBD_REPLY_TYPE_OFFSET_HOLE, hole), data(0, b).subarray(0, 100)]));
  feed(Buffer.concat([data(0, b).subarray(100), replyChunk(c2, NBD_REPLY_FLAG_DONE, 0, new Uint8Array(0))]));
  bytesEqual(concat(await p1), a, "simple reply by views");
  bytesEqual(concat(await p2), Buffer.concat([b, Buffer.alloc(600), tail]), "structured reply by views");
  await client.close();
});

// ----------------------------------------------------------------------------------------------
// Receiving in place (rx.recv) from a fake peer

/**
 * A peer whose bytes "arrive" in the socket (a queue) and are taken either by the client's in-place
 * `recv` or, as Bun's data callback would, in chunks of `chunkSize` handed to `rx.on`.
 */
function fakeInPlace(busyPollMicros: number) {
  const sock = new FakeConn();
  let queue = Buffer.alloc(0);
  const seen = { pulled: 0, delivered: 0, calls: 0 };
  const rx: Rx = {
    on: () => {},
    owned: true,
    recv(dst, off, len) {
      seen.calls++;
      const n = Math.min(len, queue.length);
      dst.set(queue.subarray(0, n), off);
      queue = queue.subarray(n);
      seen.pulled += n;
      return n;
    },
  };
  const client = new NbdClient({
    socket: sock as unknown as Conn, rx, info: describeExport("", MiB, NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH, true),
    structured: true, metaContexts: new Map([["base:allocation", 5]]), leftover: [], style: "newstyle-fixed",
  }, { busyPollMicros });
  const tick = () => new Promise<void>((r) => setImmediate(r));
  return {
    client, sock, seen, rx,
    /** Bytes reach the socket, then the event loop runs until the socket is empty. */
    async arrive(b: Uint8Array, chunkSize: number) {
      queue = Buffer.concat([queue, b]);
      while (queue.length) {
        const c = Buffer.from(queue.subarray(0, chunkSize));
        queue = queue.subarray(c.length);
        seen.delivered += c.length;
        rx.on(c, c.length);
        await tick();
      }
      await tick();
    },
  };
}

test("in-place receive: every reply kind, arriving in pieces of any size, mixed with reads by views", async () => {
  for (const piece of [1, 3, 16, 20, 29, 100, 777, 100_000]) {
    for (const chunkSize of [1, 7, 4096]) {
      const { client, sock, seen, arrive } = fakeInPlace(piece === 100 ? 30 : 0);
      const a = randomBytes(300);
      const b = randomBytes(1000);
      const c = randomBytes(2000);
      const buf1 = new Uint8Array(300);
      const buf3 = new Uint8Array(3000);
      const p1 = client.pread(buf1, 0);
      const p2 = client.readViews(4096, 1000)!;
      const p3 = client.pread(buf3, 8192);
      const p4 = client.pread(new Uint8Array(512), 16384);
      const p5 = client.flush();
      const p6 = client.blockStatus(0, 65536);
      const p7 = client.readViews(20480, 200)!; // answered with a simple reply: its data follows a 16-byte header
      const d7 = randomBytes(200);
      const e4 = p4.then(() => null, (e: Error) => e);
      await Promise.resolve();
      const w = sock.written[0]!;
      const data = (cookie: number, base: number, off: number, d: Uint8Array, flags = 0) => {
        const p = Buffer.alloc(8 + d.length);
        p.writeUInt32BE(base + off, 4);
        p.set(d, 8);
        return replyChunk(cookie, flags, NBD_REPLY_TYPE_OFFSET_DATA, p);
      };
      const hole = Buffer.alloc(12);
      hole.writeUInt32BE(8192 + 2000, 4);
      hole.writeUInt32BE(1000, 8);
      const err = Buffer.alloc(6 + 5);
      err.writeUInt32BE(5, 0); // EIO
      err.writeUInt16BE(5, 4);
      err.write("oops!", 6);
      const bs = Buffer.alloc(4 + 16);
      bs.writeUInt32BE(5, 0);
      bs.writeUInt32BE(4096, 4);
      bs.writeUInt32BE(0, 8);
      bs.writeUInt32BE(61440, 12);
      bs.writeUInt32BE(3, 16);
      const done = (cookie: number) => replyChunk(cookie, NBD_REPLY_FLAG_DONE, 0, new Uint8Array(0));
      const stream = Buffer.concat([
        simpleReply(cookieOf(w, 0), 0, a),
        simpleReply(cookieOf(w, 6), 0, d7),
        data(cookieOf(w, 2), 8192, 0, c),
        data(cookieOf(w, 1), 4096, 0, b, NBD_REPLY_FLAG_DONE),
        replyChunk(cookieOf(w, 3), NBD_REPLY_FLAG_DONE, 1 + 0x8000, err),
        replyChunk(cookieOf(w, 5), NBD_REPLY_FLAG_DONE, 5, bs),
        simpleReply(cookieOf(w, 4), 0, new Uint8Array(0)),
        replyChunk(cookieOf(w, 2), NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_HOLE, hole),
      ]);
      for (let i = 0; i < stream.length; i += piece) await arrive(stream.subarray(i, i + piece), chunkSize);
      const what = `pieces of ${piece}, chunks of ${chunkSize}`;
      await p1;
      bytesEqual(buf1, a, `simple reply, ${what}`);
      bytesEqual(concat(await p2), b, `structured reply by views, ${what}`);
      await p3;
      bytesEqual(buf3, Buffer.concat([c, Buffer.alloc(1000)]), `data + hole, ${what}`);
      const e = await e4;
      assert.ok(e && (e as { code?: string }).code === "EIO" && e.message.includes("oops!"), `error chunk, ${what}: ${e}`);
      await p5;
      assert.equal((await p6).get("base:allocation"), [{ offset: 0, length: 4096, flags: 0 }, { offset: 4096, length: 61440, flags: 3 }]);
      bytesEqual(concat(await p7), d7, `simple reply by views, ${what}`);
      assert.is(seen.pulled + seen.delivered, stream.length, what);
      if (Math.min(piece, stream.length) > chunkSize) assert.ok(seen.pulled > 0, `something was received in place (${what})`);
      assert.is(client.inFlight, 0);
      await client.close();
    }
  }
});

test("in-place receive: busy-polling gives up when nothing comes; a dropped connection fails the request", async () => {
  const { client, sock, seen, rx } = fakeInPlace(2000);
  const failed = client.pread(new Uint8Array(512), 0).then(() => null, (e: Error) => e);
  await Promise.resolve();
  // Ten bytes of the reply header come through the data callback; the rest never does. The pull
  // polls for about 2 ms, then hands the loop back.
  const head = Buffer.from(simpleReply(cookieOf(sock.written[0]!, 0), 0, new Uint8Array(0)).subarray(0, 10));
  const t0 = performance.now();
  rx.on(head, head.length);
  const spent = performance.now() - t0;
  assert.ok(seen.calls > 2, `it polled (${seen.calls} recv calls)`);
  assert.ok(spent >= 1.5 && spent < 500, `it gave up after about 2 ms (${spent.toFixed(2)} ms)`);
  assert.is(client.inFlight, 1);
  sock.emit("close");
  const e = await failed;
  assert.ok(e instanceof NbdDisconnectedError, String(e));
});

// ----------------------------------------------------------------------------------------------
// Each transport against nbdkit

const sock = join(dir, "mem.sock");
const proc = Bun.spawn(["nbdkit", "-f", "-U", sock, "memory", "64M"], {
  stdout: "ignore", stderr: "inherit", env: { ...process.env, PATH: SYSTEM_PATH },
});
const uri = `nbd+unix:///?socket=${sock}`;

test("nbdkit is up", () => deadline(10_000, "nbdkit", async () => {
  for (let i = 0; ; i++) {
    try {
      await (await Negotiation.open({ transport: "unix", path: sock, exportName: "" }, { connectTimeoutMs: 500 })).abort();
      return;
    } catch (e) {
      if (i > 200) throw e;
      await Bun.sleep(25);
    }
  }
}));

for (const kind of ["bun", "node"] as const) {
  test(`${kind} transport: big pipelined writes, reads, views, copy to a file, close`, () => deadline(30_000, kind, async () => {
    useTransport(kind);
    try {
      const img = randomBytes(24 * MiB);
      const c = await connect(uri, { busyPollMicros: kind === "bun" ? 100 : 0 });
      const more = await connect(uri);
      assert.is(c.receivesInPlace, kind === "bun", "Bun's transport reads the socket fd in place (libc through bun:ffi)");
      // 24 MiB in flight at once: more than the socket takes in one write, so tails are queued.
      await Promise.all([c.pwrite(img.subarray(0, 16 * MiB), 0), c.pwrite(img.subarray(16 * MiB), 16 * MiB), c.flush()]);
      const back = new Uint8Array(24 * MiB);
      await c.pread(back, 0);
      bytesEqual(back, img, `${kind}: pread`);
      const views = c.readViews(MiB - 7, 3 * MiB + 13);
      if (kind === "node") assert.is(views, null, "node:net reuses its receive buffer");
      else bytesEqual(Buffer.concat(await views!), img.subarray(MiB - 7, 4 * MiB + 6), `${kind}: readViews`);
      const out = join(dir, `copy-${kind}.img`);
      const dst = new FileDestination(out);
      const r = await copy(new NbdEndpoint([c, more]), dst, { requestSize: 256 * 1024, workers: 8, sha256: true });
      dst.close();
      bytesEqual(readFileSync(out).subarray(0, 24 * MiB), img, `${kind}: copied file`);
      assert.is(r.size, 64 * MiB);
      await Promise.all([c.close(), more.close()]);
      await c.closed;
    } finally {
      useTransport("auto");
    }
  }));
}

test("stop nbdkit", async () => {
  proc.kill("SIGTERM");
  await proc.exited;
});

test.run();
