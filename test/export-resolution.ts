// Export resolution, `(name, client identity) -> stack`, in process: per-export allow lists (LIST
// hides what a client may not use), the per-client rule that with TLS CLIENT must be the TLS
// identity unless the export says "any", leases given back once, and generations: a swapped-out
// stack stays open for the sessions that hold it and closes with the last one.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { MemoryDevice } from "../src/devices/memory.ts";
import type { BlockDevice } from "../src/devices/types.ts";
import { AllowList } from "../src/server/access.ts";
import { ExportRegistry, Generation, SharedStack, staticRows, type ClientOverlayManager, type Row } from "../src/server/exports.ts";
import { createLogger } from "../src/server/log.ts";
import { tcpClient, UNIX_PEER, type ClientIdentity } from "../src/server/identity.ts";

const test = suite("export resolution");
const lines: string[] = [];
const log = createLogger("info", (l) => lines.push(l));

/** A manager over memory devices that counts what it hands out. */
class CountingManager implements ClientOverlayManager {
  readonly size = 1 << 20;
  open = new Map<string | null, number>();
  retired = 0;
  acquire(client: string | null) {
    this.open.set(client, (this.open.get(client) ?? 0) + 1);
    const device: BlockDevice = new MemoryDevice(this.size);
    return { device, release: () => { this.open.set(client, this.open.get(client)! - 1); } };
  }
  retain() {}
  retire() { this.retired++; }
  close() {}
  usage() { return []; }
}

function perClient(name: string, m: ClientOverlayManager, o: { allow?: string[]; identityCheck?: "tls" | "none" } = {}): Row {
  return { kind: "per-client", name, description: "", allow: new AllowList(o.allow ?? []), stats: null, manager: m, identityCheck: o.identityCheck ?? "tls", readOnly: false, dir: "/x" };
}
const plain: ClientIdentity = tcpClient("127.0.0.1");
const psk = (name: string): ClientIdentity => ({ ...tcpClient("10.0.0.9"), tls: { kind: "psk", name, protocol: "TLSv1.3", cipher: "TLS_AES_128_GCM_SHA256" } });

test("with TLS, CLIENT must be the connection's TLS identity unless the export allows any", () => {
  const strict = new CountingManager();
  const loose = new CountingManager();
  const reg = new ExportRegistry(new Generation([perClient("farm", strict), perClient("lab", loose, { identityCheck: "none" })]), log);
  assert.ok(reg.resolve("farm@vm1", psk("vm1")), "vm1 opens its own");
  assert.is(reg.resolve("farm@vm2", psk("vm1")), undefined, "vm1 cannot open vm2's");
  assert.ok(lines.some((l) => /farm@vm2" refused: CLIENT "vm2" is not this connection's TLS identity "vm1"/.test(l)), lines.join("\n"));
  assert.is(reg.resolve("farm@vm2", plain), undefined, "with TLS on, a plain connection cannot name a client");
  assert.ok(lines.some((l) => /farm@vm2" refused: naming a client needs a TLS connection/.test(l)));
  assert.ok(reg.resolve("lab@vm2", psk("vm1")), "client-name = any");
  assert.ok(reg.resolve("farm", psk("vm1")), "NAME alone: a throw-away overlay");
  assert.equal([...strict.open.keys()], ["vm1", null]);
});

test("hostile or malformed CLIENT parts never reach the manager", () => {
  const m = new CountingManager();
  const reg = new ExportRegistry(new Generation([perClient("farm", m, { identityCheck: "none" })]), log);
  for (const bad of ["farm@", "farm@..", "farm@.", "farm@a/b", "farm@a\\b", `farm@${"v".repeat(65)}`, "farm@é", "farm@x@y/z"]) {
    assert.is(reg.resolve(bad, plain), undefined, bad);
  }
  assert.ok(reg.resolve(`farm@${"v".repeat(64)}`, plain), "64 characters are fine");
  assert.ok(reg.resolve("farm@a.b_c-D9", plain));
  assert.is(reg.resolve("other@vm1", plain), undefined, "no such export");
  assert.is(m.open.size, 2);
});

test("per-export allow: refused at resolution with a log line, hidden from LIST; unix peers pass", () => {
  const rows = staticRows([{ name: "open", device: new MemoryDevice(4096) }, { name: "lab", device: new MemoryDevice(4096) }], { log });
  const lab = { ...rows[1]!, allow: new AllowList(["10.0.0.0/8", "fd00::/8"]) } as Row;
  const reg = new ExportRegistry(new Generation([rows[0]!, lab]), log);
  assert.is(reg.resolve("lab", plain), undefined);
  assert.ok(lines.some((l) => /127\.0\.0\.1: export "lab" refused: address not in its allow list/.test(l)));
  assert.equal(reg.list(plain).map((e) => e.name), ["open"]);
  for (const who of [tcpClient("10.1.2.3"), tcpClient("::ffff:10.1.2.3"), tcpClient("fd00::5"), UNIX_PEER]) {
    assert.ok(reg.resolve("lab", who), who.address ?? "unix");
    assert.equal(reg.list(who).map((e) => e.name), ["open", "lab"]);
  }
  assert.is(reg.resolve("lab", tcpClient("fe80::1")), undefined);
});

test("leases are given back once; a swapped-out stack closes with its last session", async () => {
  let closed = 0;
  const dev = new MemoryDevice(4096);
  (dev as { close?: () => void }).close = () => { closed++; };
  const stack = new SharedStack([{ name: "d", device: dev }], log);
  const reg = new ExportRegistry(new Generation(staticRows([{ name: "d", device: dev }], { log }).map((r) => ({ ...r, stack }) as Row)), log);
  const a = reg.resolve("d", plain)!;
  const b = reg.resolve("", plain)!; // "" is the default export
  assert.is(b.exp.name, "d");
  await reg.swap(new Generation(staticRows([{ name: "e", device: new MemoryDevice(4096) }], { log })));
  assert.is(closed, 0, "two sessions still hold it");
  assert.is(reg.resolve("d", plain), undefined, "gone for new connections");
  a.release();
  a.release();
  assert.is(closed, 0, "a second release of the same lease does nothing");
  b.release();
  await Bun.sleep(1);
  assert.is(closed, 1, "closed with the last holder");
});

test.run();
