// The session's side of STARTTLS, in process over a fake transport: after the ACK the bytes that
// followed the option go to the transport's upgrade and nothing is parsed until the transport says
// "secured"; haggling then starts again with no greeting; the client identity (address and TLS
// identity) reaches export resolution; a failed handshake destroys only that transport; a
// transport that cannot encrypt makes the session refuse STARTTLS whatever the server's mode.
import { test } from "uvu";
import * as assert from "uvu/assert";
import {
  NBD_INFO_BLOCK_SIZE, NBD_OPT_GO, NBD_OPT_STARTTLS, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, NBD_REP_ERR_POLICY,
  NBD_REP_ERR_TLS_REQD,
} from "../src/protocol/constants.ts";
import { MemoryDevice } from "../src/devices/memory.ts";
import { NbdServer } from "../src/server/server.ts";
import { Session } from "../src/server/session.ts";
import { silentLogger } from "../src/server/log.ts";
import type { ClientIdentity } from "../src/server/types.ts";
import { cat, clientFlags, encodeInfoRequest, FakeTransport, option, parseServer, type Msg } from "./helpers/wire.ts";

class TlsFakeTransport extends FakeTransport {
  upgrades: Uint8Array[] = [];
  startTls(initial: Uint8Array): void { this.upgrades.push(Uint8Array.from(initial)); }
}

const optReplies = (b: Uint8Array) => parseServer(b).filter((m) => m.kind === "optreply") as Extract<Msg, { kind: "optreply" }>[];

function setup(tls: "on" | "require") {
  const server = new NbdServer([{ name: "disk", device: new MemoryDevice(1 << 20) }], { log: silentLogger });
  const asked: (ClientIdentity | undefined)[] = [];
  const table = {
    resolve: (name: string, client: ClientIdentity) => { asked.push(structuredClone(client)); return server.resolve(name, client); },
    list: (client: ClientIdentity) => server.list(client),
    shuttingDown: () => false,
  };
  const t = new TlsFakeTransport();
  const client: ClientIdentity = { transport: "tcp", address: "192.0.2.7", port: 40000, tls: null };
  const s = new Session(t, table, silentLogger, "192.0.2.7", { client, tls });
  return { t, s, asked };
}

test("STARTTLS: ACK, the bytes after it go to the upgrade, nothing else is parsed until secured", () => {
  const { t, s } = setup("require");
  const hello = new Uint8Array([0x16, 3, 1, 0, 5, 1, 2, 3, 4, 5]);
  s.onData(cat(clientFlags(), option(NBD_OPT_STARTTLS), hello));
  const r = optReplies(t.bytes());
  assert.is(r.length, 1);
  assert.is(r[0]!.option, NBD_OPT_STARTTLS);
  assert.is(r[0]!.type, NBD_REP_ACK);
  assert.equal(t.upgrades, [hello], "the ClientHello that came with the option is handed over");
  const before = t.out.length;
  s.onData(option(NBD_OPT_GO, encodeInfoRequest("disk", [])));
  assert.is(t.out.length, before, "nothing answered while the TLS handshake runs");
  assert.ok(s.negotiating);
});

test("secured: haggling restarts without a greeting, and export resolution sees the TLS identity", () => {
  const { t, s, asked } = setup("require");
  s.onData(cat(clientFlags(), option(NBD_OPT_STRUCTURED_REPLY)));
  assert.is(optReplies(t.bytes())[0]!.type, NBD_REP_ERR_TLS_REQD, "FORCEDTLS before STARTTLS");
  s.onData(option(NBD_OPT_STARTTLS));
  t.out = [];
  s.onSecured({ kind: "psk", name: "alice", protocol: "TLSv1.3", cipher: "TLS_AES_128_GCM_SHA256" });
  assert.is(t.out.length, 0, "no second greeting");
  s.onData(option(NBD_OPT_GO, encodeInfoRequest("disk", [NBD_INFO_BLOCK_SIZE])));
  const r = optReplies(t.bytes());
  assert.is(r.at(-1)!.type, NBD_REP_ACK, "GO inside TLS");
  assert.not.ok(s.negotiating, "transmission started");
  assert.equal(asked.at(-1), { transport: "tcp", address: "192.0.2.7", port: 40000, tls: { kind: "psk", name: "alice", protocol: "TLSv1.3", cipher: "TLS_AES_128_GCM_SHA256" } });
  assert.equal(s.client.tls?.name, "alice");
});

test("a failed TLS handshake destroys that transport only", () => {
  const a = setup("on");
  const b = setup("on");
  a.s.onData(cat(clientFlags(), option(NBD_OPT_STARTTLS)));
  a.s.onTlsFailed("binder does not verify (wrong pre-shared key)");
  assert.ok(a.t.destroyed);
  assert.ok(a.s.closed);
  b.s.onData(cat(clientFlags(), option(NBD_OPT_GO, encodeInfoRequest("disk", []))));
  assert.is(optReplies(b.t.bytes()).at(-1)!.type, NBD_REP_ACK, "the other session carries on (plain, --tls=on)");
  assert.not.ok(b.t.destroyed);
});

test("a transport that cannot encrypt: STARTTLS refused, no ERR_TLS_REQD, whatever the mode", () => {
  const server = new NbdServer([{ name: "disk", device: new MemoryDevice(1 << 20) }], { log: silentLogger });
  const t = new FakeTransport();
  const s = new Session(t, server, silentLogger, "test", { tls: "require" });
  s.onData(cat(clientFlags(), option(NBD_OPT_STARTTLS), option(NBD_OPT_GO, encodeInfoRequest("disk", []))));
  const r = optReplies(t.bytes());
  assert.is(r[0]!.type, NBD_REP_ERR_POLICY);
  assert.is(r.at(-1)!.type, NBD_REP_ACK);
});

test.run();
