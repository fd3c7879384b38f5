// STARTTLS and FORCEDTLS as raw transcripts against `bun-nbd serve`: before TLS a --tls=require
// server answers every option but STARTTLS and ABORT with ERR_TLS_REQD (INFO/GO without INFO
// replies, unknown options too) and closes on EXPORT_NAME; STARTTLS with data and a second
// STARTTLS get ERR_INVALID; haggling restarts inside TLS (structured replies negotiated before are
// forgotten); a ClientHello sent with the STARTTLS option works (X.509 and PSK); a failed TLS
// handshake closes only that connection, with a log line saying why.
import * as assert from "uvu/assert";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { bytesEqual, deadline } from "./helpers/assert.ts";
import { need, scratch } from "./helpers/env.ts";
import { serve, type Served } from "./helpers/server.ts";
import { makePki, type Pki } from "./helpers/tls.ts";
import { TlsContext, TlsWire } from "./helpers/tls-wire.ts";
import { guardedSuite } from "./interop-lib.ts";
import { CMD, infoData, metaContextData, OPT, pattern, REP, request } from "./robustness-wire.ts";
import { parsePskFile } from "../src/protocol/psk-file.ts";

const ERR_TLS_REQD = 0x80000005;
const SIMPLE_REPLY_MAGIC = 0x67446698;
const dir = scratch("bun-nbd-tls-transcripts-");
const SIZE = 1024 * 1024;
const img = join(dir, "disk.img");
let pki: Pki;
let x509: Served; // --tls=require with certificates
let psk: Served; // --tls=require with pre-shared keys
let optional: Served; // --tls=on
let trust: TlsContext; // a client trusting the test CA
let alice: TlsContext; // a PSK client with alice's key

const { test, after, run: runSuite } = guardedSuite("tls-transcripts", async () => {
  need("openssl", "psktool");
  writeFileSync(img, pattern(SIZE, 0, 3));
  pki = await makePki(join(dir, "pki"));
  x509 = await serve(["--tls=require", "--tls-certificates", pki.server, img]);
  psk = await serve(["--tls=require", "--tls-psk", pki.psk, img]);
  optional = await serve(["--tls=on", "--tls-certificates", pki.server, img]);
  trust = new TlsContext({ role: "client", caFile: join(pki.client, "ca-cert.pem"), verifyPeer: true });
  const key = parsePskFile(readFileSync(pki.psk, "utf8"), pki.psk).get("alice")!;
  alice = new TlsContext({ role: "client", pskIdentity: "alice", pskKey: key });
});

after(async () => {
  for (const s of [x509, psk, optional]) await s?.stop();
});

async function open(s: Served): Promise<TlsWire> {
  const w = await TlsWire.open({ port: s.port });
  await w.hello();
  return w;
}

/** GO "disk" (no structured replies), then READ 4 KiB at 8 KiB: a simple reply with the file's bytes. */
async function goAndRead(w: TlsWire): Promise<void> {
  w.sendOption(OPT.GO, infoData("disk"));
  const rs = await w.optionReplies();
  assert.is(rs.at(-1)!.type, REP.ACK, "GO acknowledged");
  w.write(request(CMD.READ, 9n, 8192, 4096));
  const h = await w.read(16);
  assert.is(h.readUInt32BE(0), SIMPLE_REPLY_MAGIC, "a simple reply (structured replies were not negotiated inside TLS)");
  assert.is(h.readUInt32BE(4), 0, "no error");
  bytesEqual(await w.read(4096), readFileSync(img).subarray(8192, 12288), "READ over TLS");
}

test("FORCEDTLS: every option but STARTTLS and ABORT gets ERR_TLS_REQD, INFO/GO without INFO replies", () => deadline(20_000, "forced", async () => {
  const w = await open(x509);
  for (const [opt, data] of [[OPT.LIST, undefined], [OPT.INFO, infoData("disk")], [OPT.GO, infoData("disk")],
    [OPT.STRUCTURED_REPLY, undefined], [OPT.SET_META_CONTEXT, metaContextData("disk", ["base:allocation"])],
    [OPT.LIST_META_CONTEXT, metaContextData("disk", [])], [42, undefined]] as const) {
    w.sendOption(opt, data);
    const r = await w.optionReply();
    assert.is(r.option, opt, `reply to option ${opt} names it`);
    assert.is(r.type, ERR_TLS_REQD, `option ${opt}: ERR_TLS_REQD`);
    assert.match(r.data.toString(), /requires TLS/);
  }
  assert.is(w.pending, 0, "nothing but the one error reply per option");
  w.sendOption(OPT.ABORT);
  const r = await w.optionReply();
  assert.is(r.type, REP.ACK, "ABORT is still acknowledged");
  assert.ok(await w.closedWithin(5000), "closed after ABORT");
}));

