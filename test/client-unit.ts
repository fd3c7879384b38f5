// Client library without external tools: URI parsing, request encoding, the reply receiver fed
// every transcript split at every byte boundary, and small fake servers on node:net that answer
// out of order, send garbage, drop the connection mid-reply, stay silent, or lack NBD_OPT_GO.
import { EventEmitter } from "node:events";
import { createServer, type Server, type Socket } from "node:net";
import { test } from "uvu";
import * as assert from "uvu/assert";
import {
  NBD_CMD_DISC, NBD_CMD_READ, NBD_CMD_WRITE, NBD_FLAG_HAS_FLAGS, NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES, NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, NBD_REP_ERR_UNSUP, NBD_REP_INFO, NBD_REP_META_CONTEXT,
  NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES,
} from "../src/protocol/constants.ts";
import {
  connect, describeExport, NbdClient, NbdClosedError, NbdDisconnectedError, NbdOptionError, NbdProtocolViolation,
  NbdRequestError, NbdTimeoutError, NbdUsageError, parseNbdUri, formatNbdUri, type Extent,
} from "../src/client/index.ts";
import { bytesEqual, deadline, rejects } from "./helpers/assert.ts";
import { replyChunk, simpleReply } from "./helpers/wire.ts";

// ----------------------------------------------------------------------------------------------
// URIs

test("URI: nbd://, nbd+unix://, short forms", () => {
  assert.equal(parseNbdUri("nbd://example.com/disk"), { transport: "tcp", host: "example.com", port: 10809, exportName: "disk" });
  assert.equal(parseNbdUri("nbd://127.0.0.1:12000"), { transport: "tcp", host: "127.0.0.1", port: 12000, exportName: "" });
  assert.equal(parseNbdUri("nbd://h/"), { transport: "tcp", host: "h", port: 10809, exportName: "" });
  assert.equal(parseNbdUri("nbd://h//disk").exportName, "/disk");
  assert.equal(parseNbdUri("nbd://h/a%20b%2Fc").exportName, "a b/c");
  assert.equal(parseNbdUri("nbd://[::1]:12001/x"), { transport: "tcp", host: "::1", port: 12001, exportName: "x" });
  assert.equal(parseNbdUri("nbd+unix:///vol?socket=/run/n.sock"), { transport: "unix", path: "/run/n.sock", exportName: "vol" });
  assert.equal(parseNbdUri("nbd+unix://?socket=%00abstract"), { transport: "unix", path: "\0abstract", exportName: "" });
  assert.equal(parseNbdUri("localhost:12002"), { transport: "tcp", host: "localhost", port: 12002, exportName: "" });
  assert.equal(parseNbdUri("[::1]:12002"), { transport: "tcp", host: "::1", port: 12002, exportName: "" });
  assert.equal(parseNbdUri("/tmp/s.sock"), { transport: "unix", path: "/tmp/s.sock", exportName: "" });
  assert.is(formatNbdUri(parseNbdUri("nbd://127.0.0.1:5/a b")), "nbd://127.0.0.1:5/a%20b");
  assert.is(formatNbdUri({ transport: "unix", path: "/s", exportName: "x/y" }), "nbd+unix:///x/y?socket=/s");
});

test("URI: unsupported and malformed forms give typed errors", () => {
  const code = (s: string) => {
    try {
      parseNbdUri(s);
    } catch (e) {
      assert.instance(e, NbdUsageError);
      return (e as NbdUsageError).code;
    }
    return "none";
  };
  assert.is(code("nbds://h/x?tls-type=anon"), "UNSUPPORTED_SCHEME");
  assert.is(code("nbds://h/x?tls-certificates=/d&tls-psk-file=/k"), "BAD_URI");
  assert.is(code("nbds+unix:///x"), "BAD_URI");
  assert.is(code("http://h/x"), "UNSUPPORTED_SCHEME");
  assert.is(code("nbd://h/x?tls-type=x509"), "BAD_URI");
  assert.is(code("nbd://h/x?tls-certificates=/d"), "BAD_URI");
  assert.is(code("nbd+unix:///x"), "BAD_URI");
  assert.is(code("nbd://h:99999/x"), "BAD_URI");
  assert.is(code("nbd://h/x?socket=/s"), "BAD_URI");
  assert.is(code("nbd://h/%zz"), "BAD_URI");
  assert.is(code("justahost"), "BAD_URI");
  assert.is(code("::1:80"), "BAD_URI");
});

