// The session state machine driven in-process through a fake transport: every transcript fed
// whole, split at every byte boundary and byte by byte gives the same output; 1000 requests in
// one chunk; one test per malformed input with the errno or disconnect it must produce.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import {
  NBD_CMD_BLOCK_STATUS, NBD_CMD_CACHE, NBD_CMD_DISC, NBD_CMD_FLAG_DF, NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM, NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES, NBD_EINVAL, NBD_ENOSPC, NBD_EPERM, NBD_ESHUTDOWN, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_HAS_FLAGS, NBD_FLAG_NO_ZEROES, NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES, NBD_INFO_BLOCK_SIZE, NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_LIST, NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS, NBD_OPT_STRUCTURED_REPLY, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_NONE, NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE, NBD_REP_ACK, NBD_REP_ERR_INVALID,
  NBD_REP_ERR_POLICY, NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_UNSUP, NBD_REP_INFO, NBD_REP_META_CONTEXT, NBD_REP_SERVER,
  NBD_STATE_HOLE, NBD_STATE_ZERO,
} from "../src/protocol/constants.ts";
import { getU16, getU32, getU64 } from "../src/protocol/codec.ts";
import { MemoryDevice } from "../src/devices/memory.ts";
import type { ExportSpec } from "../src/devices/types.ts";
import { bytesEqual } from "./helpers/assert.ts";
import {
  cat, clientFlags, encodeInfoRequest, encodeMetaContextRequest, fakeSession, type Msg, option, parseServer, request,
} from "./helpers/wire.ts";

const MiB = 1024 * 1024;
const mem = (size = 16 * MiB, name = "disk"): ExportSpec => ({ name, description: "test disk", device: new MemoryDevice(size) });

const go = (name = "", infos: number[] = [NBD_INFO_BLOCK_SIZE]) => option(NBD_OPT_GO, encodeInfoRequest(name, infos));
const handshakeStructured = () => cat(
  clientFlags(), option(NBD_OPT_STRUCTURED_REPLY),
  option(NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest("", ["base:allocation"])), go(),
);
const pattern = (n: number, seed = 1) => Uint8Array.from({ length: n }, (_, i) => (i * 7 + seed) & 255);

function feed(s: { onData(b: Uint8Array): void }, b: Uint8Array, splits: number[] = []): void {
  let prev = 0;
  for (const at of [...splits, b.length]) {
    if (at > prev) s.onData(b.slice(prev, at));
    prev = at;
  }
}

function transcriptOutput(input: Uint8Array, splits: number[]): Uint8Array {
  const { t, s } = fakeSession([mem()]);
  feed(s, input, splits);
  return t.bytes();
}

const replies = (msgs: Msg[]) => msgs.filter((m) => m.kind === "simple" || m.kind === "chunk");

// --------------------------------------------------------------------------------------------
const T = suite("session transcripts");

const simpleTranscript = cat(
  clientFlags(), go(),
  request(NBD_CMD_WRITE, { cookie: 1, offset: 4096, payload: pattern(5000) }),
  request(NBD_CMD_READ, { cookie: 2, offset: 4096, length: 5000 }),
  request(NBD_CMD_FLUSH, { cookie: 3 }),
  request(NBD_CMD_WRITE_ZEROES, { cookie: 4, offset: 5000, length: 100 }),
  request(NBD_CMD_READ, { cookie: 5, offset: 4996, length: 8 }),
  request(NBD_CMD_TRIM, { cookie: 6, offset: 0, length: 4096 }),
  request(NBD_CMD_DISC, { cookie: 7 }),
);
const structuredTranscript = cat(
  handshakeStructured(),
  request(NBD_CMD_WRITE, { cookie: 1, offset: 0, payload: pattern(70000) }),
  request(NBD_CMD_READ, { cookie: 2, offset: 0, length: 131072 }),
  request(NBD_CMD_BLOCK_STATUS, { cookie: 3, offset: 0, length: 1 * MiB }),
  request(NBD_CMD_READ, { cookie: 4, offset: 16 * MiB, length: 1 }),
  request(NBD_CMD_DISC, { cookie: 5 }),
);