test("FORCEDTLS: EXPORT_NAME before STARTTLS ends the session without a reply", () => deadline(15_000, "export name", async () => {
  const w = await open(x509);
  w.sendOption(OPT.EXPORT_NAME, Buffer.from("disk"));
  assert.ok(await w.closedWithin(5000), "closed");
  assert.is(w.pending, 0, "no bytes before the close");
  assert.match(x509.output(), /EXPORT_NAME before STARTTLS/);
}));

test("STARTTLS with data: ERR_INVALID, then a plain STARTTLS works", () => deadline(15_000, "starttls data", async () => {
  const w = await open(x509);
  w.sendOption(OPT.STARTTLS, Buffer.from("x"));
  const r = await w.optionReply();
  assert.is(r.type, REP.ERR_INVALID);
  const ack = await w.startTls(trust);
  assert.is(ack.type, REP.ACK);
  await goAndRead(w);
  w.destroy();
}));

test("inside TLS: a second STARTTLS gets ERR_INVALID, LIST works, never ERR_TLS_REQD", () => deadline(15_000, "second starttls", async () => {
  const w = await open(x509);
  assert.is((await w.startTls(trust)).type, REP.ACK);
  w.sendOption(OPT.STARTTLS);
  assert.is((await w.optionReply()).type, REP.ERR_INVALID, "second STARTTLS");
  w.sendOption(OPT.LIST);
  const list = await w.optionReplies();
  assert.is(list.at(-1)!.type, REP.ACK);
  assert.ok(list.some((r) => r.type === REP.SERVER && r.data.subarray(4).toString().startsWith("disk")), "disk is listed");
  w.sendOption(42);
  assert.is((await w.optionReply()).type, REP.ERR_UNSUP, "an unknown option inside TLS is ERR_UNSUP, not ERR_TLS_REQD");
  await goAndRead(w);
  w.destroy();
}));

test("haggling restarts inside TLS: structured replies and meta contexts set before STARTTLS are forgotten", () => deadline(15_000, "restart", async () => {
  const w = await open(optional);
  w.sendOption(OPT.STRUCTURED_REPLY);
  assert.is((await w.optionReply()).type, REP.ACK, "structured replies before TLS (--tls=on)");
  w.sendOption(OPT.SET_META_CONTEXT, metaContextData("disk", ["base:allocation"]));
  assert.is((await w.optionReplies()).at(-1)!.type, REP.ACK);
  assert.is((await w.startTls(trust)).type, REP.ACK);
  await goAndRead(w); // asserts a simple reply
  w.destroy();
}));

test("--tls=on: a plain client needs no TLS", () => deadline(15_000, "optional", async () => {
  const w = await open(optional);
  await goAndRead(w);
  w.destroy();
}));

test("the ClientHello in the same write as STARTTLS (X.509 and PSK)", () => deadline(20_000, "early hello", async () => {
  for (const [s, ctx] of [[x509, trust], [psk, alice]] as const) {
    const w = await open(s);
    const r = await w.startTls(ctx, { early: true });
    assert.is(r.type, REP.ACK);
    await goAndRead(w);
    w.destroy();
  }
  assert.match(psk.output(), /TLS established \(TLSv1\.3 TLS_AES_128_GCM_SHA256\), PSK user "alice"/, "PSK prefers AES-GCM");
}));

test("a failed TLS handshake closes only that connection, with the reason in the log", () => deadline(20_000, "failed handshake", async () => {
  const w = await open(x509);
  w.sendOption(OPT.STARTTLS);
  assert.is((await w.optionReply()).type, REP.ACK);
  w.write(Buffer.from("GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
  assert.ok(await w.closedWithin(5000), "garbage instead of a ClientHello: closed");
  const bob = new TlsContext({ role: "client", pskIdentity: "bob", pskKey: new Uint8Array(32).fill(7) });
  const u = await open(psk);
  const err = await u.startTls(bob).then(() => null, (e: Error) => e);
  assert.ok(err, "an unknown PSK user is refused");
  assert.ok(await u.closedWithin(5000), "closed after the refusal");
  // Others carry on.
  const ok = await open(psk);
  assert.is((await ok.startTls(alice)).type, REP.ACK);
  await goAndRead(ok);
  ok.destroy();
  assert.match(x509.output(), /TLS handshake failed: .*\(not TLS\); closing the connection/);
  assert.match(psk.output(), /TLS handshake failed: unknown PSK identity "bob"; closing the connection/);
}));

runSuite();
