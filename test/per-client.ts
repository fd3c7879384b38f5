// Per-client overlays through the real server (serve --per-client-overlay DIR): 16 clients write
// different data over the same base at once and each reads back only its own; two connections of
// one client share its overlay; a client finds its disk again after reconnecting and after a server
// restart; NAME alone is a throw-away overlay; hostile CLIENT parts are refused with ERR_UNKNOWN and
// a log line; the base never changes (commit into it is refused while served; reset works per
// client); `overlay list` and the metrics show each client's overlay.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { existsSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { bytesEqual } from "./helpers/assert.ts";
import { BUN, CLI, need, run, runOk, scratch } from "./helpers/env.ts";
import { serve, type Served } from "./helpers/server.ts";
import { connect, NbdOptionError, type NbdClient } from "../src/client/index.ts";
import { sha256 } from "./overlay-support.ts";

const test = suite("per-client overlays");
const dir = scratch("bun-nbd-per-client-");
const ovdir = join(dir, "overlays");
const base = join(dir, "base.img");
const SIZE = 8 << 20;
const CLIENTS = 16;
const REGION = 1 << 20; // every client writes the same first MiB, each with its own bytes

/** The base's bytes: each 512-byte sector filled with (sector % 251) + 1. */
function baseBytes(offset: number, length: number): Uint8Array {
  const b = new Uint8Array(length);
  for (let i = 0; i < length; i++) b[i] = (Math.floor((offset + i) / 512) % 251) + 1;
  return b;
}
writeFileSync(base, baseBytes(0, SIZE));
const baseSha = sha256(base);
const name = (i: number) => `c${String(i).padStart(2, "0")}`;
/** What client i wrote at [0, REGION): its byte, and at 4 KiB 3*i+5 a marker of its own. */
function expected(i: number, offset: number, length: number): Uint8Array {
  const b = baseBytes(offset, length);
  for (let k = 0; k < length; k++) {
    const p = offset + k;
    if (p < REGION) b[k] = 0x40 + i;
    else if (p >= (3 * i + 300) * 4096 && p < (3 * i + 301) * 4096) b[k] = 0xc0 + i;
  }
  return b;
}

let srv: Served;
test.before(async () => {
  need("qemu-img");
  await runOk(["mkdir", "-p", ovdir]);
  srv = await serve(["--per-client-overlay", ovdir, base]);
});
test.after(async () => { if (srv.proc.exitCode === null) await srv.stop(); });

test("16 clients write different data to the same base at once; each reads back only its own", async () => {
  const clients = await Promise.all(Array.from({ length: CLIENTS }, (_, i) => connect(srv.uri(`base@${name(i)}`))));
  await Promise.all(clients.map(async (c, i) => {
    const writes: Promise<void>[] = [];
    for (let off = 0; off < REGION; off += 65536) writes.push(c.pwrite(new Uint8Array(65536).fill(0x40 + i), off));
    writes.push(c.pwrite(new Uint8Array(4096).fill(0xc0 + i), (3 * i + 300) * 4096));
    await Promise.all(writes);
    await c.flush();
  }));
  await Promise.all(clients.map(async (c, i) => {
    bytesEqual(await c.read(0, 2 * REGION), expected(i, 0, 2 * REGION), `client ${name(i)}, first 2 MiB`);
    bytesEqual(await c.read(SIZE - 65536, 65536), baseBytes(SIZE - 65536, 65536), `client ${name(i)}, the end`);
  }));
  await Promise.all(clients.map((c) => c.close()));
  assert.is(sha256(base), baseSha, "the base never changes");
  const files = readdirSync(ovdir).sort();
  assert.equal(files, Array.from({ length: CLIENTS }, (_, i) => `base@${name(i)}.qcow2`));
});

test("two connections of one client share its overlay; another client never sees it", async () => {
  const a = await connect(srv.uri("base@shared"));
  const b = await connect(srv.uri("base@shared"));
  const other = await connect(srv.uri("base@c00"));
  await a.pwrite(new Uint8Array(4096).fill(0x99), 7 << 20);
  bytesEqual(await b.read(7 << 20, 4096), new Uint8Array(4096).fill(0x99), "the second connection sees the first one's write");
  bytesEqual(await other.read(7 << 20, 4096), baseBytes(7 << 20, 4096), "another client does not");
  await Promise.all([a.close(), b.close(), other.close()]);
});

test("reconnect: a client finds its disk as it left it; NAME alone is a throw-away overlay", async () => {
  for (const i of [0, 7, 15]) {
    const c = await connect(srv.uri(`base@${name(i)}`));
    bytesEqual(await c.read(0, 2 * REGION), expected(i, 0, 2 * REGION), `client ${name(i)} after reconnecting`);
    await c.close();
  }
  const t = await connect(srv.uri("base"));
  await t.pwrite(new Uint8Array(65536).fill(0x77), 0);
  await t.flush();
  bytesEqual(await t.read(0, 65536), new Uint8Array(65536).fill(0x77), "the throw-away overlay takes writes");
  await t.close();
  const t2 = await connect(srv.uri("base"));
  bytesEqual(await t2.read(0, 65536), baseBytes(0, 65536), "a new connection starts from the base again");
  await t2.close();
  assert.ok(readdirSync(ovdir).every((f) => /^base@.*\.qcow2$/.test(f)), `nothing left behind: ${readdirSync(ovdir)}`);
});