for (const [name, input] of [["simple", simpleTranscript], ["structured", structuredTranscript]] as const) {
  T(`${name} transcript: same output split at every byte boundary`, () => {
    const whole = transcriptOutput(input, []);
    assert.ok(whole.length > 100);
    for (let i = 1; i < input.length; i += i < 400 ? 1 : 997) {
      bytesEqual(transcriptOutput(input, [i]), whole, `split at ${i}`);
    }
    // and two splits, and byte by byte (through the handshake and the first requests)
    bytesEqual(transcriptOutput(input, [17, 33]), whole, "split at 17 and 33");
    const bytewise = Array.from({ length: Math.min(input.length, 600) }, (_, i) => i + 1);
    bytesEqual(transcriptOutput(input, bytewise), whole, "byte by byte");
  });
}

T("simple transcript: replies are right", () => {
  const out = transcriptOutput(simpleTranscript, []);
  const msgs = parseServer(out, { readLengths: new Map([[2, 5000], [5, 8]]) });
  assert.equal(msgs[0], { kind: "greeting", flags: NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES });
  const info = msgs.filter((m) => m.kind === "optreply" && m.type === NBD_REP_INFO) as Extract<Msg, { kind: "optreply" }>[];
  const exportInfo = info.find((m) => getU16(m.data, 0) === 0)!;
  assert.is(getU64(exportInfo.data, 2), 16 * MiB);
  const flags = getU16(exportInfo.data, 10);
  assert.ok(flags & NBD_FLAG_HAS_FLAGS && flags & NBD_FLAG_SEND_FLUSH && flags & NBD_FLAG_SEND_TRIM && flags & NBD_FLAG_SEND_WRITE_ZEROES && flags & NBD_FLAG_CAN_MULTI_CONN);
  assert.not.ok(flags & NBD_FLAG_SEND_DF, "no DF without structured replies");
  const bs = info.find((m) => getU16(m.data, 0) === 3)!;
  assert.equal([getU32(bs.data, 2), getU32(bs.data, 6), getU32(bs.data, 10)], [1, 4096, 32 * MiB]);
  const r = replies(msgs) as Extract<Msg, { kind: "simple" }>[];
  assert.equal(r.map((m) => [m.cookie, m.error]), [[1, 0], [2, 0], [3, 0], [4, 0], [5, 0], [6, 0]]);
  bytesEqual(r[1]!.data!, pattern(5000), "read back");
  const expect5 = pattern(5000).slice(900, 908); // offset 4996 is byte 900 of the write at 4096
  expect5.fill(0, 4, 8); // bytes 5000.. were zeroed
  bytesEqual(r[4]!.data!, expect5, "zeroed bytes");
});

