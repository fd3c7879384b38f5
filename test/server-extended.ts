// Extended headers in the server, in process, with transcripts written from the spec (requests
// and replies built and parsed here with Buffer's BigInt accessors, not by the codec under test):
// the option and its interplay with STRUCTURED_REPLY, meta contexts and EXPORT_NAME; a transcript
// fed whole, split at every byte boundary and byte by byte; 64-bit effect lengths and offsets;
// PAYLOAD_LEN framing for every command; BLOCK_STATUS_EXT and its payload (context filter) form.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import {
  NBD_CMD_BLOCK_STATUS, NBD_CMD_CACHE, NBD_CMD_DISC, NBD_CMD_FLAG_DF, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLUSH, NBD_CMD_READ,
  NBD_CMD_TRIM, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_EINVAL, NBD_ENOSPC, NBD_FLAG_SEND_DF, NBD_INFO_BLOCK_SIZE,
  NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STRUCTURED_REPLY, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE, NBD_REP_ACK, NBD_REP_ERR_INVALID, NBD_REP_INFO, NBD_REP_META_CONTEXT,
} from "../src/protocol/constants.ts";
import { MemoryDevice } from "../src/devices/memory.ts";
import type { ExtentSink, MetaContextProvider } from "../src/devices/types.ts";
import { bytesEqual } from "./helpers/assert.ts";
import {
  CMD_FLAG_PAYLOAD_LEN, FLAG_BLOCK_STATUS_PAYLOAD, OPT_EXTENDED_HEADERS, REPLY_TYPE_BLOCK_STATUS_EXT, REP_ERR_EXT_HEADER_REQD,
  type ExtMsg, extChunks, extErrno, extRequest, optReplies, parseExtServer, statusPayload,
} from "./helpers/extended.ts";
import { cat, clientFlags, encodeInfoRequest, encodeMetaContextRequest, fakeSession, option, request } from "./helpers/wire.ts";

const MiB = 1024 * 1024;
const SIZE = 2 ** 34; // 16 GiB, sparse: room for lengths above 2^32
type Chunk = Extract<ExtMsg, { kind: "ext" }>;

/** A sparse memory disk with a second meta context, "x-test:ones", whose status is 1 everywhere. */
class TwoContexts extends MemoryDevice {
  metaContexts(): MetaContextProvider[] {
    return [{ name: "x-test:ones", extents: (o: number, l: number, _f: number, sink: ExtentSink) => { sink.add(o, l, 1); } }];
  }
}

const disk = (size = SIZE) => ({ name: "disk", description: "test", device: new TwoContexts(size) });
const ext = () => option(OPT_EXTENDED_HEADERS);
const go = (infos: number[] = [NBD_INFO_BLOCK_SIZE]) => option(NBD_OPT_GO, encodeInfoRequest("", infos));
const setMeta = (q = ["base:allocation", "x-test:ones"]) => option(NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest("", q));
const pattern = (n: number, seed = 1) => {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = (i * 11 + seed) & 255;
  return b;
};
const u64 = (b: Uint8Array, p: number) => Number(Buffer.from(b.buffer, b.byteOffset, b.length).readBigUInt64BE(p));
const u32 = (b: Uint8Array, p: number) => Buffer.from(b.buffer, b.byteOffset, b.length).readUInt32BE(p);

/** A session fed `input` (split at `splits`); returns what the server sent, parsed, and the transport. */
function run(input: Uint8Array, splits: number[] = [], size = SIZE) {
  const { t, s } = fakeSession([disk(size)]);
  let prev = 0;
  for (const at of [...splits, input.length]) {
    if (at > prev) s.onData(input.slice(prev, at));
    prev = at;
  }
  return { t, s, bytes: t.bytes(), get msgs() { return parseExtServer(t.bytes()); } };
}

