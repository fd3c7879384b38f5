// Malformed and hostile clients, in raw bytes over node:net: each misbehaviour closes only its
// own connection (or is answered with the errno/option error the spec asks for), and the server
// keeps serving the next client. One server for the whole file; every test ends by checking that a
// fresh client still gets a working export.
import * as assert from "uvu/assert";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { bytesEqual, deadline } from "./helpers/assert.ts";
import { scratch } from "./helpers/env.ts";
import { guardedSuite } from "./interop-lib.ts";
import { serve, type Served } from "./helpers/server.ts";
import { CMD, ERR, OPT, REP, Wire, infoData, metaContextData, pattern, request, u32, type Target } from "./robustness-wire.ts";

const dir = scratch("bun-nbd-robust-");
const SIZE = 4 * 1024 * 1024;
const img = join(dir, "disk.img");
let srv: Served;
let tcp: Target;

const { test, after, run: runSuite } = guardedSuite("robustness-protocol", async () => {
  writeFileSync(img, pattern(SIZE, 0, 7));
  srv = await serve([img]);
  tcp = { port: srv.port };
});

/** A fresh client can still negotiate and read: the server survived whatever came before. */
async function stillServes(): Promise<void> {
  const w = await Wire.open(tcp);
  try {
    const { size } = await w.hello().then(() => w.go("disk"));
    assert.is(size, SIZE);
    w.write(request(CMD.READ, 77n, 4096, 512));
    const r = await w.simpleReply(512);
    assert.is(r.error, 0);
    assert.is(r.cookie, 77n);
    bytesEqual(r.data!, readFileSync(img).subarray(4096, 4608), "read after misbehaving client");
  } finally {
    w.destroy();
  }
}

async function transmitting(opts: { structured?: boolean } = {}): Promise<Wire> {
  const w = await Wire.open(tcp);
  await w.hello();
  await w.go("disk", opts);
  return w;
}

// ------------------------------------------------------------------ handshake -------------