T("structured transcript: data, holes, block status, errors", () => {
  const msgs = parseServer(transcriptOutput(structuredTranscript, []));
  const meta = msgs.find((m) => m.kind === "optreply" && m.type === NBD_REP_META_CONTEXT) as Extract<Msg, { kind: "optreply" }>;
  assert.is(new TextDecoder().decode(meta.data.subarray(4)), "base:allocation");
  const id = getU32(meta.data, 0);
  const chunks = replies(msgs) as Extract<Msg, { kind: "chunk" }>[];
  // write: NONE+DONE
  assert.equal([chunks[0]!.cookie, chunks[0]!.type, chunks[0]!.flags], [1, NBD_REPLY_TYPE_NONE, NBD_REPLY_FLAG_DONE]);
  // the 128 KiB read of a range with 70000 written bytes: data then a hole, covering the range
  const read = chunks.filter((c) => c.cookie === 2);
  assert.ok(read.some((c) => c.type === NBD_REPLY_TYPE_OFFSET_HOLE), "a hole chunk");
  const got = new Uint8Array(131072);
  let covered = 0;
  for (const c of read) {
    const off = getU64(c.data, 0);
    if (c.type === NBD_REPLY_TYPE_OFFSET_DATA) { got.set(c.data.subarray(8), off); covered += c.data.length - 8; }
    else { assert.is(c.type, NBD_REPLY_TYPE_OFFSET_HOLE); covered += getU32(c.data, 8); }
  }
  assert.is(covered, 131072);
  assert.is(read.filter((c) => c.flags & NBD_REPLY_FLAG_DONE).length, 1);
  assert.ok(read[read.length - 1]!.flags & NBD_REPLY_FLAG_DONE, "DONE on the last chunk");
  const expected = new Uint8Array(131072);
  expected.set(pattern(70000));
  bytesEqual(got, expected, "structured read");
  // block status: 72 KiB of data (4 KiB pages), then hole+zero
  const bs = chunks.find((c) => c.cookie === 3)!;
  assert.is(bs.type, NBD_REPLY_TYPE_BLOCK_STATUS);
  assert.is(getU32(bs.data, 0), id);
  assert.equal([getU32(bs.data, 4), getU32(bs.data, 8)], [73728, 0]);
  assert.equal([getU32(bs.data, 12), getU32(bs.data, 16)], [MiB - 73728, NBD_STATE_HOLE | NBD_STATE_ZERO]);
  // read past the end: an error chunk, never a simple reply
  const err = chunks.find((c) => c.cookie === 4)!;
  assert.is(err.type, NBD_REPLY_TYPE_ERROR);
  assert.is(getU32(err.data, 0), NBD_EINVAL);
  assert.ok(msgs.every((m) => m.kind !== "simple"));
});

T("1000 requests in one chunk: every cookie answered exactly once", () => {
  const { t, s } = fakeSession([mem()]);
  const reqs: Uint8Array[] = [];
  for (let i = 0; i < 1000; i++) {
    reqs.push(i % 2 ? request(NBD_CMD_READ, { cookie: 1000 + i, offset: i * 512, length: 512 })
      : request(NBD_CMD_WRITE, { cookie: 1000 + i, offset: i * 512, payload: pattern(512, i) }));
  }
  s.onData(cat(clientFlags(), go()));
  t.out = [];
  s.onData(cat(...reqs));
  const lengths = new Map<number, number>();
  for (let i = 1; i < 1000; i += 2) lengths.set(1000 + i, 512);
  const r = replies(parseServer(t.bytes(), { readLengths: lengths })) as Extract<Msg, { kind: "simple" }>[];
  assert.is(r.length, 1000);
  assert.equal(new Set(r.map((m) => m.cookie)).size, 1000);
  assert.ok(r.every((m) => m.error === 0));
});

T.run();

// --------------------------------------------------------------------------------------------
const H = suite("session handshake");

function handshake(input: Uint8Array, specs: ExportSpec[] = [mem()]) {
  const { t, s, server } = fakeSession(specs);
  s.onData(input);
  return { t, get msgs() { return parseServer(t.bytes()); }, server };
}
const optReplies = (msgs: Msg[]) => msgs.filter((m) => m.kind === "optreply") as Extract<Msg, { kind: "optreply" }>[];

H("unknown option: ERR_UNSUP, and the session continues", () => {
  const { msgs } = handshake(cat(clientFlags(), option(99, new Uint8Array(10)), option(NBD_OPT_LIST)));
  const r = optReplies(msgs);
  assert.equal([r[0]!.option, r[0]!.type], [99, NBD_REP_ERR_UNSUP]);
  assert.equal(r.slice(1).map((m) => m.type), [NBD_REP_SERVER, NBD_REP_ACK]);
});

