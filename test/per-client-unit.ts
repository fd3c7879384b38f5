// The per-client overlay manager in process: one base handle for every client, one device shared by
// a client's connections, a short linger after the last one leaves (a reconnect takes the same
// device back), a reopen while the previous device is still closing, QEMU-compatible locks held
// all along (qemu-img cannot open a client's overlay while the manager has it), and the base
// released only after the last table and the last client let go.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { bytesEqual } from "./helpers/assert.ts";
import { need, run, scratch } from "./helpers/env.ts";
import { ClientOverlays, clientOverlayPath } from "../src/devices/per-client.ts";
import { openBase } from "../src/devices/qcow2/index.ts";
import { isPromise, type Maybe } from "../src/devices/types.ts";

const test = suite("per-client manager");
const dir = scratch("bun-nbd-pcu-");
const basePath = join(dir, "base.img");
writeFileSync(basePath, new Uint8Array(4 << 20).fill(0x11));
const ov = join(dir, "ov");
mkdirSync(ov);
const wait = async (r: Maybe) => { if (isPromise(r)) await r; };
const read = async (dev: { pread(b: Uint8Array, o: number, f: number): Maybe }, off: number, len: number) => {
  const b = new Uint8Array(len);
  await wait(dev.pread(b, off, 0));
  return b;
};

test("one device per client, shared by its connections; linger, revive, reopen", async () => {
  const base = openBase(basePath);
  const m = new ClientOverlays(base, { name: "disk", dir: ov, log: () => {}, lingerMs: 100 });
  const a1 = m.acquire("vm1");
  const a2 = m.acquire("vm1");
  const b = m.acquire("vm2");
  assert.ok(a1.device === a2.device, "two connections of vm1 share one device");
  assert.ok(a1.device !== b.device);
  assert.is(base.references, 1 + 2, "the manager's reference and one per open overlay");
  await wait(a1.device.pwrite!(new Uint8Array(4096).fill(0xaa), 0, 0));
  bytesEqual(await read(a2.device, 0, 4096), new Uint8Array(4096).fill(0xaa), "vm1's second connection sees the write");
  bytesEqual(await read(b.device, 0, 4096), new Uint8Array(4096).fill(0x11), "vm2 does not");
  a1.release();
  a1.release(); // twice: ignored
  await wait(a2.release());
  const again = m.acquire("vm1");
  assert.ok(again.device === a1.device, "within the linger time the same device is taken back");
  await wait(again.release());
  await Bun.sleep(400);
  assert.equal(m.usage().map((u) => u.client), ["vm2"], "vm1's overlay closed after the linger");
  const later = m.acquire("vm1");
  assert.ok(later.device !== a1.device, "reopened");
  bytesEqual(await read(later.device, 0, 4096), new Uint8Array(4096).fill(0xaa), "and its data is there");
  await wait(later.release());
  await wait(b.release());
  await wait(m.retire());
  await Bun.sleep(400);
  assert.is(base.references, 0, "the base closes with the last table and the last client");
  assert.throws(() => m.acquire("vm3"), /closed/);
});

test("a client's overlay is locked against QEMU while the manager has it", async () => {
  need("qemu-img");
  const base = openBase(basePath);
  const m = new ClientOverlays(base, { name: "disk", dir: ov, log: () => {}, lingerMs: 0 });
  const h = m.acquire("locked");
  const path = clientOverlayPath(ov, "disk", "locked");
  const r = await run(["qemu-img", "info", path]);
  assert.is.not(r.code, 0, "qemu-img info without -U is refused");
  assert.match(r.stderr, /lock/i);
  assert.is((await run(["qemu-img", "info", "-U", path])).code, 0, "a shared look (-U) is fine");
  await wait(h.release());
  await Bun.sleep(200);
  assert.is((await run(["qemu-img", "check", path])).code, 0, "released: QEMU may open it, and it is clean");
  // a throw-away overlay leaves no file behind and takes no client slot
  const t = m.acquire(null);
  await wait(t.device.pwrite!(new Uint8Array(512).fill(1), 0, 0));
  assert.equal(m.usage(), []);
  await wait(t.release());
  await m.close();
  assert.is(base.references, 0);
});

test.run();