test("hostile client names are refused with ERR_UNKNOWN and a log line; nothing is created", async () => {
  const before = readdirSync(ovdir).sort();
  for (const bad of ["base@..", "base@.", "base@a/b", "base@", `base@${"x".repeat(65)}`, "base@../../escape", "base@a b", "base@vm1\u0000"]) {
    let err: unknown = null;
    let c: NbdClient | null = null;
    try { c = await connect(srv.uri(bad)); } catch (e) { err = e; }
    if (c) await c.close();
    assert.ok(err instanceof NbdOptionError && err.code === "ERR_UNKNOWN", `${JSON.stringify(bad)}: ${err}`);
    const shown = JSON.stringify(bad).slice(1, 20);
    assert.ok(srv.output().split("\n").some((l) => l.includes("refused") && l.includes(`export "${bad.slice(0, 20)}`) || (l.includes("refused") && l.includes(shown))),
      `a log line for ${JSON.stringify(bad)}:\n${srv.output().slice(-2000)}`);
  }
  assert.equal(readdirSync(ovdir).sort(), before);
  assert.not.ok(existsSync(join(dir, "escape.qcow2")) || existsSync(join(dir, "base@..qcow2")));
});

test("commit is refused while the base is served; reset works per client once the server let go", async () => {
  const held = await connect(srv.uri("base@c02"));
  const commit = await run([BUN, CLI, "overlay", "commit", join(ovdir, "base@c02.qcow2")]);
  assert.is.not(commit.code, 0, "committing one client's changes into the shared base while it is served");
  assert.match(commit.stderr, /lock|in use|another process/i);
  await held.close();
  assert.is(sha256(base), baseSha);
});

test("server restart: every client's disk is still there; overlays are clean qcow2 files", async () => {
  assert.is(await srv.stop(), 0, srv.output());
  for (const f of readdirSync(ovdir)) {
    const r = await run(["qemu-img", "check", "--output=json", join(ovdir, f)]);
    assert.is(r.code, 0, `${f}: ${r.stdout}${r.stderr}`);
  }
  await runOk([BUN, CLI, "overlay", "reset", join(ovdir, "base@c15.qcow2")]);
  srv = await serve(["--per-client-overlay", ovdir, "--metrics", "127.0.0.1:0", base]);
  const reset = await connect(srv.uri("base@c15"));
  bytesEqual(await reset.read(0, 2 * REGION), baseBytes(0, 2 * REGION), "c15 after overlay reset: the base again");
  await reset.close();
  const cs = await Promise.all([2, 9, 14].map((i) => connect(srv.uri(`base@${name(i)}`))));
  await Promise.all(cs.map(async (c, k) => {
    const i = [2, 9, 14][k]!;
    bytesEqual(await c.read(0, 2 * REGION), expected(i, 0, 2 * REGION), `client ${name(i)} after a restart`);
  }));
  const url = /Metrics at (\S+)/.exec(srv.output())![1]!;
  const metrics = (await runOk(["curl", "-sS", url])).stdout;
  for (const i of [2, 9, 14]) assert.match(metrics, new RegExp(`^bun_nbd_overlay_allocated_bytes\\{export="base",client="${name(i)}"\\} [1-9]\\d*$`, "m"));
  await Promise.all(cs.map((c) => c.close()));
  assert.is(sha256(base), baseSha);
});

test("overlay list shows each client's overlay; in use while open in the server, idle otherwise", async () => {
  const held = await connect(srv.uri("base@c03"));
  try {
    const r = await runOk([BUN, CLI, "overlay", "list", "--json", ovdir]);
    const rows = JSON.parse(r.stdout) as { export: string; client: string; size: number; allocated: number; inUse: boolean; lastUse: string }[];
    assert.equal(rows.map((x) => x.client), [...Array.from({ length: CLIENTS }, (_, i) => name(i)), "shared"]);
    for (const x of rows) {
      assert.is(x.export, "base");
      assert.is(x.size, SIZE);
      assert.ok(x.allocated > 0);
      assert.ok(Date.now() - Date.parse(x.lastUse) < 600_000, "last use is recent");
    }
    assert.ok(rows.find((x) => x.client === "c03")!.inUse, "c03 is connected");
    assert.not.ok(rows.find((x) => x.client === "c11")!.inUse, "c11 is not (not opened since the restart)");
    const text = await runOk([BUN, CLI, "overlay", "list", ovdir]);
    assert.match(text.stdout, /^EXPORT +CLIENT +SIZE +ON DISK +LAST USE +STATE$/m);
    assert.match(text.stdout, /^base +c03 +8 MiB +.* in use$/m);
  } finally {
    await held.close();
  }
});

test.run();