H("malformed option lengths: ERR_INVALID without losing framing", () => {
  const badInfo = encodeInfoRequest("disk", [1, 2]).slice(0, 9); // count says 2 entries, none there
  const badMeta = encodeMetaContextRequest("", ["base:allocation"]);
  badMeta[11] = 200; // query length overruns
  const { msgs, t } = handshake(cat(
    clientFlags(), option(NBD_OPT_INFO, badInfo), option(NBD_OPT_GO, new Uint8Array(3)),
    option(NBD_OPT_STRUCTURED_REPLY), option(NBD_OPT_SET_META_CONTEXT, badMeta),
    option(NBD_OPT_LIST, new Uint8Array(4)), option(NBD_OPT_STRUCTURED_REPLY, new Uint8Array(1)), option(NBD_OPT_INFO, encodeInfoRequest("", [])),
  ));
  const r = optReplies(msgs);
  assert.equal(r.map((m) => m.type), [
    NBD_REP_ERR_INVALID, NBD_REP_ERR_INVALID, NBD_REP_ACK, NBD_REP_ERR_INVALID, NBD_REP_ERR_INVALID, NBD_REP_ERR_INVALID,
    NBD_REP_INFO, NBD_REP_INFO, NBD_REP_INFO, NBD_REP_INFO, NBD_REP_ACK,
  ]);
  assert.not.ok(t.destroyed);
});

H("STARTTLS: ERR_POLICY; ABORT: ACK then close", () => {
  const { msgs, t } = handshake(cat(clientFlags(), option(NBD_OPT_STARTTLS), option(NBD_OPT_ABORT)));
  assert.equal(optReplies(msgs).map((m) => m.type), [NBD_REP_ERR_POLICY, NBD_REP_ACK]);
  assert.ok(t.ended);
});

H("LIST: one REP_SERVER per export with name and description", () => {
  const { msgs } = handshake(cat(clientFlags(), option(NBD_OPT_LIST)), [mem(MiB, "a"), mem(MiB, "b")]);
  const r = optReplies(msgs).filter((m) => m.type === NBD_REP_SERVER);
  const names = r.map((m) => new TextDecoder().decode(m.data.subarray(4, 4 + getU32(m.data, 0))));
  assert.equal(names, ["a", "b"]);
  assert.is(new TextDecoder().decode(r[0]!.data.subarray(5)), "test disk");
});

H("INFO/GO of an unknown export: ERR_UNKNOWN and the session continues", () => {
  const { msgs, t } = handshake(cat(clientFlags(), go("nope"), go("disk")));
  const r = optReplies(msgs);
  assert.is(r[0]!.type, NBD_REP_ERR_UNKNOWN);
  assert.is(r[r.length - 1]!.type, NBD_REP_ACK);
  assert.not.ok(t.ended);
});

H("EXPORT_NAME: size, flags, 124 zero bytes unless NO_ZEROES; unknown name closes", () => {
  const withZeroes = handshake(cat(clientFlags(NBD_FLAG_C_FIXED_NEWSTYLE), option(NBD_OPT_EXPORT_NAME, new TextEncoder().encode("disk"))));
  const b = withZeroes.t.bytes();
  assert.is(b.length, 18 + 10 + 124);
  assert.is(getU64(b, 18), 16 * MiB);
  const noZeroes = handshake(cat(clientFlags(), option(NBD_OPT_EXPORT_NAME)));
  assert.is(noZeroes.t.bytes().length, 18 + 10);
  const unknown = handshake(cat(clientFlags(), option(NBD_OPT_EXPORT_NAME, new TextEncoder().encode("nope"))));
  assert.ok(unknown.t.ended);
  assert.is(unknown.t.bytes().length, 18);
});

H("bad client flags and bad option magic disconnect", () => {
  assert.ok(handshake(clientFlags(0x80)).t.destroyed);
  const bad = option(NBD_OPT_LIST);
  bad[0] = 0;
  assert.ok(handshake(cat(clientFlags(), bad)).t.destroyed);
});

H("an option announcing a huge length disconnects instead of buffering", () => {
  const { t } = handshake(cat(clientFlags(), option(NBD_OPT_LIST, new Uint8Array(0), 0xffffffff)));
  assert.ok(t.destroyed);
});

