// Two conformance rules of the transmission phase, in process through the session state machine:
// a DF read without structured replies is EINVAL; and block sizes bind only the clients that
// agreed to them (GO asking for NBD_INFO_BLOCK_SIZE): their payloads above the advertised maximum
// get EINVAL with the payload consumed, while EXPORT_NAME and GO-without clients keep the legacy
// 64 MiB limit (old clients and the reference tester send 48 MiB writes).
import { suite } from "uvu";
import * as assert from "uvu/assert";
import {
  NBD_CMD_FLAG_DF, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_WRITE, NBD_EINVAL, NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME,
  NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_STRUCTURED_REPLY, NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_OFFSET_DATA,
} from "../src/protocol/constants.ts";
import { getU16, getU32 } from "../src/protocol/codec.ts";
import { MemoryDevice } from "../src/devices/memory.ts";
import type { BlockSize, ExportSpec } from "../src/devices/types.ts";
import { NbdServer } from "../src/server/server.ts";
import { Session } from "../src/server/session.ts";
import type { Transport } from "../src/server/types.ts";
import { silentLogger } from "../src/server/log.ts";
import { bytesEqual } from "./helpers/assert.ts";
import { cat, clientFlags, encodeInfoRequest, option, request } from "./helpers/wire.ts";

const MiB = 1024 * 1024;

/** Keeps what the server sends as chunks (no per-byte arrays: some replies here are 48 MiB). */
class ChunkTransport implements Transport {
  out: Uint8Array[] = [];
  ended = false;
  destroyed = false;
  send(b: Uint8Array): void { this.out.push(b.slice()); }
  sendTransient(b: Uint8Array): void { this.send(b); }
  queued(): number { return 0; }
  pause(): void {}
  resume(): void {}
  end(): void { this.ended = true; }
  destroy(): void { this.destroyed = true; }
  take(): Buffer { const b = Buffer.concat(this.out); this.out = []; return b; }
}

/** A memory device that advertises the given block sizes (default: the device's own defaults). */
class SizedMemory extends MemoryDevice {
  constructor(size: number, private readonly bs?: BlockSize) { super(size); }
  blockSize(): BlockSize | undefined { return this.bs; }
}

function session(spec: ExportSpec) {
  const t = new ChunkTransport();
  const s = new Session(t, new NbdServer([spec], { log: silentLogger }), silentLogger, "test");
  return { t, s };
}

const go = (infos: number[]) => option(NBD_OPT_GO, encodeInfoRequest("", infos));
const info = (infos: number[]) => option(NBD_OPT_INFO, encodeInfoRequest("", infos));
const pattern = (n: number, seed: number) => {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = (i * 13 + seed) & 255;
  return b;
};

interface Reply { cookie: number; error: number; type?: number; data: Buffer }

/**
 * Replies after the handshake: simple replies (a READ's data follows when `readLengths` names its
 * cookie) or structured chunks (errors decoded).
 */
function replies(b: Buffer, readLengths = new Map<number, number>()): Reply[] {
  const out: Reply[] = [];
  let p = 0;
  while (p < b.length) {
    const magic = b.readUInt32BE(p);
    const cookie = b.readUInt32BE(p + 12);
    if (magic === 0x67446698) {
      const error = b.readUInt32BE(p + 4);
      const n = error ? 0 : readLengths.get(cookie) ?? 0;
      out.push({ cookie, error, data: b.subarray(p + 16, p + 16 + n) });
      p += 16 + n;
    } else if (magic === 0x668e33ef) {
      const type = b.readUInt16BE(p + 6);
      const n = b.readUInt32BE(p + 16);
      const data = b.subarray(p + 20, p + 20 + n);
      out.push({ cookie, type, error: type === NBD_REPLY_TYPE_ERROR ? data.readUInt32BE(0) : 0, data });
      p += 20 + n;
    } else {
      throw new Error(`unexpected magic 0x${magic.toString(16)} at ${p}`);
    }
  }
  return out;
}

/** Sends `handshake`, drops its output, returns the session ready for requests. */
function transmitting(handshake: Uint8Array, spec: ExportSpec = { name: "disk", device: new MemoryDevice(128 * MiB) }) {
  const c = session(spec);
  c.s.onData(handshake);
  c.t.take();
  return c;
}

