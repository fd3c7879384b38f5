// Extended headers in the client library: 32-byte requests (PAYLOAD_LEN on payloads, 64-bit
// effect lengths, the BLOCK_STATUS context filter) checked byte by byte; extended replies written
// from the spec fed in any order and split at every byte boundary; every reply form that is
// forbidden under (or without) extended headers is a protocol violation. Then the client against
// our server over TCP, and against nbdkit, which does not speak them (the client falls back).
import { EventEmitter } from "node:events";
import type { Socket } from "node:net";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import {
  NBD_CMD_BLOCK_STATUS, NBD_CMD_DISC, NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_SEND_DF, NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES, NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS, NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_NONE, NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
} from "../src/protocol/constants.ts";
import {
  connect, describeExport, NbdClient, NbdProtocolViolation, NbdRequestError, NbdUsageError, type Extent,
} from "../src/client/index.ts";
import { MemoryDevice } from "../src/devices/memory.ts";
import type { ExtentSink, MetaContextProvider } from "../src/devices/types.ts";
import { NbdServer } from "../src/server/server.ts";
import { silentLogger } from "../src/server/log.ts";
import { bytesEqual, deadline, rejects } from "./helpers/assert.ts";
import { need, scratch, SYSTEM_PATH } from "./helpers/env.ts";
import {
  CMD_FLAG_PAYLOAD_LEN, EXT_REQUEST_MAGIC, FLAG_BLOCK_STATUS_PAYLOAD, REPLY_TYPE_BLOCK_STATUS_EXT, extReply, statusExtPayload,
} from "./helpers/extended.ts";
import { replyChunk, simpleReply } from "./helpers/wire.ts";

need("nbdkit");
const MiB = 1024 * 1024;

// ----------------------------------------------------------------------------------------------
// A client on a stand-in socket

class FakeSocket extends EventEmitter {
  written: Buffer[] = [];
  destroyed = false;
  write(b: Uint8Array): boolean { this.written.push(Buffer.from(b)); return true; }
  end(): void { queueMicrotask(() => this.destroy()); }
  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    queueMicrotask(() => this.emit("close"));
  }
  setNoDelay(): void {}
  /** Everything written so far, as one buffer. */
  all(): Buffer { return Buffer.concat(this.written); }
}

const SIZE = 2 ** 40;
const FLAGS = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_DF | FLAG_BLOCK_STATUS_PAYLOAD;
const BASE = 7;
const ONES = 9;

function fakeClient(extended = true): { client: NbdClient; sock: FakeSocket } {
  const sock = new FakeSocket();
  const client = new NbdClient({
    socket: sock as unknown as Socket, info: describeExport("", SIZE, FLAGS, true), structured: true, extended,
    metaContexts: new Map([["base:allocation", BASE], ["x-test:ones", ONES]]), leftover: [], style: "newstyle-fixed",
  }, { requestTimeoutMs: 5000 });
  return { client, sock };
}

/** The 32-byte requests in `w` (with their payloads skipped by PAYLOAD_LEN). */
function extRequests(w: Buffer): { flags: number; type: number; cookie: bigint; offset: bigint; length: bigint; payload: Buffer }[] {
  const out = [];
  for (let p = 0; p < w.length;) {
    assert.is(w.readUInt32BE(p), EXT_REQUEST_MAGIC, `extended request magic at ${p}`);
    const flags = w.readUInt16BE(p + 4);
    const length = w.readBigUInt64BE(p + 24);
    const n = flags & CMD_FLAG_PAYLOAD_LEN ? Number(length) : 0;
    out.push({ flags, type: w.readUInt16BE(p + 6), cookie: w.readBigUInt64BE(p + 8), offset: w.readBigUInt64BE(p + 16), length, payload: w.subarray(p + 32, p + 32 + n) });
    p += 32 + n;
  }
  return out;
}