/** A session past an extended-headers handshake (contexts selected unless `meta` is false). */
function transmitting(o: { meta?: boolean; infos?: number[]; size?: number } = {}) {
  const { t, s } = fakeSession([disk(o.size ?? SIZE)]);
  s.onData(cat(clientFlags(), ext(), ...(o.meta === false ? [] : [setMeta()]), go(o.infos)));
  const ids = optReplies(parseExtServer(t.bytes())).filter((m) => m.type === NBD_REP_META_CONTEXT)
    .map((m) => [m.data.toString("utf8", 4), m.data.readUInt32BE(0)] as const);
  t.out = [];
  return {
    t, s, ids: new Map(ids),
    send(...reqs: Uint8Array[]): Chunk[] { t.out = []; s.onData(cat(...reqs)); return extChunks(parseExtServer(t.bytes())); },
  };
}

// --------------------------------------------------------------------------------------------
const H = suite("extended headers: negotiation");

H("EXTENDED_HEADERS: ACK; with data ERR_INVALID; STRUCTURED_REPLY afterwards ERR_EXT_HEADER_REQD; the other way round both ACK", () => {
  const a = optReplies(run(cat(clientFlags(), option(OPT_EXTENDED_HEADERS, new Uint8Array(1)), ext(), option(NBD_OPT_STRUCTURED_REPLY), ext())).msgs);
  assert.equal(a.map((m) => [m.option, m.type]), [
    [OPT_EXTENDED_HEADERS, NBD_REP_ERR_INVALID], [OPT_EXTENDED_HEADERS, NBD_REP_ACK],
    [NBD_OPT_STRUCTURED_REPLY, REP_ERR_EXT_HEADER_REQD], [OPT_EXTENDED_HEADERS, NBD_REP_ACK],
  ]);
  const b = optReplies(run(cat(clientFlags(), option(NBD_OPT_STRUCTURED_REPLY), ext())).msgs);
  assert.equal(b.map((m) => m.type), [NBD_REP_ACK, NBD_REP_ACK]);
});

H("meta contexts need no STRUCTURED_REPLY once extended headers are agreed", () => {
  const r = optReplies(run(cat(clientFlags(), ext(), option(NBD_OPT_LIST_META_CONTEXT, encodeMetaContextRequest("", [])), setMeta())).msgs);
  const names = r.filter((m) => m.type === NBD_REP_META_CONTEXT).map((m) => m.data.toString("utf8", 4));
  assert.equal(names, ["base:allocation", "x-test:ones", "base:allocation", "x-test:ones"]);
  assert.equal(r.filter((m) => m.type === NBD_REP_ACK).length, 3);
});

H("transmission flags: SEND_DF; BLOCK_STATUS_PAYLOAD only with contexts selected for the export; INFO equals GO", () => {
  const flagsOf = (input: Uint8Array) => optReplies(run(input).msgs)
    .filter((m) => m.type === NBD_REP_INFO && m.data.readUInt16BE(0) === 0).map((m) => m.data.readUInt16BE(10));
  const info = option(NBD_OPT_INFO, encodeInfoRequest("", [NBD_INFO_BLOCK_SIZE]));
  const [i1, g1] = flagsOf(cat(clientFlags(), ext(), setMeta(), info, go()));
  assert.is(i1, g1, "INFO and GO agree");
  assert.ok(g1! & NBD_FLAG_SEND_DF && g1! & FLAG_BLOCK_STATUS_PAYLOAD);
  const [g2] = flagsOf(cat(clientFlags(), ext(), go()));
  assert.ok(g2! & NBD_FLAG_SEND_DF);
  assert.not.ok(g2! & FLAG_BLOCK_STATUS_PAYLOAD, "no contexts: no payload form");
  const [g3] = flagsOf(cat(clientFlags(), option(NBD_OPT_STRUCTURED_REPLY), setMeta(), go()));
  assert.not.ok(g3! & FLAG_BLOCK_STATUS_PAYLOAD, "compact headers: never");
  const [g4] = flagsOf(cat(clientFlags(), ext(), option(NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest("other", ["base:allocation"])), go()));
  assert.not.ok(g4! & FLAG_BLOCK_STATUS_PAYLOAD, "contexts chosen for another export");
});

H("EXPORT_NAME after extended headers: the session closes without an answer", () => {
  const { t, msgs } = run(cat(clientFlags(), ext(), option(NBD_OPT_EXPORT_NAME, new TextEncoder().encode("disk"))));
  assert.ok(t.ended);
  assert.equal(msgs.map((m) => m.kind), ["greeting", "optreply"]);
});

