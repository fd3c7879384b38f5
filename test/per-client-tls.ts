// Per-client overlays bound to TLS identities, end to end: with --tls=require and pre-shared keys,
// a client reaches NAME@CLIENT only when CLIENT is its PSK username (alice gets base@alice, bob
// base@bob, neither the other's: ERR_UNKNOWN and a log line), and each keeps its own writes.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { existsSync, mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { deadline } from "./helpers/assert.ts";
import { need, run, runOk, scratch } from "./helpers/env.ts";
import { serve, waitForOutput } from "./helpers/server.ts";

const test = suite("per-client overlays under TLS");
const dir = scratch("bun-nbd-pc-tls-");

test("CLIENT must be the PSK username: alice and bob each reach only their own overlay", () => deadline(90_000, "per-client tls", async () => {
  need("psktool", "nbdinfo", "nbdsh");
  const keys = join(dir, "keys.psk");
  for (const user of ["alice", "bob"]) await runOk(["psktool", "-u", user, "-p", keys], { timeoutMs: 30_000 });
  const base = join(dir, "base.img");
  writeFileSync(base, new Uint8Array(4 << 20).fill(0x11));
  const ov = join(dir, "ov");
  mkdirSync(ov);
  const s = await serve(["--tls", "require", "--tls-psk", keys, "--per-client-overlay", ov, base]);
  const uri = (user: string, client: string) => `nbds://${user}@127.0.0.1:${s.port}/base%40${client}?tls-psk-file=${keys}`;
  // nbdsh -u refuses ?tls-psk-file= (local file access): allow it, then connect
  const py = (u: string, code: string) => run(["nbdsh", "-c", `h.set_uri_allow_local_file(True)\nh.connect_uri(${JSON.stringify(u)})\n${code}`],
    { timeoutMs: 30_000, env: { PATH: `/usr/bin:${process.env.PATH}` } });
  try {
    for (const user of ["alice", "bob"]) {
      const w = await py(uri(user, user), `h.pwrite(b"${user}".ljust(512, b"."), 0)\nh.flush()`);
      assert.is(w.code, 0, `${user} writes to base@${user}: ${w.stderr}`);
    }
    for (const user of ["alice", "bob"]) {
      const r = await py(uri(user, user), `assert h.pread(512, 0) == b"${user}".ljust(512, b"."), h.pread(16, 0)`);
      assert.is(r.code, 0, `${user} reads its own write back: ${r.stderr}`);
    }
    const stolen = await run(["nbdinfo", "--size", uri("alice", "bob")], { timeoutMs: 30_000 });
    assert.is.not(stolen.code, 0, "alice cannot open bob's overlay");
    await waitForOutput(s, /CLIENT "bob" is not this connection's TLS identity "alice"/);
  } finally {
    await s.stop();
  }
  assert.ok(existsSync(join(ov, "base@alice.qcow2")) && existsSync(join(ov, "base@bob.qcow2")), "one overlay per client");
}));

test.run();