// ----------------------------------------------------------------------------------------------
// Wire helpers for fake peers

function u32(b: Uint8Array, o: number): number {
  return ((b[o]! << 24) | (b[o + 1]! << 16) | (b[o + 2]! << 8) | b[o + 3]!) >>> 0;
}
function offsetData(cookie: number, flags: number, offset: number, data: Uint8Array): Buffer {
  const p = Buffer.alloc(8 + data.length);
  p.writeUInt32BE(offset, 4);
  p.set(data, 8);
  return replyChunk(cookie, flags, NBD_REPLY_TYPE_OFFSET_DATA, p);
}
function offsetHole(cookie: number, flags: number, offset: number, length: number): Buffer {
  const p = Buffer.alloc(12);
  p.writeUInt32BE(offset, 4);
  p.writeUInt32BE(length, 8);
  return replyChunk(cookie, flags, NBD_REPLY_TYPE_OFFSET_HOLE, p);
}
function errorChunk(cookie: number, errno: number, msg: string): Buffer {
  const m = Buffer.from(msg);
  const p = Buffer.alloc(6 + m.length);
  p.writeUInt32BE(errno, 0);
  p.writeUInt16BE(m.length, 4);
  p.set(m, 6);
  return replyChunk(cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, p);
}
function blockStatus(cookie: number, ctx: number, extents: [number, number][]): Buffer {
  const p = Buffer.alloc(4 + 8 * extents.length);
  p.writeUInt32BE(ctx, 0);
  extents.forEach(([len, flags], i) => {
    p.writeUInt32BE(len, 4 + 8 * i);
    p.writeUInt32BE(flags, 8 + 8 * i);
  });
  return replyChunk(cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, p);
}

/** The transport under test: an in-process socket stand-in that records writes and is fed replies. */
class FakeSocket extends EventEmitter {
  written: Buffer[] = [];
  destroyed = false;
  write(b: Uint8Array): boolean {
    this.written.push(Buffer.from(b));
    return true;
  }
  end(): void {
    queueMicrotask(() => this.destroy());
  }
  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    queueMicrotask(() => this.emit("close"));
  }
  setNoDelay(): void {}
}

const SIZE = 1 << 20;
const FLAGS = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES;
function fakeClient(timeoutMs = 5000): { client: NbdClient; sock: FakeSocket } {
  const sock = new FakeSocket();
  const client = new NbdClient({
    socket: sock as unknown as Socket, info: describeExport("", SIZE, FLAGS, true), structured: true,
    metaContexts: new Map([["base:allocation", 7]]), leftover: [], style: "newstyle-fixed",
  }, { requestTimeoutMs: timeoutMs });
  return { client, sock };
}