H.run();

// --------------------------------------------------------------------------------------------
const T = suite("extended headers: transcript");

const CTX_BASE = 1; // ids the server gives in SET_META_CONTEXT order (checked below)
const CTX_ONES = 2;
const transcriptRequests = (): [number, Buffer][] => [
  [0, extRequest(NBD_CMD_WRITE, { cookie: 1, offset: 4096, payload: pattern(5000) })],
  [4096, extRequest(NBD_CMD_READ, { cookie: 2, offset: 4096, length: 5000 })],
  [0, extRequest(NBD_CMD_READ, { cookie: 3, offset: 0, length: 131072 })],
  [0, extRequest(NBD_CMD_BLOCK_STATUS, { cookie: 4, offset: 0, length: 2 ** 33 })],
  [4096, extRequest(NBD_CMD_BLOCK_STATUS, { cookie: 5, offset: 4096, payload: statusPayload(MiB, [CTX_ONES]) })],
  [5000, extRequest(NBD_CMD_WRITE_ZEROES, { cookie: 6, offset: 5000, length: 100 })],
  [0, extRequest(NBD_CMD_FLUSH, { cookie: 7 })],
  [SIZE - 1, extRequest(NBD_CMD_READ, { cookie: 8, offset: SIZE - 1, length: 2 })],
  [0, extRequest(NBD_CMD_TRIM, { cookie: 9, offset: 0, length: 4096 })],
  [0, extRequest(NBD_CMD_READ, { cookie: 10, flags: NBD_CMD_FLAG_DF, offset: 0, length: 16384 })],
  [0, extRequest(NBD_CMD_DISC, { cookie: 11 })],
];
const transcript = cat(clientFlags(), ext(), setMeta(), go(), ...transcriptRequests().map(([, r]) => r));
// where each request's offset is: every reply chunk must echo it
const requestOffsets = new Map(transcriptRequests().map(([, r]) => [r.readBigUInt64BE(8), r.readBigUInt64BE(16)]));

T("same output fed whole, split at every byte boundary, and byte by byte", () => {
  const whole = run(transcript).bytes;
  assert.ok(whole.length > 1000);
  for (let i = 1; i < transcript.length; i += i < 600 ? 1 : 499) bytesEqual(run(transcript, [i]).bytes, whole, `split at ${i}`);
  bytesEqual(run(transcript, [31, 32, 33, 64, 65]).bytes, whole, "splits around a header");
  bytesEqual(run(transcript, Array.from({ length: transcript.length }, (_, i) => i + 1)).bytes, whole, "byte by byte");
});