/** A WRITE of `len` bytes fed in 1 MiB pieces, then a READ of 16 bytes at `offset`, answered in order. */
function oversizedWrite(c: ReturnType<typeof transmitting>, len: number, offset = 0): Reply[] {
  c.s.onData(request(NBD_CMD_WRITE, { cookie: 1, offset, length: len }));
  for (let sent = 0; sent < len; sent += MiB) c.s.onData(new Uint8Array(Math.min(MiB, len - sent)).fill(0xee));
  c.s.onData(request(NBD_CMD_READ, { cookie: 2, offset, length: 16 }));
  return replies(c.t.take(), new Map([[2, 16]]));
}

// --------------------------------------------------------------------------------------------
const DF = suite("DF without structured replies");

DF("a DF read without structured replies: EINVAL (simple reply, no data), and the session goes on", () => {
  const c = transmitting(cat(clientFlags(), go([NBD_INFO_BLOCK_SIZE])));
  c.s.onData(cat(
    request(NBD_CMD_READ, { cookie: 1, flags: NBD_CMD_FLAG_DF, offset: 0, length: 512 }),
    request(NBD_CMD_READ, { cookie: 2, offset: 0, length: 512 }),
  ));
  const r = replies(c.t.take(), new Map([[2, 512]]));
  assert.equal(r.map((m) => [m.cookie, m.error]), [[1, NBD_EINVAL], [2, 0]]);
  assert.is(r[1]!.data.length, 512);
  assert.not.ok(c.t.destroyed);
});

DF("the same read with structured replies: one data chunk", () => {
  const c = transmitting(cat(clientFlags(), option(NBD_OPT_STRUCTURED_REPLY), go([NBD_INFO_BLOCK_SIZE])));
  c.s.onData(request(NBD_CMD_READ, { cookie: 1, flags: NBD_CMD_FLAG_DF, offset: 0, length: 512 }));
  const r = replies(c.t.take());
  assert.equal(r.map((m) => [m.cookie, m.type]), [[1, NBD_REPLY_TYPE_OFFSET_DATA]]);
});

DF.run();

// --------------------------------------------------------------------------------------------
const B = suite("block sizes bind the clients that agreed");

const LIMIT = 32 * MiB; // the default advertised maximum payload

B("GO with NBD_INFO_BLOCK_SIZE: a WRITE above the maximum gets EINVAL, its payload is consumed, nothing is written", () => {
  for (const structured of [false, true]) {
    const c = transmitting(cat(clientFlags(), ...(structured ? [option(NBD_OPT_STRUCTURED_REPLY)] : []), go([NBD_INFO_BLOCK_SIZE])));
    const r = oversizedWrite(c, LIMIT + 4096, 4096);
    assert.equal(r.map((m) => [m.cookie, m.error]), [[1, NBD_EINVAL], [2, 0]], structured ? "structured" : "simple");
    const data = structured ? r[1]!.data.subarray(8) : r[1]!.data;
    bytesEqual(data, new Uint8Array(16), "nothing written");
    assert.not.ok(c.t.destroyed);
  }
});

B("GO with NBD_INFO_BLOCK_SIZE: exactly the maximum is fine, a READ above it gets EINVAL", () => {
  const c = transmitting(cat(clientFlags(), go([NBD_INFO_BLOCK_SIZE])));
  const w = pattern(LIMIT, 3);
  c.s.onData(cat(request(NBD_CMD_WRITE, { cookie: 1, offset: 0, payload: w })));
  c.s.onData(cat(
    request(NBD_CMD_READ, { cookie: 2, offset: 0, length: LIMIT + 4096 }),
    request(NBD_CMD_READ, { cookie: 3, offset: 0, length: LIMIT }),
  ));
  const r = replies(c.t.take(), new Map([[3, LIMIT]]));
  assert.equal(r.map((m) => [m.cookie, m.error]), [[1, 0], [2, NBD_EINVAL], [3, 0]]);
  bytesEqual(r[2]!.data, w, "the largest allowed payload round trip");
});

B("an export that advertises a 1 MiB maximum holds agreeing clients to it, and only them", () => {
  const spec = () => ({ name: "small", device: new SizedMemory(16 * MiB, { minimum: 512, preferred: 4096, maximum: MiB }) });
  const agreed = transmitting(cat(clientFlags(), go([NBD_INFO_NAME, NBD_INFO_BLOCK_SIZE])), spec());
  assert.equal(oversizedWrite(agreed, MiB + 512).map((m) => m.error), [NBD_EINVAL, 0]);
  agreed.s.onData(request(NBD_CMD_WRITE, { cookie: 3, payload: pattern(MiB, 1) }));
  assert.equal(replies(agreed.t.take()).map((m) => m.error), [0], "exactly the maximum");
  const other = transmitting(cat(clientFlags(), go([])), spec());
  assert.equal(oversizedWrite(other, MiB + 512).map((m) => m.error), [0, 0], "a client that never asked");
});