test("requests are encoded with cookie, flags, offset and length, batched per tick", async () => {
  const { client, sock } = fakeClient();
  const data = Buffer.alloc(100, 0xab);
  const p1 = client.pread(new Uint8Array(512), 4096);
  const p2 = client.pwrite(data, 2 ** 19 + 1, {});
  const p3 = client.zero(0, 8192, { noHole: true });
  await Promise.resolve();
  assert.is(sock.written.length, 1, "one write per tick");
  const w = sock.written[0]!;
  assert.is(w.length, 28 * 3 + 100);
  assert.is(u32(w, 0), 0x25609513);
  assert.is(w.readUInt16BE(6), NBD_CMD_READ);
  assert.is(Number(w.readBigUInt64BE(16)), 4096);
  assert.is(u32(w, 24), 512);
  assert.is(w.readUInt16BE(28 + 6), NBD_CMD_WRITE);
  assert.is(Number(w.readBigUInt64BE(28 + 16)), 2 ** 19 + 1);
  bytesEqual(w.subarray(56, 156), data, "inline write payload");
  assert.is(w.readUInt16BE(156 + 4), 2, "NO_HOLE flag");
  const cookies = [u32(w, 12), u32(w, 40), u32(w, 168)];
  assert.is(new Set(cookies).size, 3, "distinct cookies");
  sock.emit("data", Buffer.concat([simpleReply(cookies[2]!, 0), simpleReply(cookies[1]!, 0), simpleReply(cookies[0]!, 0, Buffer.alloc(512, 1))]));
  await Promise.all([p1, p2, p3]);
  const big = client.pwrite(Buffer.alloc(64 * 1024, 2), 0);
  await Promise.resolve();
  assert.is(sock.written.length, 3, "large payloads are written as they are, after their header");
  assert.is(sock.written[2]!.length, 64 * 1024);
  sock.emit("data", simpleReply(u32(sock.written[1]!, 12), 0));
  await big;
  const closing = client.close();
  await Promise.resolve();
  assert.is(sock.written[3]!.readUInt16BE(6), NBD_CMD_DISC);
  await closing;
  const e = await rejects(() => client.flush(), "flush after close");
  assert.instance(e, NbdClosedError);
});

/** Issues a fixed set of requests and returns the reply transcript answering them out of order. */
function scenario(client: NbdClient, sock: FakeSocket) {
  const readBuf = new Uint8Array(96).fill(0xee);
  const simpleBuf = new Uint8Array(16);
  const results = {
    read: client.pread(readBuf, 1000),
    simpleRead: client.pread(simpleBuf, 50),
    status: client.blockStatus(4096, 65536),
    failing: client.pread(new Uint8Array(8), 0),
    write: client.pwrite(new Uint8Array(8), 0),
    flush: client.flush(),
  };
  for (const p of Object.values(results)) p.catch(() => {});
  return {
    results, readBuf, simpleBuf,
    async transcript(): Promise<Buffer> {
      await Promise.resolve();
      const w = Buffer.concat(sock.written);
      const c = (i: number) => u32(w, 28 * i + 12 + (i > 4 ? 8 : 0));
      const payload = Buffer.alloc(32, 0x5a);
      return Buffer.concat([
        simpleReply(c(5), 0),
        offsetData(c(0), 0, 1000 + 64, payload),
        blockStatus(c(2), 7, [[8192, 3], [4096, 0], [1 << 20, 2]]),
        offsetHole(c(0), 0, 1000 + 32, 32),
        errorChunk(c(3), 5, "disk on fire"),
        simpleReply(c(4), 0),
        simpleReply(c(1), 0, Buffer.alloc(16, 9)),
        offsetData(c(0), 0, 1000, Buffer.alloc(32, 0x11)),
        replyChunk(c(0), NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE),
      ]);
    },
  };
}

async function checkScenario(s: ReturnType<typeof scenario>): Promise<void> {
  await s.results.read;
  await s.results.simpleRead;
  await s.results.write;
  await s.results.flush;
  const expected = Buffer.concat([Buffer.alloc(32, 0x11), Buffer.alloc(32, 0), Buffer.alloc(32, 0x5a)]);
  bytesEqual(s.readBuf, expected, "structured read");
  bytesEqual(s.simpleBuf, Buffer.alloc(16, 9), "simple read");
  const st = await s.results.status;
  assert.equal(st.get("base:allocation"), [
    { offset: 4096, length: 8192, flags: 3 }, { offset: 12288, length: 4096, flags: 0 }, { offset: 16384, length: 1 << 20, flags: 2 },
  ] satisfies Extent[]);
  const e = await rejects(() => s.results.failing, "error chunk");
  assert.instance(e, NbdRequestError);
  assert.is((e as NbdRequestError).code, "EIO");
  assert.is((e as NbdRequestError).serverMessage, "disk on fire");
}