H("meta contexts: LIST wildcards, SET selection, need structured replies", () => {
  const noSr = handshake(cat(clientFlags(), option(NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest("", ["base:allocation"]))));
  assert.is(optReplies(noSr.msgs)[0]!.type, NBD_REP_ERR_INVALID);
  const { msgs } = handshake(cat(
    clientFlags(), option(NBD_OPT_STRUCTURED_REPLY),
    option(NBD_OPT_LIST_META_CONTEXT, encodeMetaContextRequest("", ["base:"])),
    option(NBD_OPT_LIST_META_CONTEXT, encodeMetaContextRequest("", [])),
    option(NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest("", ["base:", "x-unknown:thing", "base:allocation"])),
  ));
  const r = optReplies(msgs).slice(1);
  const names = r.filter((m) => m.type === NBD_REP_META_CONTEXT).map((m) => new TextDecoder().decode(m.data.subarray(4)));
  assert.equal(names, ["base:allocation", "base:allocation", "base:allocation"]);
  assert.ok(getU32(r.filter((m) => m.type === NBD_REP_META_CONTEXT)[2]!.data, 0) !== 0, "SET gives a non-zero id");
});

H("GO flags: DF only with structured replies; read-only export", () => {
  const { msgs } = handshake(cat(clientFlags(), option(NBD_OPT_STRUCTURED_REPLY), go()), [mem()]);
  const info = optReplies(msgs).find((m) => m.type === NBD_REP_INFO && getU16(m.data, 0) === 0)!;
  assert.ok(getU16(info.data, 10) & NBD_FLAG_SEND_DF);
  const ro = fakeSession([mem()], { readOnly: true });
  ro.s.onData(cat(clientFlags(), go()));
  const roInfo = optReplies(parseServer(ro.t.bytes())).find((m) => m.type === NBD_REP_INFO && getU16(m.data, 0) === 0)!;
  assert.ok(getU16(roInfo.data, 10) & NBD_FLAG_READ_ONLY);
});

H.run();

// --------------------------------------------------------------------------------------------
const R = suite("session requests");

function transmission(structured: boolean, specs: ExportSpec[] = [mem()], opts: { readOnly?: boolean } = {}) {
  const { t, s, server } = fakeSession(specs, opts);
  s.onData(structured ? handshakeStructured() : cat(clientFlags(), go()));
  t.out = [];
  return {
    t, s, server,
    send(...reqs: Uint8Array[]) { t.out = []; s.onData(cat(...reqs)); return replies(parseServer(t.bytes())); },
  };
}
const errnoOf = (m: Msg | undefined) => m?.kind === "simple" ? m.error : m?.kind === "chunk" && m.type === NBD_REPLY_TYPE_ERROR ? getU32(m.data, 0) : 0;

R("read past the end: EINVAL; write past the end: ENOSPC; zero past the end: ENOSPC; trim/cache/status past the end: EINVAL", () => {
  for (const structured of [false, true]) {
    const c = transmission(structured);
    assert.is(errnoOf(c.send(request(NBD_CMD_READ, { offset: 16 * MiB - 1, length: 2 }))[0]), NBD_EINVAL);
    assert.is(errnoOf(c.send(request(NBD_CMD_WRITE, { offset: 16 * MiB, payload: new Uint8Array(1) }))[0]), NBD_ENOSPC);
    assert.is(errnoOf(c.send(request(NBD_CMD_WRITE_ZEROES, { offset: 16 * MiB - 1, length: 2 }))[0]), NBD_ENOSPC);
    assert.is(errnoOf(c.send(request(NBD_CMD_TRIM, { offset: 16 * MiB, length: 1 }))[0]), NBD_EINVAL);
    assert.is(errnoOf(c.send(request(NBD_CMD_CACHE, { offset: 16 * MiB, length: 1 }))[0]), NBD_EINVAL);
    if (structured) assert.is(errnoOf(c.send(request(NBD_CMD_BLOCK_STATUS, { offset: 16 * MiB, length: 1 }))[0]), NBD_EINVAL);
  }
});