T("every reply is a 32-byte extended chunk echoing its request's offset; the contents are right", async () => {
  const { msgs, t } = run(transcript);
  const ids = optReplies(msgs).filter((m) => m.type === NBD_REP_META_CONTEXT).map((m) => [m.data.toString("utf8", 4), m.data.readUInt32BE(0)]);
  assert.equal(ids, [["base:allocation", CTX_BASE], ["x-test:ones", CTX_ONES]]);
  const chunks = extChunks(msgs);
  for (const c of chunks) assert.is(c.offset, requestOffsets.get(c.cookie), `cookie ${c.cookie}: offset echoed`);
  const of = (cookie: number) => chunks.filter((c) => c.cookie === BigInt(cookie));
  const only = (cookie: number) => { const r = of(cookie); assert.is(r.length, 1, `cookie ${cookie}: one chunk`); return r[0]!; };
  // WRITE: NONE with DONE
  assert.equal([only(1).type, only(1).flags, only(1).length], [NBD_REPLY_TYPE_NONE, NBD_REPLY_FLAG_DONE, 0n]);
  // READ: one data chunk, its own offset inside, then the data
  const r2 = only(2);
  assert.equal([r2.type, r2.length, u64(r2.data, 0)], [NBD_REPLY_TYPE_OFFSET_DATA, 5008n, 4096]);
  bytesEqual(r2.data.subarray(8), pattern(5000), "read back");
  // a sparse READ: data and hole chunks covering the range, DONE on the last only
  const r3 = of(3);
  let covered = 0;
  const got = new Uint8Array(131072);
  for (const c of r3) {
    if (c.type === NBD_REPLY_TYPE_OFFSET_DATA) { got.set(c.data.subarray(8), u64(c.data, 0)); covered += c.data.length - 8; }
    else { assert.is(c.type, NBD_REPLY_TYPE_OFFSET_HOLE); assert.is(c.length, 12n); covered += u32(c.data, 8); }
  }
  assert.is(covered, 131072);
  assert.ok(r3.some((c) => c.type === NBD_REPLY_TYPE_OFFSET_HOLE));
  assert.equal(r3.map((c) => c.flags & NBD_REPLY_FLAG_DONE), [...r3.slice(1).map(() => 0), NBD_REPLY_FLAG_DONE]);
  const want = new Uint8Array(131072);
  want.set(pattern(5000), 4096);
  bytesEqual(got, want, "sparse read");
  // BLOCK_STATUS over 8 GiB: one BLOCK_STATUS_EXT per context; the last extent is longer than 2^32
  const st = of(4);
  assert.equal(st.map((c) => c.type), [REPLY_TYPE_BLOCK_STATUS_EXT, REPLY_TYPE_BLOCK_STATUS_EXT]);
  assert.equal(st.map((c) => c.flags), [0, NBD_REPLY_FLAG_DONE]);
  const ext = (c: Chunk) => {
    const n = u32(c.data, 4);
    assert.is(c.length, BigInt(8 + 16 * n), "length = 8 + 16 * count");
    return { id: u32(c.data, 0), extents: Array.from({ length: n }, (_, i) => [u64(c.data, 8 + 16 * i), u64(c.data, 16 + 16 * i)]) };
  };
  const byId = new Map(st.map((c) => { const e = ext(c); return [e.id, e.extents]; }));
  assert.equal(byId.get(CTX_BASE), [[4096, 3], [8192, 0], [2 ** 33 - 12288, 3]]);
  assert.equal(byId.get(CTX_ONES), [[2 ** 33, 1]]);
  // the payload form: only the context asked for
  const f = only(5);
  assert.equal([f.type, f.flags], [REPLY_TYPE_BLOCK_STATUS_EXT, NBD_REPLY_FLAG_DONE]);
  assert.equal(ext(f), { id: CTX_ONES, extents: [[MiB, 1]] });
  // zeroes, flush: NONE
  assert.equal([only(6).type, only(7).type], [NBD_REPLY_TYPE_NONE, NBD_REPLY_TYPE_NONE]);
  // a read past the end: an error chunk (the spec's offset echo: 2^34 - 1)
  assert.is(extErrno(only(8)), NBD_EINVAL);
  assert.is(only(8).offset, BigInt(SIZE - 1));
  assert.is(only(9).type, NBD_REPLY_TYPE_NONE);
  // DF: one data chunk, holes included as zeros
  const df = only(10);
  assert.equal([df.type, df.length], [NBD_REPLY_TYPE_OFFSET_DATA, 16392n]);
  assert.is(of(11).length, 0, "DISC has no reply");
  await new Promise((r) => setTimeout(r, 0)); // the sparse READ counted as in flight until its promise settled
  assert.ok(t.ended, "closed after DISC");
});

T.run();

// --------------------------------------------------------------------------------------------
const R = suite("extended headers: requests");