test("replies in any order, split at every byte boundary", async () => {
  const first = fakeClient();
  const s0 = scenario(first.client, first.sock);
  const transcript = await s0.transcript();
  first.sock.emit("data", transcript);
  await checkScenario(s0);
  for (let cut = 1; cut < transcript.length; cut++) {
    const { client, sock } = fakeClient();
    const s = scenario(client, sock);
    const t = await s.transcript();
    sock.emit("data", t.subarray(0, cut));
    sock.emit("data", t.subarray(cut));
    await checkScenario(s);
    assert.is(client.inFlight, 0);
  }
  const { client, sock } = fakeClient();
  const s = scenario(client, sock);
  const t = await s.transcript();
  for (let i = 0; i < t.length; i++) sock.emit("data", t.subarray(i, i + 1));
  await checkScenario(s);
});

test("1000 pipelined reads answered in one chunk, in reverse order", async () => {
  const { client, sock } = fakeClient();
  const bufs = Array.from({ length: 1000 }, () => new Uint8Array(8));
  const ps = bufs.map((b, i) => client.pread(b, i * 8));
  await Promise.resolve();
  const w = Buffer.concat(sock.written);
  const replies: Buffer[] = [];
  for (let i = 999; i >= 0; i--) {
    const d = Buffer.alloc(8);
    d.writeUInt32BE(i, 4);
    replies.push(offsetData(u32(w, 28 * i + 12), NBD_REPLY_FLAG_DONE, i * 8, d));
  }
  sock.emit("data", Buffer.concat(replies));
  await Promise.all(ps);
  bufs.forEach((b, i) => assert.is(u32(b, 4), i));
  assert.is(client.stats.dataChunks, 1000);
});

test("protocol violations fail every pending request with a stable code", async () => {
  const cases: [string, (c: (i: number) => number) => Buffer][] = [
    ["BAD_REPLY_MAGIC", () => Buffer.from("HTTP/1.1 400 Bad Request\r\n\r\n")],
    ["UNKNOWN_COOKIE", () => simpleReply(424242, 0)],
    ["DATA_OUT_OF_RANGE", (c) => offsetData(c(0), NBD_REPLY_FLAG_DONE, 0, Buffer.alloc(8))],
    ["HOLE_OUT_OF_RANGE", (c) => offsetHole(c(0), NBD_REPLY_FLAG_DONE, 4096, 8192)],
    ["SHORT_READ", (c) => offsetData(c(0), NBD_REPLY_FLAG_DONE, 4096, Buffer.alloc(8))],
    ["UNKNOWN_CONTEXT", (c) => blockStatus(c(1), 99, [[4096, 0]])],
    ["BAD_CHUNK", (c) => replyChunk(c(1), NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, Buffer.alloc(20))],
    ["UNKNOWN_CHUNK_TYPE", (c) => replyChunk(c(0), NBD_REPLY_FLAG_DONE, 77)],
    ["BAD_BLOCK_STATUS", (c) => blockStatus(c(1), 7, [[0, 0]])],
  ];
  for (const [code, reply] of cases) {
    const { client, sock } = fakeClient();
    const read = client.pread(new Uint8Array(4096), 4096);
    const status = client.blockStatus(0, 4096);
    read.catch(() => {});
    status.catch(() => {});
    await Promise.resolve();
    const w = Buffer.concat(sock.written);
    sock.emit("data", reply((i) => u32(w, 28 * i + 12)));
    for (const p of [read, status]) {
      const e = await rejects(() => p, code);
      assert.instance(e, NbdProtocolViolation, code);
      assert.is((e as NbdProtocolViolation).code, code);
    }
    assert.ok(sock.destroyed, `${code}: connection dropped`);
    const later = await rejects(() => client.flush(), "after violation");
    assert.is((later as NbdProtocolViolation).code, code);
  }
});