R("offsets at and beyond 2^53 are rejected, not wrapped", () => {
  const c = transmission(false);
  const r = request(NBD_CMD_READ, { offset: 0, length: 1 });
  r[16] = 0x00; r[17] = 0x20; // offset = 2^53
  assert.is(errnoOf(c.send(r)[0]), NBD_EINVAL);
  const w = request(NBD_CMD_WRITE, { offset: 0, payload: new Uint8Array(1) });
  w[16] = 0xff;
  assert.is(errnoOf(c.send(w)[0]), NBD_ENOSPC);
});

R("unknown command and unknown flags: EINVAL, session continues", () => {
  const c = transmission(false);
  const r = c.send(request(42, { cookie: 1 }), request(NBD_CMD_READ, { cookie: 2, flags: 1 << 9, length: 1 }),
    request(NBD_CMD_WRITE, { cookie: 3, flags: NBD_CMD_FLAG_NO_HOLE, payload: new Uint8Array(4) }), request(NBD_CMD_FLUSH, { cookie: 4 }));
  assert.equal(r.map(errnoOf), [NBD_EINVAL, NBD_EINVAL, NBD_EINVAL, 0]);
});

R("read-only export: writes, zeroes and trims fail with EPERM, payload consumed", () => {
  const c = transmission(false, [mem()], { readOnly: true });
  const r = c.send(request(NBD_CMD_WRITE, { cookie: 1, payload: pattern(4096) }), request(NBD_CMD_WRITE_ZEROES, { cookie: 2, length: 4096 }),
    request(NBD_CMD_TRIM, { cookie: 3, length: 4096 }), request(NBD_CMD_FLUSH, { cookie: 4 }));
  assert.equal(r.map(errnoOf), [NBD_EPERM, NBD_EPERM, NBD_EPERM, 0]);
});

R("a write larger than 64 MiB: EINVAL, payload consumed, next request answered", () => {
  const c = transmission(false, [mem(128 * MiB)]);
  const big = 64 * MiB + 4096;
  const hdr = request(NBD_CMD_WRITE, { cookie: 1, length: big });
  c.t.out = [];
  c.s.onData(hdr);
  for (let sent = 0; sent < big; sent += 4 * MiB) c.s.onData(new Uint8Array(Math.min(4 * MiB, big - sent)).fill(0xee));
  c.s.onData(request(NBD_CMD_READ, { cookie: 2, offset: 0, length: 16 }));
  const r = replies(parseServer(c.t.bytes(), { readLengths: new Map([[2, 16]]) })) as Extract<Msg, { kind: "simple" }>[];
  assert.equal(r.map((m) => [m.cookie, m.error]), [[1, NBD_EINVAL], [2, 0]]);
  bytesEqual(r[1]!.data!, new Uint8Array(16), "nothing was written");
});

R("a read larger than 64 MiB: EINVAL (no giant allocation)", () => {
  const c = transmission(true, [mem(256 * MiB)]);
  assert.is(errnoOf(c.send(request(NBD_CMD_READ, { length: 0xffffffff }))[0]), NBD_EINVAL);
});

R("WRITE immediately followed by DISC: applied, answered, then closed", () => {
  const dev = new MemoryDevice(MiB);
  const c = transmission(false, [{ name: "d", device: dev }]);
  const r = c.send(request(NBD_CMD_WRITE, { cookie: 9, offset: 512, payload: pattern(512) }), request(NBD_CMD_DISC));
  assert.equal(r.map((m) => [m.kind === "simple" && m.cookie, errnoOf(m)]), [[9, 0]]);
  assert.ok(c.t.ended);
  const back = new Uint8Array(512);
  dev.pread(back, 512);
  bytesEqual(back, pattern(512), "written before close");
});

R("DISC flushes only after this connection wrote (a reader's flush would stall every connection)", () => {
  class Counting extends MemoryDevice { flushes = 0; override flush(): void { this.flushes++; } }
  for (const [what, reqs] of [
    ["reads only", [request(NBD_CMD_READ, { cookie: 1, length: 512 })]],
    ["a write", [request(NBD_CMD_WRITE, { cookie: 1, payload: pattern(512) })]],
    ["a trim", [request(NBD_CMD_TRIM, { cookie: 1, length: 512 })]],
    ["a zero", [request(NBD_CMD_WRITE_ZEROES, { cookie: 1, length: 512 })]],
  ] as const) {
    const dev = new Counting(MiB);
    const c = transmission(false, [{ name: "d", device: dev }]);
    c.s.onData(cat(...reqs, request(NBD_CMD_DISC)));
    assert.ok(c.t.ended, what);
    assert.is(dev.flushes, what === "reads only" ? 0 : 1, what);
  }
});