R("64-bit effect lengths: WRITE_ZEROES and TRIM over more than 4 GiB in one request", () => {
  const c = transmitting({ size: 2 ** 33 });
  const edge = pattern(8192, 7);
  c.send(extRequest(NBD_CMD_WRITE, { offset: 2 ** 32 - 8192, payload: edge }), extRequest(NBD_CMD_WRITE, { offset: 2 ** 32 + 2 ** 31, payload: edge }));
  const z = c.send(extRequest(NBD_CMD_WRITE_ZEROES, { cookie: 5, offset: 2 ** 32 - 4096, length: 2 ** 31 + 8192 }));
  assert.equal(z.map((m) => [m.cookie, extErrno(m)]), [[5n, 0]]);
  const r = c.send(extRequest(NBD_CMD_READ, { offset: 2 ** 32 - 8192, length: 8192 }), extRequest(NBD_CMD_READ, { offset: 2 ** 32 + 2 ** 31, length: 8192 }));
  const want = edge.slice();
  want.fill(0, 4096);
  bytesEqual(r[0]!.data.subarray(8), want, "zeroed from the middle of the first block");
  want.set(edge);
  want.fill(0, 0, 4096);
  bytesEqual(r[1]!.data.subarray(8), want, "up to the middle of the last block");
  const t = c.send(extRequest(NBD_CMD_TRIM, { offset: 0, length: 2 ** 33 }), extRequest(NBD_CMD_CACHE, { offset: 0, length: 2 ** 33 }));
  assert.equal(t.map(extErrno), [0, 0]);
  const past = c.send(extRequest(NBD_CMD_WRITE_ZEROES, { offset: 1, length: 2 ** 33 }), extRequest(NBD_CMD_TRIM, { offset: 0, length: 2 ** 33 + 1 }));
  assert.equal(past.map(extErrno), [NBD_ENOSPC, NBD_EINVAL]);
});

R("offsets and effect lengths of 2^53 and more: refused, and the offset is echoed exactly", () => {
  const c = transmitting();
  const r = c.send(
    extRequest(NBD_CMD_READ, { cookie: 1, offset: 0xfffffffffffff000n, length: 512 }),
    extRequest(NBD_CMD_TRIM, { cookie: 2, offset: 0, length: 2n ** 53n }),
    extRequest(NBD_CMD_BLOCK_STATUS, { cookie: 3, offset: 0, length: 0xffffffffffffffffn }),
    extRequest(NBD_CMD_WRITE, { cookie: 4, offset: 2n ** 53n + 1n, payload: new Uint8Array(512) }),
    extRequest(NBD_CMD_FLUSH, { cookie: 5 }),
  );
  assert.equal(r.map((m) => [m.cookie, extErrno(m)]), [[1n, NBD_EINVAL], [2n, NBD_EINVAL], [3n, NBD_EINVAL], [4n, NBD_ENOSPC], [5n, 0]]);
  assert.equal(r.map((m) => m.offset), [0xfffffffffffff000n, 0n, 0n, 2n ** 53n + 1n, 0n]);
});

R("PAYLOAD_LEN frames the stream: a WRITE without it is refused and nothing is consumed; other commands with it are refused and their payload is", () => {
  const c = transmitting();
  const r = c.send(
    extRequest(NBD_CMD_WRITE, { cookie: 1, offset: 0, length: 512 }), // no flag: no payload follows
    extRequest(NBD_CMD_READ, { cookie: 2, offset: 0, payload: pattern(100) }),
    extRequest(NBD_CMD_FLUSH, { cookie: 3, payload: pattern(33) }),
    extRequest(NBD_CMD_TRIM, { cookie: 4, offset: 0, payload: pattern(4096) }),
    extRequest(NBD_CMD_WRITE, { cookie: 5, offset: 0, payload: new Uint8Array(0) }), // zero-length, flagged
    extRequest(NBD_CMD_READ, { cookie: 6, offset: 0, length: 512 }),
  );
  assert.equal(r.map((m) => [m.cookie, extErrno(m)]), [[1n, NBD_EINVAL], [2n, NBD_EINVAL], [3n, NBD_EINVAL], [4n, NBD_EINVAL], [5n, 0], [6n, 0]]);
  bytesEqual(r[5]!.data.subarray(8), new Uint8Array(512), "nothing was written");
  assert.not.ok(c.t.destroyed);
});