test("client-side checks: alignment, range, read-only, unsupported commands, splitting", async () => {
  const sock = new FakeSocket();
  const info = { ...describeExport("", 1 << 24, NBD_FLAG_HAS_FLAGS | 2 /* READ_ONLY */, true), blockSize: { minimum: 512, preferred: 4096, maximum: 65536 } };
  const client = new NbdClient({ socket: sock as unknown as Socket, info, structured: true, metaContexts: new Map(), leftover: [], style: "newstyle-fixed" });
  const code = async (p: () => Promise<unknown>) => ((await rejects(p, "usage")) as NbdUsageError).code;
  assert.is(await code(() => client.pread(new Uint8Array(100), 0)), "MISALIGNED");
  assert.is(await code(() => client.pread(new Uint8Array(512), 100)), "MISALIGNED");
  assert.is(await code(() => client.pread(new Uint8Array(512), 1 << 24)), "OUT_OF_RANGE");
  assert.is(await code(() => client.pwrite(new Uint8Array(512), 0)), "READ_ONLY");
  assert.is(await code(() => client.flush()), "UNSUPPORTED");
  assert.is(await code(() => client.trim(0, 512)), "UNSUPPORTED");
  assert.is(await code(() => client.pread(new Uint8Array(512), 0, { df: true })), "UNSUPPORTED");
  assert.is(await code(() => client.blockStatus(0, 512)), "UNSUPPORTED");
  assert.is(sock.written.length, 0, "nothing was sent");
  const buf = new Uint8Array(200 * 1024);
  const p = client.pread(buf, 65536);
  await Promise.resolve();
  const w = Buffer.concat(sock.written);
  assert.is(w.length, 28 * 4, "200 KiB split into 64+64+64+8 KiB");
  const lens = [0, 1, 2, 3].map((i) => u32(w, 28 * i + 24));
  assert.equal(lens, [65536, 65536, 65536, 8192]);
  sock.emit("data", Buffer.concat([0, 1, 2, 3].map((i) => simpleReply(u32(w, 28 * i + 12), 0, Buffer.alloc(lens[i]!, i + 1)))));
  await p;
  assert.is(buf[0], 1);
  assert.is(buf[65536 * 3], 4);
  assert.is(buf[buf.length - 1], 4);
  client.destroy();
});

// ----------------------------------------------------------------------------------------------
// Fake servers on node:net

interface WireRequest { type: number; flags: number; cookie: number; offset: number; length: number }
interface FakeServerOpts {
  noGo?: boolean;
  /** Called once per transmission request; write replies on `sock`. */
  onRequest?(req: WireRequest, sock: Socket): void;
  /** Replaces the whole server side after accept. */
  raw?(sock: Socket): void;
}