B("clients that never agreed keep the 64 MiB limit: 48 MiB WRITE and READ after EXPORT_NAME, GO without the request, INFO-only", () => {
  const big = 48 * MiB;
  const handshakes: [string, Uint8Array][] = [
    ["EXPORT_NAME", cat(clientFlags(), option(NBD_OPT_EXPORT_NAME, new TextEncoder().encode("disk")))],
    ["GO without NBD_INFO_BLOCK_SIZE", cat(clientFlags(), go([NBD_INFO_NAME]))],
    ["INFO with it, GO without", cat(clientFlags(), info([NBD_INFO_BLOCK_SIZE]), go([]))],
    ["structured, GO without", cat(clientFlags(), option(NBD_OPT_STRUCTURED_REPLY), go([]))],
  ];
  const w = pattern(big, 9);
  for (const [what, hs] of handshakes) {
    const c = transmitting(hs);
    c.s.onData(request(NBD_CMD_WRITE, { cookie: 1, offset: MiB, payload: w }));
    c.s.onData(request(NBD_CMD_READ, { cookie: 2, offset: MiB, length: big }));
    const r = replies(c.t.take(), new Map([[2, big]]));
    assert.equal(r.map((m) => [m.cookie, m.error]), [[1, 0], [2, 0]], what);
    const back = r[1]!.type === undefined ? r[1]!.data : r[1]!.data.subarray(8);
    bytesEqual(back, w, `${what}: 48 MiB read back`);
    // and above 64 MiB they get EINVAL, payload consumed, like everybody
    assert.equal(oversizedWrite(c, 64 * MiB + 4096).map((m) => m.error), [NBD_EINVAL, 0], `${what}: over 64 MiB`);
  }
});

B("GO asking for block sizes after an INFO that did not: bound", () => {
  const c = transmitting(cat(clientFlags(), info([]), go([NBD_INFO_BLOCK_SIZE])));
  assert.equal(oversizedWrite(c, LIMIT + 512).map((m) => m.error), [NBD_EINVAL, 0]);
});

B("block sizes are sent whether asked or not, and INFO and GO report the same", () => {
  const c = session({ name: "disk", device: new MemoryDevice(MiB) });
  c.s.onData(cat(clientFlags(), info([]), go([NBD_INFO_BLOCK_SIZE])));
  const b = c.t.take();
  const sizes: number[][] = [];
  for (let p = 18; p < b.length;) {
    const len = b.readUInt32BE(p + 16);
    const d = b.subarray(p + 20, p + 20 + len);
    if (b.readUInt32BE(p + 12) === 3 && getU16(d, 0) === NBD_INFO_BLOCK_SIZE) sizes.push([getU32(d, 2), getU32(d, 6), getU32(d, 10)]);
    p += 20 + len;
  }
  assert.equal(sizes, [[1, 4096, LIMIT], [1, 4096, LIMIT]]);
});

B("an over-limit WRITE pipelined between others: its payload is skipped across chunks, the rest answered in order", () => {
  const c = transmitting(cat(clientFlags(), go([NBD_INFO_BLOCK_SIZE])));
  const small = pattern(4096, 5);
  const stream = cat(
    request(NBD_CMD_WRITE, { cookie: 1, offset: 0, payload: small }),
    request(NBD_CMD_WRITE, { cookie: 2, offset: 8192, length: LIMIT + 1 }), new Uint8Array(LIMIT + 1).fill(0x77),
    request(NBD_CMD_FLUSH, { cookie: 3 }),
    request(NBD_CMD_READ, { cookie: 4, offset: 0, length: 4096 }),
    request(NBD_CMD_READ, { cookie: 5, offset: 8192, length: 4096 }),
  );
  for (let p = 0; p < stream.length; p += 3 * MiB + 7) c.s.onData(stream.subarray(p, Math.min(stream.length, p + 3 * MiB + 7)));
  const r = replies(c.t.take(), new Map([[4, 4096], [5, 4096]]));
  assert.equal(r.map((m) => [m.cookie, m.error]), [[1, 0], [2, NBD_EINVAL], [3, 0], [4, 0], [5, 0]]);
  bytesEqual(r[3]!.data, small, "the write before");
  bytesEqual(r[4]!.data, new Uint8Array(4096), "the refused write left nothing");
});

B.run();