test("requests: 32-byte headers, PAYLOAD_LEN on payloads only, 64-bit effect lengths unsplit, the context filter as a payload", async () => {
  const { client, sock } = fakeClient();
  const data = Buffer.alloc(100, 0xab);
  const ps = [
    client.pread(new Uint8Array(512), 2 ** 35),
    client.pwrite(data, 2 ** 33 + 1),
    client.zero(0, 2 ** 39 + 4096, { noHole: true }),
    client.trim(2 ** 39, 2 ** 39),
    client.blockStatus(4096, 2 ** 38, { contexts: ["x-test:ones"] }),
    client.blockStatus(0, 2 ** 36),
  ];
  for (const p of ps) p.catch(() => {});
  await Promise.resolve();
  const r = extRequests(sock.all());
  assert.equal(r.map((x) => [x.type, x.flags, x.offset, x.length]), [
    [NBD_CMD_READ, 0, 2n ** 35n, 512n],
    [NBD_CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 2n ** 33n + 1n, 100n],
    [NBD_CMD_WRITE_ZEROES, 2, 0n, 2n ** 39n + 4096n],
    [4, 0, 2n ** 39n, 2n ** 39n],
    [NBD_CMD_BLOCK_STATUS, CMD_FLAG_PAYLOAD_LEN, 4096n, 12n],
    [NBD_CMD_BLOCK_STATUS, 0, 0n, 2n ** 36n],
  ]);
  bytesEqual(r[1]!.payload, data, "write payload");
  assert.is(r[4]!.payload.readBigUInt64BE(0), 2n ** 38n, "filter: effect length");
  assert.is(r[4]!.payload.readUInt32BE(8), ONES, "filter: the context id");
  assert.is(client.stats.requests, 6, "nothing split");
  client.destroy();
});

test("close sends an extended DISC", async () => {
  const { client, sock } = fakeClient();
  const closing = client.close();
  await Promise.resolve();
  const r = extRequests(sock.all());
  assert.equal(r.map((x) => x.type), [NBD_CMD_DISC]);
  await closing;
});

test("the context filter needs extended headers and a server that offers it, and selected contexts", async () => {
  const compact = fakeClient(false).client;
  assert.is(((await rejects(() => compact.blockStatus(0, 4096, { contexts: ["base:allocation"] }), "compact")) as NbdUsageError).code, "UNSUPPORTED");
  const { client } = fakeClient();
  assert.is(((await rejects(() => client.blockStatus(0, 4096, { contexts: ["qemu:nope"] }), "unselected")) as NbdUsageError).code, "UNSUPPORTED");
  assert.is(((await rejects(() => client.blockStatus(0, 4096, { contexts: [] }), "empty")) as NbdUsageError).code, "BAD_ARGUMENT");
  compact.destroy();
  client.destroy();
});

/** A READ, two block statuses, a failing READ, a WRITE and a FLUSH, answered out of order. */
function scenario(client: NbdClient, sock: FakeSocket) {
  const readBuf = new Uint8Array(96).fill(0xee);
  const results = {
    read: client.pread(readBuf, 2 ** 33),
    status: client.blockStatus(2 ** 32, 2 ** 34),
    filtered: client.blockStatus(0, 4096, { contexts: ["x-test:ones"] }),
    failing: client.pread(new Uint8Array(8), 0),
    write: client.pwrite(new Uint8Array(8), 512),
    flush: client.flush(),
  };
  for (const p of Object.values(results)) p.catch(() => {});
  return {
    results, readBuf,
    async transcript(): Promise<Buffer> {
      await Promise.resolve();
      const r = extRequests(sock.all());
      const c = (i: number) => r[i]!.cookie;
      const at = (i: number) => r[i]!.offset;
      const data = (off: number, fill: number) => { const p = Buffer.alloc(8 + 32, fill); p.writeBigUInt64BE(BigInt(off)); return p; };
      const hole = Buffer.alloc(12);
      hole.writeBigUInt64BE(2n ** 33n + 32n);
      hole.writeUInt32BE(32, 8);
      const err = Buffer.alloc(6 + 12);
      err.writeUInt32BE(5, 0);
      err.writeUInt16BE(12, 4);
      err.write("disk on fire", 6);
      return Buffer.concat([
        extReply(c(5), NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, at(5)),
        extReply(c(0), 0, NBD_REPLY_TYPE_OFFSET_DATA, at(0), data(2 ** 33 + 64, 0x5a)),
        extReply(c(1), 0, REPLY_TYPE_BLOCK_STATUS_EXT, at(1), statusExtPayload(BASE, [[2n ** 33n, 3], [4096, 0], [2n ** 34n, 2]])),
        extReply(c(0), 0, NBD_REPLY_TYPE_OFFSET_HOLE, at(0), hole),
        extReply(c(3), NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, at(3), err),
        extReply(c(2), NBD_REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS_EXT, at(2), statusExtPayload(ONES, [[4096, 1]])),
        extReply(c(1), NBD_REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS_EXT, at(1), statusExtPayload(ONES, [[2n ** 35n, 1]])),
        extReply(c(4), NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, at(4)),
        extReply(c(0), NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, at(0), data(2 ** 33, 0x11)),
      ]);
    },
  };
}