async function fakeServer(opts: FakeServerOpts): Promise<{ server: Server; uri: string; close(): Promise<void> }> {
  const sockets = new Set<Socket>();
  const server = createServer((sock) => {
    sockets.add(sock);
    sock.on("close", () => sockets.delete(sock));
    sock.on("error", () => {});
    if (opts.raw) return opts.raw(sock);
    const greet = Buffer.alloc(18);
    greet.write("NBDMAGICIHAVEOPT", 0, "latin1");
    greet.writeUInt16BE(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES, 16);
    sock.write(greet);
    let buf = Buffer.alloc(0);
    let phase: "flags" | "options" | "transmission" = "flags";
    const optReply = (opt: number, type: number, data: Buffer = Buffer.alloc(0)) => {
      const h = Buffer.alloc(20 + data.length);
      h.writeUInt32BE(0x0003e889, 0);
      h.writeUInt32BE(0x045565a9, 4);
      h.writeUInt32BE(opt, 8);
      h.writeUInt32BE(type, 12);
      h.writeUInt32BE(data.length, 16);
      data.copy(h, 20);
      sock.write(h);
    };
    const exportInfo = () => {
      const d = Buffer.alloc(12);
      d.writeUInt16BE(0, 0);
      d.writeUInt32BE(SIZE, 6);
      d.writeUInt16BE(FLAGS, 10);
      return d;
    };
    sock.on("data", (c: Buffer) => {
      buf = Buffer.concat([buf, c]);
      for (;;) {
        if (phase === "flags") {
          if (buf.length < 4) return;
          buf = buf.subarray(4);
          phase = "options";
        } else if (phase === "options") {
          if (buf.length < 16) return;
          const opt = buf.readUInt32BE(8);
          const len = buf.readUInt32BE(12);
          if (buf.length < 16 + len) return;
          buf = buf.subarray(16 + len);
          if (opt === NBD_OPT_STRUCTURED_REPLY) optReply(opt, NBD_REP_ACK);
          else if (opt === NBD_OPT_SET_META_CONTEXT) {
            const d = Buffer.alloc(4 + 15);
            d.writeUInt32BE(7, 0);
            d.write("base:allocation", 4);
            optReply(opt, NBD_REP_META_CONTEXT, d);
            optReply(opt, NBD_REP_ACK);
          } else if (opt === NBD_OPT_GO && !opts.noGo) {
            optReply(opt, NBD_REP_INFO, exportInfo());
            optReply(opt, NBD_REP_ACK);
            phase = "transmission";
          } else if (opt === NBD_OPT_EXPORT_NAME) {
            sock.write(exportInfo().subarray(2));
            phase = "transmission";
          } else if (opt === NBD_OPT_ABORT) {
            optReply(opt, NBD_REP_ACK);
            sock.end();
            return;
          } else optReply(opt, NBD_REP_ERR_UNSUP);
        } else {
          if (buf.length < 28) return;
          const req = {
            flags: buf.readUInt16BE(4), type: buf.readUInt16BE(6), cookie: buf.readUInt32BE(12),
            offset: Number(buf.readBigUInt64BE(16)), length: buf.readUInt32BE(24),
          };
          const total = 28 + (req.type === NBD_CMD_WRITE ? req.length : 0);
          if (buf.length < total) return;
          buf = buf.subarray(total);
          if (req.type === NBD_CMD_DISC) {
            sock.end();
            return;
          }
          opts.onRequest?.(req, sock);
        }
      }
    });
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const port = (server.address() as { port: number }).port;
  return {
    server, uri: `nbd://127.0.0.1:${port}/`,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}

test("fake server: handshake, out-of-order replies, then a clean DISC", () => deadline(10_000, "fake server", async () => {
  const held: [WireRequest, Socket][] = [];
  const srv = await fakeServer({
    onRequest(req, sock) {
      held.push([req, sock]);
      if (held.length === 3) for (const [r, s] of held.reverse()) s.write(r.type === NBD_CMD_READ ? simpleReply(r.cookie, 0, Buffer.alloc(r.length, r.offset & 0xff)) : simpleReply(r.cookie, 0));
    },
  });
  try {
    const c = await connect(srv.uri);
    assert.is(c.size, SIZE);
    assert.ok(c.structured);
    assert.equal([...c.metaContexts], [["base:allocation", 7]]);
    const [a, b] = await Promise.all([c.read(5, 10), c.read(9, 3), c.flush()]);
    bytesEqual(a, Buffer.alloc(10, 5));
    bytesEqual(b, Buffer.alloc(3, 9));
    await c.close();
  } finally {
    await srv.close();
  }
}));

test("fake server without NBD_OPT_GO: EXPORT_NAME fallback", () => deadline(10_000, "no GO", async () => {
  const srv = await fakeServer({ noGo: true, onRequest: (r, s) => s.write(simpleReply(r.cookie, 0, Buffer.alloc(r.length, 3))) });
  try {
    const c = await connect(srv.uri);
    assert.is(c.size, SIZE);
    bytesEqual(await c.read(0, 4), Buffer.alloc(4, 3));
    await c.close();
  } finally {
    await srv.close();
  }
}));

test("a server that drops the connection mid-reply fails every pending request", () => deadline(10_000, "drop", async () => {
  let n = 0;
  const srv = await fakeServer({
    onRequest(r, sock) {
      if (++n === 5) {
        // Half a reply, then a hard close.
        sock.write(simpleReply(r.cookie, 0, Buffer.alloc(r.length)).subarray(0, 16 + r.length / 2));
        setTimeout(() => sock.destroy(), 20);
      }
    },
  });
  try {
    const c = await connect(srv.uri, { requestTimeoutMs: 30_000 });
    const ps = Array.from({ length: 8 }, (_, i) => c.read(i * 4096, 4096));
    for (const p of ps) {
      const e = await rejects(() => p, "pending read");
      assert.instance(e, NbdDisconnectedError);
      assert.is((e as NbdDisconnectedError).code, "DISCONNECTED");
    }
    assert.instance(await rejects(() => c.read(0, 1), "later read"), NbdDisconnectedError);
    await c.closed;
  } finally {
    await srv.close();
  }
}));

test("a server that sends garbage: during the greeting, and in transmission", () => deadline(10_000, "garbage", async () => {
  const greetGarbage = await fakeServer({ raw: (s) => s.write("SSH-2.0-OpenSSH_9.2\r\n" + "x".repeat(64)) });
  try {
    const e = await rejects(() => connect(greetGarbage.uri), "connect to garbage");
    assert.instance(e, NbdProtocolViolation);
    assert.is((e as NbdProtocolViolation).code, "BAD_GREETING");
  } finally {
    await greetGarbage.close();
  }
  const srv = await fakeServer({ onRequest: (_r, s) => s.write(Buffer.from("\x00\x01garbage garbage garbage garbage")) });
  try {
    const c = await connect(srv.uri);
    const ps = [c.read(0, 512), c.read(512, 512), c.flush()];
    for (const p of ps) assert.is(((await rejects(() => p, "garbage reply")) as NbdProtocolViolation).code, "BAD_REPLY_MAGIC");
  } finally {
    await srv.close();
  }
}));

test("a silent server: every request has a deadline", () => deadline(10_000, "timeout", async () => {
  const srv = await fakeServer({ onRequest: () => {} });
  try {
    const c = await connect(srv.uri, { requestTimeoutMs: 200 });
    const t0 = performance.now();
    const ps = [c.read(0, 512), c.flush()];
    for (const p of ps) assert.instance(await rejects(() => p, "silent"), NbdTimeoutError);
    const took = performance.now() - t0;
    assert.ok(took >= 190 && took < 2000, `timed out after ${took} ms`);
  } finally {
    await srv.close();
  }
  const mute = await fakeServer({ raw: () => {} });
  try {
    const e = await rejects(() => connect(mute.uri, { connectTimeoutMs: 200 }), "silent greeting");
    assert.instance(e, NbdTimeoutError);
  } finally {
    await mute.close();
  }
}));

test("connection refused and unknown exports are typed", () => deadline(10_000, "refused", async () => {
  const e = await rejects(() => connect("nbd://127.0.0.1:1/"), "refused");
  assert.instance(e, NbdDisconnectedError);
  assert.is((e as NbdDisconnectedError).code, "CONNECT_FAILED");
  const srv = await fakeServer({
    raw(sock) {
      // A server that refuses every GO with ERR_UNKNOWN.
      const greet = Buffer.alloc(18);
      greet.write("NBDMAGICIHAVEOPT", 0, "latin1");
      greet.writeUInt16BE(NBD_FLAG_FIXED_NEWSTYLE, 16);
      sock.write(greet);
      let buf = Buffer.alloc(0);
      sock.on("data", (c: Buffer) => {
        buf = Buffer.concat([buf, c]);
        if (buf.length >= 4 + 16 && buf.length >= 20 + buf.readUInt32BE(16)) {
          const opt = buf.readUInt32BE(12);
          buf = buf.subarray(20 + buf.readUInt32BE(16));
          const msg = Buffer.from("no such export");
          const h = Buffer.alloc(20 + msg.length);
          h.writeUInt32BE(0x0003e889, 0);
          h.writeUInt32BE(0x045565a9, 4);
          h.writeUInt32BE(opt, 8);
          h.writeUInt32BE(opt === NBD_OPT_GO ? 0x80000006 : NBD_REP_ERR_UNSUP, 12);
          h.writeUInt32BE(msg.length, 16);
          msg.copy(h, 20);
          sock.write(h);
          buf = Buffer.concat([Buffer.alloc(4), buf]);
        }
      });
    },
  });
  try {
    const err = await rejects(() => connect(srv.uri + "nope", { structuredReplies: false }), "unknown export");
    assert.instance(err, NbdOptionError);
    assert.is((err as NbdOptionError).code, "ERR_UNKNOWN");
    assert.match(err.message, /no such export/);
  } finally {
    await srv.close();
  }
}));


test.run();