test("garbage instead of client flags: closed, server survives", () => deadline(15_000, "garbage", async () => {
  const w = await Wire.open(tcp);
  await w.greeting();
  w.write(Buffer.from("GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
  assert.ok(await w.closedWithin(5000), "connection closed");
  await stillServes();
}));

test("garbage instead of an option header (bad IHAVEOPT): closed, server survives", () => deadline(15_000, "bad opt magic", async () => {
  const w = await Wire.open(tcp);
  await w.hello();
  w.write(Buffer.alloc(64, 0xa5));
  assert.ok(await w.closedWithin(5000), "connection closed");
  await stillServes();
}));

test("random bytes at every stage do not kill the server", () => deadline(30_000, "fuzz", async () => {
  let seed = 12345;
  const rnd = () => (seed = (seed * 1103515245 + 12345) & 0x7fffffff);
  for (let i = 0; i < 20; i++) {
    const w = await Wire.open(tcp);
    await w.greeting();
    const n = 1 + (rnd() % 200);
    const b = Buffer.alloc(n);
    for (let j = 0; j < n; j++) b[j] = rnd() & 0xff;
    if (i % 2) b.writeUInt32BE(3, 0); // valid flags, garbage options
    w.write(b);
    await Bun.sleep(5);
    w.destroy();
  }
  await stillServes();
}));

test("unknown option: ERR_UNSUP and the session continues", () => deadline(15_000, "unknown option", async () => {
  const w = await Wire.open(tcp);
  await w.hello();
  w.sendOption(0x7fff_0042, Buffer.from("whatever data"));
  const r = await w.optionReply();
  assert.is(r.option, 0x7fff_0042, "option echoed");
  assert.is(r.type, REP.ERR_UNSUP);
  w.sendOption(4); // PEEK_EXPORT, withdrawn
  assert.is((await w.optionReply()).type, REP.ERR_UNSUP, "withdrawn PEEK_EXPORT");
  w.sendOption(OPT.LIST);
  const rs = await w.optionReplies();
  assert.is(rs.at(-1)!.type, REP.ACK);
  assert.is(rs.filter((x) => x.type === REP.SERVER).length, 1);
  const { size } = await w.go("disk");
  assert.is(size, SIZE);
  w.destroy();
}));

test("malformed INFO/GO/LIST/META_CONTEXT lengths: ERR_INVALID, framing kept", () => deadline(15_000, "malformed options", async () => {
  const w = await Wire.open(tcp);
  await w.hello();
  const cases: [string, number, Buffer][] = [
    // name length runs past the option data
    ["INFO name length too long", OPT.INFO, Buffer.concat([u32(100), Buffer.from("disk"), Buffer.from([0, 0])])],
    // info request count says 3 but only one u16 follows
    ["GO info count too large", OPT.GO, Buffer.concat([u32(4), Buffer.from("disk"), Buffer.from([0, 3, 0, 1])])],
    // too short to hold even the name length
    ["GO data too short", OPT.GO, Buffer.from([0, 0])],
    // trailing garbage after the info requests
    ["INFO trailing bytes", OPT.INFO, Buffer.concat([infoData("disk"), Buffer.from([1, 2, 3])])],
    ["LIST with data", OPT.LIST, Buffer.from("x")],
    ["STRUCTURED_REPLY with data", OPT.STRUCTURED_REPLY, Buffer.from("x")],
  ];
  for (const [what, opt, data] of cases) {
    w.sendOption(opt, data);
    const r = await w.optionReply();
    assert.is(r.option, opt, `${what}: option echoed`);
    assert.is(r.type, REP.ERR_INVALID, `${what}: reply type 0x${r.type.toString(16)}`);
  }
  // meta context requests need structured replies first; then malformed lengths
  w.sendOption(OPT.STRUCTURED_REPLY);
  assert.is((await w.optionReply()).type, REP.ACK);
  const metaCases: [string, Buffer][] = [
    ["query count too large", Buffer.concat([u32(4), Buffer.from("disk"), u32(5), u32(15), Buffer.from("base:allocation")])],
    ["query length past the end", Buffer.concat([u32(4), Buffer.from("disk"), u32(1), u32(200), Buffer.from("base:allocation")])],
    ["export name length past the end", Buffer.concat([u32(50), Buffer.from("disk")])],
    ["trailing bytes", Buffer.concat([metaContextData("disk", ["base:allocation"]), Buffer.from([9])])],
  ];
  for (const opt of [OPT.LIST_META_CONTEXT, OPT.SET_META_CONTEXT]) {
    for (const [what, data] of metaCases) {
      w.sendOption(opt, data);
      const r = await w.optionReply();
      assert.is(r.type, REP.ERR_INVALID, `${opt === OPT.LIST_META_CONTEXT ? "LIST" : "SET"}_META_CONTEXT ${what}: reply type 0x${r.type.toString(16)}`);
    }
  }
  // framing intact: a valid LIST_META_CONTEXT and GO still work on the same connection
  w.sendOption(OPT.LIST_META_CONTEXT, metaContextData("disk", []));
  const rs = await w.optionReplies();
  assert.is(rs.at(-1)!.type, REP.ACK);
  assert.ok(rs.some((r) => r.type === REP.META_CONTEXT && r.data.subarray(4).toString() === "base:allocation"), "base:allocation listed");
  const { size } = await w.go("disk");
  assert.is(size, SIZE);
  w.destroy();
}));

test("an absurd option length closes the connection (not an allocation)", () => deadline(15_000, "huge option", async () => {
  const w = await Wire.open(tcp);
  await w.hello();
  w.sendOption(OPT.INFO, Buffer.alloc(16), 0xfffffff0);
  assert.ok(await w.closedWithin(5000), "connection closed");
  await stillServes();
}));

test("STARTTLS: ERR_POLICY, the session continues", () => deadline(15_000, "starttls", async () => {
  const w = await Wire.open(tcp);
  await w.hello();
  w.sendOption(OPT.STARTTLS);
  const r = await w.optionReply();
  assert.is(r.option, OPT.STARTTLS);
  assert.is(r.type, REP.ERR_POLICY);
  await w.go("disk");
  w.destroy();
}));

test("ABORT: ACK, then the server closes", () => deadline(15_000, "abort", async () => {
  const w = await Wire.open(tcp);
  await w.hello();
  w.sendOption(OPT.ABORT);
  const r = await w.optionReply();
  assert.is(r.option, OPT.ABORT);
  assert.is(r.type, REP.ACK);
  assert.ok(await w.closedWithin(5000), "closed after ABORT");
}));

test("EXPORT_NAME of an unknown export: closed without a reply", () => deadline(15_000, "export name", async () => {
  const w = await Wire.open(tcp);
  await w.hello();
  w.sendOption(OPT.EXPORT_NAME, Buffer.from("no-such-export"));
  assert.ok(await w.closedWithin(5000), "closed");
  assert.is(w.pending, 0, "no bytes sent before closing");
  await stillServes();
}));

test("INFO/GO of an unknown export: ERR_UNKNOWN and the session continues", () => deadline(15_000, "unknown export", async () => {
  const w = await Wire.open(tcp);
  await w.hello();
  for (const opt of [OPT.INFO, OPT.GO]) {
    w.sendOption(opt, infoData("no-such-export"));
    const r = await w.optionReply();
    assert.is(r.type, REP.ERR_UNKNOWN);
  }
  await w.go("disk");
  w.destroy();
}));

test("EXPORT_NAME of a known export: size, flags and (with NO_ZEROES) no padding", () => deadline(15_000, "export name ok", async () => {
  const w = await Wire.open(tcp);
  await w.hello();
  w.sendOption(OPT.EXPORT_NAME, Buffer.from("disk"));
  const r = await w.read(10);
  assert.is(Number(r.readBigUInt64BE(0)), SIZE);
  assert.ok(r.readUInt16BE(8) & 1, "HAS_FLAGS");
  w.write(request(CMD.READ, 5n, 0, 16));
  const rep = await w.simpleReply(16);
  assert.is(rep.cookie, 5n, "next bytes are the reply, not 124 bytes of padding");
  w.destroy();
}));

test("EXPORT_NAME without NO_ZEROES: 124 bytes of zero padding after size and flags", () => deadline(15_000, "padding", async () => {
  const w = await Wire.open(tcp);
  await w.greeting();
  w.write(u32(1)); // FIXED_NEWSTYLE only
  w.sendOption(OPT.EXPORT_NAME, Buffer.from("disk"));
  const r = await w.read(10 + 124);
  assert.is(Number(r.readBigUInt64BE(0)), SIZE);
  bytesEqual(r.subarray(10), Buffer.alloc(124), "padding");
  w.write(request(CMD.READ, 6n, 0, 16));
  assert.is((await w.simpleReply(16)).cookie, 6n);
  w.destroy();
}));

test("requests pipelined in the same packet as GO are served", () => deadline(15_000, "pipelined after GO", async () => {
  const w = await Wire.open(tcp);
  await w.greeting();
  const go = Buffer.concat([Buffer.from("IHAVEOPT"), u32(OPT.GO), u32(infoData("disk").length), infoData("disk")]);
  w.write(Buffer.concat([u32(3), go, request(CMD.READ, 1n, 0, 64), request(CMD.READ, 2n, 64, 64)]));
  const rs = await w.optionReplies();
  assert.is(rs.at(-1)!.type, REP.ACK);
  const want = readFileSync(img).subarray(0, 128);
  for (const c of [1n, 2n]) {
    const r = await w.simpleReply(64);
    assert.is(r.cookie, c);
    bytesEqual(r.data!, want.subarray(Number(c - 1n) * 64, Number(c) * 64), `read ${c}`);
  }
  w.destroy();
}));

// ------------------------------------------------------------------ transmission ----------

test("bad request magic: connection closes, server survives", () => deadline(15_000, "bad magic", async () => {
  const w = await transmitting();
  w.write(request(CMD.READ, 1n, 0, 512, 0, undefined, 0x12560953));
  assert.ok(await w.closedWithin(5000), "closed on bad magic");
  await stillServes();
}));

test("truncated header then close: server survives", () => deadline(15_000, "truncated", async () => {
  const w = await transmitting();
  w.write(request(CMD.READ, 1n, 0, 512).subarray(0, 13));
  await w.flushed();
  await Bun.sleep(20);
  w.destroy();
  await stillServes();
}));

test("abrupt close mid-WRITE payload and with a large READ unanswered: server survives", () => deadline(15_000, "abrupt", async () => {
  const before = readFileSync(img).subarray(65536, 65536 + 4096);
  const w = await transmitting();
  w.write(request(CMD.WRITE, 1n, 65536, 4096, 0, Buffer.alloc(1000, 0xee)));
  await w.flushed();
  await Bun.sleep(20);
  w.destroy();
  const w2 = await transmitting();
  w2.write(request(CMD.READ, 2n, 0, 16 * 1024 * 1024 > SIZE ? SIZE : 16 * 1024 * 1024));
  await w2.read(100);
  w2.destroy();
  await stillServes();
  bytesEqual(readFileSync(img).subarray(65536, 65536 + 4096), before, "half-received WRITE not applied");
}));

test("WRITE immediately followed by DISC in one packet: applied and answered before close", () => deadline(15_000, "write+disc", async () => {
  for (const structured of [false, true]) {
    const data = pattern(8192, 0, structured ? 21 : 22);
    const w = await transmitting({ structured });
    w.write(Buffer.concat([request(CMD.WRITE, 0xfeedn, 12288, data.length, 0, data), request(CMD.DISC, 0xdeadn, 0, 0)]));
    if (structured) {
      const c = await w.chunk();
      assert.is(c.cookie, 0xfeedn);
      assert.is(c.type, 0, "NONE chunk");
      assert.ok(c.flags & 1, "DONE");
    } else {
      const r = await w.simpleReply();
      assert.is(r.cookie, 0xfeedn);
      assert.is(r.error, 0);
    }
    assert.ok(await w.closedWithin(5000), "closed after DISC");
    assert.is(w.pending, 0, "nothing after the write reply (DISC has no reply)");
    bytesEqual(readFileSync(img).subarray(12288, 12288 + 8192), data, "write applied to the file");
  }
}));

test("DISC after 64 pipelined reads and writes: every request answered before the close", () => deadline(15_000, "disc in flight", async () => {
  const w = await transmitting({ structured: true });
  const parts: Buffer[] = [];
  for (let i = 0; i < 64; i++) {
    parts.push(i % 2 ? request(CMD.READ, BigInt(i), i * 65536, 65536)
      : request(CMD.WRITE, BigInt(i), 2 * 1024 * 1024 + i * 4096, 4096, 0, pattern(4096, i, 31)));
  }
  parts.push(request(CMD.DISC, 999n, 0, 0));
  w.write(Buffer.concat(parts));
  const done = new Set<bigint>();
  while (done.size < 64) {
    const c = await w.chunk();
    assert.ok(c.type === 0 || c.type === 1 || c.type === 2, `chunk type ${c.type}`);
    if (c.flags & 1) { assert.not.ok(done.has(c.cookie), "DONE twice"); done.add(c.cookie); }
  }
  assert.ok(await w.closedWithin(5000), "closed after answering everything");
  assert.is(w.pending, 0, "nothing after the last reply");
  const f = readFileSync(img);
  for (let i = 0; i < 64; i += 2) bytesEqual(f.subarray(2 * 1024 * 1024 + i * 4096, 2 * 1024 * 1024 + (i + 1) * 4096), pattern(4096, i, 31), `write ${i}`);
}));

test("WRITE of 64 MiB + 4 KiB: error reply, payload consumed, next request answered", () => deadline(60_000, "huge write", async () => {
  const w = await transmitting();
  const len = 64 * 1024 * 1024 + 4096;
  w.write(request(CMD.WRITE, 1n, 0, len));
  const chunk = Buffer.alloc(1024 * 1024, 0x5a);
  for (let sent = 0; sent < len; sent += chunk.length) {
    const n = Math.min(chunk.length, len - sent);
    if (!w.write(n === chunk.length ? chunk : chunk.subarray(0, n))) await new Promise((r) => w.sock.once("drain", r));
  }
  w.write(request(CMD.READ, 2n, 0, 512));
  const r1 = await w.simpleReply();
  assert.is(r1.cookie, 1n);
  assert.ok(r1.error === ERR.EINVAL || r1.error === ERR.ENOMEM || r1.error === ERR.EOVERFLOW, `errno ${r1.error}`);
  const r2 = await w.simpleReply(512);
  assert.is(r2.cookie, 2n);
  assert.is(r2.error, 0);
  bytesEqual(r2.data!, readFileSync(img).subarray(0, 512), "data not overwritten by the refused write");
  w.destroy();
}));

test("1000 pipelined requests in one packet: every cookie answered exactly once", () => deadline(30_000, "pipelined", async () => {
  const w = await transmitting();
  const parts: Buffer[] = [];
  const expect = new Map<bigint, { type: number; len: number; off: number }>();
  const base = 1_000_000;
  for (let i = 0; i < 1000; i++) {
    // cookies use the high 32 bits too
    const cookie = (BigInt(i) << 40n) | BigInt(0xabcd0000 + i);
    const off = base + ((i * 4096) % (2 * 1024 * 1024));
    if (i % 3 === 0) {
      parts.push(request(CMD.WRITE, cookie, off + 100, 512, 0, pattern(512, off + 100, 3)));
      expect.set(cookie, { type: CMD.WRITE, len: 0, off });
    } else if (i % 3 === 1) {
      parts.push(request(CMD.READ, cookie, (i * 777) % (SIZE - 1024), 1024));
      expect.set(cookie, { type: CMD.READ, len: 1024, off });
    } else {
      parts.push(request(i % 2 ? CMD.FLUSH : CMD.CACHE, cookie, i % 2 ? 0 : off, i % 2 ? 0 : 4096));
      expect.set(cookie, { type: CMD.FLUSH, len: 0, off });
    }
  }
  w.write(Buffer.concat(parts));
  const seen = new Set<bigint>();
  for (let i = 0; i < 1000; i++) {
    const h = await w.read(16);
    assert.is(h.readUInt32BE(0), 0x67446698, `reply ${i}: simple reply magic`);
    assert.is(h.readUInt32BE(4), 0, `reply ${i}: no error`);
    const cookie = h.readBigUInt64BE(8);
    const e = expect.get(cookie);
    assert.ok(e, `reply ${i}: unknown cookie 0x${cookie.toString(16)}`);
    assert.not.ok(seen.has(cookie), `cookie 0x${cookie.toString(16)} answered twice`);
    seen.add(cookie);
    if (e!.len) await w.read(e!.len);
  }
  assert.is(seen.size, 1000);
  await Bun.sleep(50);
  assert.is(w.pending, 0, "no extra replies");
  w.destroy();
}));

test("unknown command and invalid flags: EINVAL, session continues", () => deadline(15_000, "bad cmd", async () => {
  for (const structured of [false, true]) {
    const w = await transmitting({ structured });
    const probes: [string, Buffer, number][] = [
      ["unknown command 42", request(42, 1n, 0, 0), ERR.EINVAL],
      ["unknown flag bit 14 on READ", request(CMD.READ, 2n, 0, 512, 1 << 14), ERR.EINVAL],
      ["NO_HOLE on READ", request(CMD.READ, 3n, 0, 512, 2), ERR.EINVAL],
      ["READ past the end", request(CMD.READ, 4n, SIZE - 100, 512), ERR.EINVAL],
      ["WRITE past the end", request(CMD.WRITE, 5n, SIZE - 100, 512, 0, Buffer.alloc(512)), ERR.ENOSPC],
      ["BLOCK_STATUS without a context", request(CMD.BLOCK_STATUS, 6n, 0, 512), ERR.EINVAL],
    ];
    for (const [what, req, errno] of probes) {
      w.write(req);
      if (structured) {
        const c = await w.chunk();
        assert.is(c.type, 0x8001, `${what}: ERROR chunk`);
        assert.ok(c.flags & 1, `${what}: DONE`);
        assert.is(c.data.readUInt32BE(0), errno, `${what}: errno`);
        assert.ok(c.data.readUInt16BE(4) <= c.data.length - 6, `${what}: message length fits`);
      } else {
        const r = await w.simpleReply();
        assert.is(r.error, errno, `${what}: errno`);
      }
    }
    w.write(request(CMD.READ, 9n, 0, 512));
    if (structured) {
      const c = await w.chunk();
      assert.is(c.type, 1, "OFFSET_DATA");
      assert.is(c.data.length, 8 + 512);
    } else {
      assert.is((await w.simpleReply(512)).error, 0);
    }
    w.destroy();
  }
}));

after(async () => { if (srv?.proc.exitCode === null) await srv.stop("SIGKILL"); });
test("the server exits 0 on SIGTERM after all of the above", async () => {
  assert.is(await srv.stop(), 0, srv.output().slice(-3000));
});

runSuite();