async function checkScenario(s: ReturnType<typeof scenario>): Promise<void> {
  await Promise.all([s.results.read, s.results.write, s.results.flush]);
  bytesEqual(s.readBuf, Buffer.concat([Buffer.alloc(32, 0x11), Buffer.alloc(32, 0), Buffer.alloc(32, 0x5a)]), "read");
  const st = await s.results.status;
  assert.equal(st.get("base:allocation"), [
    { offset: 2 ** 32, length: 2 ** 33, flags: 3 }, { offset: 2 ** 32 + 2 ** 33, length: 4096, flags: 0 },
    { offset: 2 ** 32 + 2 ** 33 + 4096, length: 2 ** 34, flags: 2 },
  ] satisfies Extent[]);
  assert.equal(st.get("x-test:ones"), [{ offset: 2 ** 32, length: 2 ** 35, flags: 1 }]);
  assert.equal([...(await s.results.filtered).keys()], ["x-test:ones"]);
  const e = await rejects(() => s.results.failing, "error chunk");
  assert.instance(e, NbdRequestError);
  assert.is((e as NbdRequestError).serverMessage, "disk on fire");
}

test("extended replies in any order, whole, split at every byte boundary, byte by byte", async () => {
  const one = async (feed: (sock: FakeSocket, t: Buffer) => void) => {
    const { client, sock } = fakeClient();
    const s = scenario(client, sock);
    feed(sock, await s.transcript());
    await checkScenario(s);
    assert.is(client.inFlight, 0);
    client.destroy();
  };
  await one((sock, t) => sock.emit("data", t));
  const len = (await (async () => { const f = fakeClient(); const t = await scenario(f.client, f.sock).transcript(); f.client.destroy(); return t.length; })());
  for (let cut = 1; cut < len; cut++) await one((sock, t) => { sock.emit("data", t.subarray(0, cut)); sock.emit("data", t.subarray(cut)); });
  await one((sock, t) => { for (let i = 0; i < t.length; i++) sock.emit("data", t.subarray(i, i + 1)); });
});

test("forbidden reply forms are protocol violations with stable codes", async () => {
  type Case = [string, boolean, (c: bigint, at: bigint) => Buffer];
  const cases: Case[] = [
    ["UNEXPECTED_SIMPLE_REPLY", true, (c) => simpleReply(Number(c), 0)],
    ["UNEXPECTED_STRUCTURED_REPLY", true, (c) => replyChunk(Number(c), NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE)],
    ["UNEXPECTED_EXTENDED_REPLY", false, (c, at) => extReply(c, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, at)],
    ["BAD_REPLY_OFFSET", true, (c, at) => extReply(c, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, at + 512n)],
    ["BAD_CHUNK", true, (c, at) => extReply(c, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, at, new Uint8Array(0), 2n ** 32n)],
    ["BAD_CHUNK", true, (c, at) => {
      const p = Buffer.alloc(12);
      p.writeUInt32BE(BASE);
      p.writeUInt32BE(4096, 4);
      return extReply(c, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, at, p);
    }],
    ["BAD_BLOCK_STATUS", true, (c, at) => extReply(c, NBD_REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS_EXT, at, statusExtPayload(BASE, [[4096, 0]], 2))],
    ["BAD_BLOCK_STATUS", true, (c, at) => extReply(c, NBD_REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS_EXT, at, statusExtPayload(BASE, [[0, 0]]))],
  ];
  for (const [code, extended, reply] of cases) {
    const { client, sock } = fakeClient(extended);
    const status = client.blockStatus(4096, 4096);
    status.catch(() => {});
    await Promise.resolve();
    const w = sock.all();
    sock.emit("data", reply(w.readBigUInt64BE(8), w.readBigUInt64BE(16))); // cookie and offset: same place in both request forms
    const e = await rejects(() => status, code);
    assert.instance(e, NbdProtocolViolation, code);
    assert.is((e as NbdProtocolViolation).code, code);
    assert.ok(sock.destroyed, `${code}: connection dropped`);
  }
});

