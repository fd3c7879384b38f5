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
  NBD_FLAG_HAS_FLAGS, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE, NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
} from "../src/protocol/constants.ts";
import { connect, copy, describeExport, FileDestination, Negotiation, NbdClient, NbdEndpoint } from "../src/client/index.ts";
import type { Conn } from "../src/client/transport.ts";
import { useTransport } from "../src/client/transport.ts";
import { bytesEqual, deadline } from "./helpers/assert.ts";
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
function simple(cookie: number, data: Uint8Array): Buffer {
  const b = Buffer.alloc(16 + data.length);
  b.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(cookie, 12);
  b.set(data, 16);
  return b;
}
function chunk(cookie: number, flags: number, type: number, payload: Uint8Array): Buffer {
  const b = Buffer.alloc(20 + payload.length);
  b.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeUInt32BE(cookie, 12);
  b.writeUInt32BE(payload.length, 16);
  b.set(payload, 20);
  return b;
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
  const r1 = simple(cookieOf(w, 0), a);
  feed(Buffer.from(r1.subarray(0, 20)));
  feed(Buffer.from(r1.subarray(20, 170)));
  feed(Buffer.from(r1.subarray(170)));
  // p2: data at +800, a hole at +200..+800, data at 0 last (out of order).
  const c2 = cookieOf(w, 1);
  const data = (off: number, d: Uint8Array) => {
    const p = Buffer.alloc(8 + d.length);
    p.writeUInt32BE(4096 + off, 4);
    p.set(d, 8);
    return chunk(c2, 0, NBD_REPLY_TYPE_OFFSET_DATA, p);
  };
  const hole = Buffer.alloc(12);
  hole.writeUInt32BE(4096 + 200, 4);
  hole.writeUInt32BE(600, 8);
  const tail = randomBytes(200);
  feed(Buffer.concat([data(800, tail), chunk(c2, 0, NBD_REPLY_TYPE_OFFSET_HOLE, hole), data(0, b).subarray(0, 100)]));
  feed(Buffer.concat([data(0, b).subarray(100), chunk(c2, NBD_REPLY_FLAG_DONE, 0, new Uint8Array(0))]));
  bytesEqual(concat(await p1), a, "simple reply by views");
  bytesEqual(concat(await p2), Buffer.concat([b, Buffer.alloc(600), tail]), "structured reply by views");
  await client.close();
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
      const c = await connect(uri);
      const more = await connect(uri);
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