R("payload limits: above the advertised maximum EINVAL (consumed); above 64 MiB the connection drops", () => {
  const agreed = transmitting();
  const big = 32 * MiB + 4096;
  assert.equal(agreed.send(extRequest(NBD_CMD_WRITE, { cookie: 1, payload: new Uint8Array(big) }), extRequest(NBD_CMD_FLUSH, { cookie: 2 })).map(extErrno), [NBD_EINVAL, 0]);
  const legacy = transmitting({ infos: [] });
  assert.equal(legacy.send(extRequest(NBD_CMD_WRITE, { cookie: 1, payload: pattern(big) }), extRequest(NBD_CMD_READ, { cookie: 2, offset: big - 8, length: 8 })).map(extErrno), [0, 0],
    "a GO without NBD_INFO_BLOCK_SIZE: the legacy limit");
  for (const length of [64n * 1024n * 1024n + 1n, 2n ** 63n]) {
    const c = transmitting();
    const r = c.send(extRequest(NBD_CMD_WRITE, { cookie: 1, length, payload: new Uint8Array(0), noPayloadFlag: true, flags: CMD_FLAG_PAYLOAD_LEN }));
    assert.is(r.length, 0);
    assert.ok(c.t.destroyed, `payload of ${length}: disconnected`);
  }
});

R("BLOCK_STATUS payload: duplicate, unknown or malformed ids are refused with the payload consumed; no contexts, no payload form", () => {
  const c = transmitting();
  assert.equal([...c.ids], [["base:allocation", CTX_BASE], ["x-test:ones", CTX_ONES]]);
  const bs = (cookie: number, payload: Uint8Array, flags = 0) => extRequest(NBD_CMD_BLOCK_STATUS, { cookie, offset: 0, payload, flags });
  const r = c.send(
    bs(1, statusPayload(MiB, [CTX_ONES, CTX_ONES])),
    bs(2, statusPayload(MiB, [99])),
    bs(3, cat(statusPayload(MiB, []), new Uint8Array(2))),
    bs(4, statusPayload(0, [CTX_BASE])),
    bs(5, statusPayload(SIZE + 1, [CTX_BASE])),
    bs(6, statusPayload(2n ** 60n, [CTX_BASE])),
    bs(7, statusPayload(MiB, [CTX_ONES, CTX_BASE]), NBD_CMD_FLAG_REQ_ONE),
    extRequest(NBD_CMD_FLUSH, { cookie: 8 }),
  );
  assert.equal(r.filter((m) => m.cookie < 7n).map((m) => [m.cookie, extErrno(m)]), [1n, 2n, 3n, 4n, 5n, 6n].map((k) => [k, NBD_EINVAL]));
  const both = r.filter((m) => m.cookie === 7n);
  assert.equal(both.map((m) => [u32(m.data, 0), u32(m.data, 4), u64(m.data, 8), u64(m.data, 16)]), [[CTX_ONES, 1, MiB, 1], [CTX_BASE, 1, MiB, 3]]);
  assert.is(extErrno(r.at(-1)), 0);
  const none = transmitting({ meta: false });
  assert.equal(none.send(bs(1, statusPayload(MiB, [1])), extRequest(NBD_CMD_FLUSH, { cookie: 2 })).map(extErrno), [NBD_EINVAL, 0]);
});

R("a compact request in an extended session, or an extended one in a compact session, drops the connection", () => {
  const c = transmitting();
  c.send(request(NBD_CMD_READ, { length: 512 }), new Uint8Array(4));
  assert.ok(c.t.destroyed);
  const { t, s } = fakeSession([disk()]);
  s.onData(cat(clientFlags(), option(NBD_OPT_STRUCTURED_REPLY), go()));
  s.onData(extRequest(NBD_CMD_READ, { length: 512 }));
  assert.ok(t.destroyed);
});

R("1000 pipelined requests in one chunk: every cookie answered once, reads see the writes before them", () => {
  const c = transmitting();
  const reqs: Uint8Array[] = [];
  for (let i = 0; i < 1000; i++) {
    reqs.push(i % 2 ? extRequest(NBD_CMD_READ, { cookie: 1000 + i, offset: (i - 1) * 512, length: 512 })
      : extRequest(NBD_CMD_WRITE, { cookie: 1000 + i, offset: i * 512, payload: pattern(512, i) }));
  }
  const r = c.send(...reqs);
  assert.is(r.length, 1000);
  assert.equal(new Set(r.map((m) => m.cookie)).size, 1000);
  for (const m of r.filter((x) => x.cookie % 2n === 1n)) bytesEqual(m.data.subarray(8), pattern(512, Number(m.cookie) - 1001), `cookie ${m.cookie}`);
});

R.run();