R("zero-length requests do not disconnect", () => {
  const c = transmission(true);
  const r = c.send(request(NBD_CMD_READ, { cookie: 1, length: 0 }), request(NBD_CMD_WRITE, { cookie: 2, length: 0 }),
    request(NBD_CMD_TRIM, { cookie: 3, length: 0 }), request(NBD_CMD_WRITE_ZEROES, { cookie: 4, length: 0 }));
  assert.is(r.length, 4);
  assert.not.ok(c.t.destroyed);
});

R("BLOCK_STATUS: REQ_ONE gives exactly one extent within the request; no context selected: EINVAL", () => {
  const c = transmission(true);
  c.send(request(NBD_CMD_WRITE, { offset: 8192, payload: pattern(4096) }));
  const one = c.send(request(NBD_CMD_BLOCK_STATUS, { flags: NBD_CMD_FLAG_REQ_ONE, offset: 0, length: MiB }))[0] as Extract<Msg, { kind: "chunk" }>;
  assert.is(one.data.length, 12);
  assert.equal([getU32(one.data, 4), getU32(one.data, 8)], [8192, NBD_STATE_HOLE | NBD_STATE_ZERO]);
  const all = c.send(request(NBD_CMD_BLOCK_STATUS, { offset: 4096, length: 8192 }))[0] as Extract<Msg, { kind: "chunk" }>;
  assert.equal([getU32(all.data, 4), getU32(all.data, 8), getU32(all.data, 12), getU32(all.data, 16)], [4096, 3, 4096, 0]);
  const noCtx = fakeSession([mem()]);
  noCtx.s.onData(cat(clientFlags(), option(NBD_OPT_STRUCTURED_REPLY), go()));
  noCtx.t.out = [];
  noCtx.s.onData(request(NBD_CMD_BLOCK_STATUS, { length: 4096 }));
  assert.is(errnoOf(replies(parseServer(noCtx.t.bytes()))[0]), NBD_EINVAL);
});

R("DF read: one data chunk even over holes; FAST_ZERO and NO_HOLE accepted; FUA on anything", () => {
  const c = transmission(true);
  const df = c.send(request(NBD_CMD_READ, { flags: NBD_CMD_FLAG_DF, length: 65536 }));
  assert.equal(df.map((m) => m.kind === "chunk" && m.type), [NBD_REPLY_TYPE_OFFSET_DATA]);
  const r = c.send(request(NBD_CMD_WRITE_ZEROES, { cookie: 1, flags: NBD_CMD_FLAG_FAST_ZERO | NBD_CMD_FLAG_NO_HOLE, length: 4096 }),
    request(NBD_CMD_FLUSH, { cookie: 2, flags: NBD_CMD_FLAG_FUA }), request(NBD_CMD_READ, { cookie: 3, flags: NBD_CMD_FLAG_FUA, length: 1 }));
  assert.equal(r.map(errnoOf), [0, 0, 0]);
});

R("bad request magic closes the connection", () => {
  const c = transmission(false);
  const r = request(NBD_CMD_READ, { length: 1 });
  r[0] = 0x12;
  c.send(r);
  assert.ok(c.t.destroyed);
});

R("server shutdown: requests get ESHUTDOWN", async () => {
  const c = transmission(false);
  void c.server.close(0);
  const r = c.send(request(NBD_CMD_READ, { length: 1 }));
  // the session stops reading once shutdown starts; a request already buffered is answered ESHUTDOWN or not at all
  assert.ok(r.length === 0 || errnoOf(r[0]) === NBD_ESHUTDOWN);
});

R.run();