// ----------------------------------------------------------------------------------------------
// Against servers

/** A sparse memory disk with a second context, "x-test:ones", status 1 everywhere. */
class TwoContexts extends MemoryDevice {
  metaContexts(): MetaContextProvider[] {
    return [{ name: "x-test:ones", extents: (o: number, l: number, _f: number, sink: ExtentSink) => { sink.add(o, l, 1); } }];
  }
}

test("against bun-nbd over TCP: 64-bit lengths, BLOCK_STATUS_EXT, the filter, DF, clean close", () => deadline(30_000, "bun-nbd", async () => {
  const server = new NbdServer([{ name: "big", device: new TwoContexts(2 ** 40) }], { log: silentLogger });
  const { port } = server.listenTcp("127.0.0.1", 0);
  try {
    const c = await connect(`nbd://127.0.0.1:${port}/big`, { extendedHeaders: true, metaContexts: ["base:allocation", "x-test:ones"] });
    assert.ok(c.extended && c.structured && c.canFilterStatus && c.info.canDf);
    const data = Buffer.alloc(3 * MiB + 5);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7) & 255;
    await c.pwrite(data, 2 ** 36 - MiB);
    bytesEqual(await c.read(2 ** 36 - MiB, data.length), data, "read back across 2^36");
    const before = c.stats.requests;
    await c.zero(2 ** 36, 2 ** 32 + 4096); // (the memory device zeroes page by page: keep it to 4 GiB)
    assert.is(c.stats.requests, before + 1, "one WRITE_ZEROES over 4 GiB");
    const back = await c.read(2 ** 36 - MiB, data.length);
    bytesEqual(back.subarray(0, MiB), data.subarray(0, MiB), "before the zeroed range");
    bytesEqual(back.subarray(MiB), new Uint8Array(data.length - MiB), "zeroed");
    const map = await c.extents(0, 2 ** 40);
    assert.ok(map.some((e) => e.length > 2 ** 32), "extents longer than 2^32");
    assert.is(map.reduce((a, e) => a + e.length, 0), 2 ** 40);
    const ones = await c.blockStatus(0, 2 ** 39, { contexts: ["x-test:ones"] });
    assert.equal([...ones], [["x-test:ones", [{ offset: 0, length: 2 ** 39, flags: 1 }]]]);
    assert.is((await c.read(2 ** 36 - 4096, 65536, { df: true })).length, 65536);
    assert.instance(await rejects(() => c.pread(new Uint8Array(2), 2 ** 40 - 1), "past the end"), NbdUsageError);
    assert.is(c.stats.simpleReplies, 0);
    await c.trim(2 ** 36 - 2 ** 32, 2 ** 33);
    await c.flush();
    await c.close();
    assert.not.ok(c.failure instanceof NbdProtocolViolation);
  } finally {
    await server.close(0);
  }
}));

test("against nbdkit, which has no extended headers: the client falls back to structured replies", () => deadline(30_000, "nbdkit", async () => {
  const dir = scratch("bun-nbd-client-ext-");
  const sock = join(dir, "nbdkit.sock");
  const proc = Bun.spawn(["nbdkit", "-f", "-U", sock, "memory", "size=64M"], { stdout: "ignore", stderr: "ignore", env: { ...process.env, PATH: SYSTEM_PATH } });
  try {
    let c: NbdClient | null = null;
    for (let i = 0; !c; i++) {
      try {
        c = await connect(`nbd+unix:///?socket=${sock}`, { extendedHeaders: true, connectTimeoutMs: 1000 });
      } catch (e) {
        if (i > 100) throw e;
        await Bun.sleep(50);
      }
    }
    assert.ok(!c.extended && c.structured, "fell back to structured replies");
    await c.pwrite(Buffer.alloc(4096, 3), 4096);
    bytesEqual(await c.read(4096, 4096), Buffer.alloc(4096, 3), "read back");
    assert.ok((await c.extents(0, 64 * MiB)).length >= 2);
    await c.close();
  } finally {
    proc.kill();
    await proc.exited;
  }
}));

test.run();
