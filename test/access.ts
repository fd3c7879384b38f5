// Access control: --allow (CIDR ranges, IPv4 and IPv6; unix sockets are not filtered), the
// connection caps (--max-connections, --max-connections-per-address: refused at accept, at once,
// with a log line), the handshake deadline (--handshake-timeout, also while TLS is pending), the
// warning for serving a non-loopback address without TLS, and the settings checks. Unit tests of
// the CIDR code first, then the real CLI on loopback.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { connect } from "../src/client/index.ts";
import { Admission, AllowList, cidrProblem, exposureWarning, isLoopback } from "../src/server/access.ts";
import { checkSettings, DEFAULT_SETTINGS, SettingsError } from "../src/server/settings.ts";
import type { ClientIdentity } from "../src/server/types.ts";
import { deadline, rejects } from "./helpers/assert.ts";
import { runOk, scratch } from "./helpers/env.ts";
import { serve, type Served, waitForOutput } from "./helpers/server.ts";
import { makePki } from "./helpers/tls.ts";
import { OPT, Wire, pattern } from "./robustness-wire.ts";

const dir = scratch("bun-nbd-access-");
const img = join(dir, "disk.img");
writeFileSync(img, pattern(1024 * 1024, 0, 9));

const inRange = (cidr: string, addr: string) => new AllowList([cidr]).allows({ transport: "tcp", address: addr });

test("CIDR ranges: IPv4, IPv6, single addresses, IPv4-mapped IPv6 clients", () => {
  assert.ok(inRange("192.0.2.0/24", "192.0.2.77"));
  assert.not.ok(inRange("192.0.2.0/24", "192.0.3.1"));
  assert.ok(inRange("10.0.0.0/8", "10.255.1.2"));
  assert.ok(inRange("0.0.0.0/0", "203.0.113.9"));
  assert.ok(inRange("192.0.2.128/25", "192.0.2.200"));
  assert.not.ok(inRange("192.0.2.128/25", "192.0.2.100"));
  assert.ok(inRange("127.0.0.1", "127.0.0.1"), "a lone address is a /32");
  assert.not.ok(inRange("127.0.0.1", "127.0.0.2"));
  assert.ok(inRange("2001:db8::/32", "2001:db8:1234::1"));
  assert.not.ok(inRange("2001:db8::/32", "2001:db9::1"));
  assert.ok(inRange("::1", "::1"));
  assert.ok(inRange("fe80::/10", "fe80::1%eth0"), "zone ids are ignored");
  assert.ok(inRange("192.0.2.0/24", "::ffff:192.0.2.5"), "a dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d");
  for (const bad of ["", "10.0.0.0/33", "256.1.1.1", "1.2.3", "10.0.0.0/", "2001:db8::/129", "1::2::3", "host.example", "10.0.0.0/8x"]) {
    assert.ok(cidrProblem(bad), bad);
    assert.throws(() => new AllowList([bad]), /allow: "/, bad);
  }
  assert.ok(isLoopback("127.0.0.1") && isLoopback("127.9.9.9") && isLoopback("::1") && isLoopback("localhost"));
  assert.not.ok(isLoopback("0.0.0.0") || isLoopback("::") || isLoopback("192.0.2.1"));
});

test("admission: allow-list, total cap and per-address cap, released on close", () => {
  const tcp = (address: string): ClientIdentity => ({ transport: "tcp", address, port: 1, tls: null });
  const unix: ClientIdentity = { transport: "unix", address: null, port: null, tls: null };
  const a = new Admission({ allow: new AllowList(["192.0.2.0/24"]), maxConnections: 4, maxConnectionsPerAddress: 2 });
  assert.match(a.admit(tcp("198.51.100.1"))!, /not in the allow-list/);
  assert.is(a.admit(unix), null, "unix-socket clients are not filtered by address");
  assert.is(a.admit(tcp("192.0.2.1")), null);
  assert.is(a.admit(tcp("192.0.2.1")), null);
  assert.match(a.admit(tcp("192.0.2.1"))!, /already 2 connections from 192\.0\.2\.1/);
  assert.is(a.admit(tcp("192.0.2.2")), null);
  assert.match(a.admit(tcp("192.0.2.3"))!, /already 4 connections \(max-connections\)/);
  a.release(tcp("192.0.2.1"));
  assert.is(a.admit(tcp("192.0.2.3")), null, "a slot freed by a close is usable again");
  a.release(tcp("192.0.2.3"));
  assert.is(a.admit(tcp("192.0.2.1")), null, "and the per-address count went down too");
});

test("settings: defaults (handshake timeout 10 s, as qemu-nbd's) and errors naming the key", () => {
  assert.is(DEFAULT_SETTINGS.handshakeTimeout, 10);
  assert.is(DEFAULT_SETTINGS.tls, "off");
  const key = (s: object) => {
    try {
      checkSettings(s);
    } catch (e) {
      assert.instance(e, SettingsError);
      return (e as SettingsError).key;
    }
    return "none";
  };
  assert.is(key({ allow: ["10.0.0.0/8", "nonsense"] }), "allow");
  assert.is(key({ maxConnections: -1 }), "max-connections");
  assert.is(key({ maxConnectionsPerAddress: 1.5 }), "max-connections-per-address");
  assert.is(key({ handshakeTimeout: -2 }), "handshake-timeout");
  assert.is(key({ tls: "maybe" as never }), "tls");
  assert.is(key({ allow: ["2001:db8::/32"], maxConnections: 5, handshakeTimeout: 0.5 }), "none");
});

test("the warning for a non-loopback address without TLS names the risk and the fix", () => {
  const w = exposureWarning("0.0.0.0", 10809, "off", false)!;
  assert.match(w, /serving 0\.0\.0\.0:10809 without TLS: anyone who can reach it can read and overwrite every export/);
  assert.match(w, /--tls=require/);
  assert.match(w, /--allow CIDR/);
  assert.match(exposureWarning("::", 10809, "on", true)!, /\[::\]:10809 with TLS optional/);
  assert.is(exposureWarning("192.0.2.10", 10809, "require", false), null, "no warning with TLS required");
  assert.is(exposureWarning("127.0.0.1", 10809, "off", false), null, "no warning on loopback");
  assert.is(exposureWarning("::1", 10809, "off", false), null);
});

/** A raw client that has read the greeting (so it counts as connected). */
async function greeted(s: Served): Promise<Wire> {
  const w = await Wire.open({ port: s.port });
  await w.greeting();
  return w;
}


test("--allow: clients outside the ranges are closed at accept (IPv4 and IPv6); unix sockets are not filtered", () => deadline(30_000, "allow", async () => {
  const s = await serve(["-b", "127.0.0.1", "-b", "::1", "--allow", "127.0.0.0/8", img]);
  try {
    assert.is((await connect(`nbd://127.0.0.1:${s.port}/disk`).then((c) => c.close())), undefined, "127.0.0.1 is allowed");
    await rejects(() => connect(`nbd://[::1]:${s.port}/disk`, { connectTimeoutMs: 5000 }), "::1 is not in 127.0.0.0/8");
    await waitForOutput(s, /refused a connection from ::1: ::1 is not in the allow-list/);
  } finally {
    await s.stop();
  }
  const sock = join(dir, "allow.sock");
  const u = await serve(["-b", "::1", "-p", "0", "--allow", "::1", "--allow", "192.0.2.0/24", img], { socket: sock });
  try {
    (await connect(`nbd://[::1]:${u.port}/disk`)).close();
    (await connect(`nbd+unix:///disk?socket=${sock}`)).close();
  } finally {
    await u.stop();
  }
  const none = await serve(["--allow", "192.0.2.0/24", img]);
  try {
    const w = await Wire.open({ port: none.port });
    assert.ok(await w.closedWithin(3000), "closed at once");
    assert.is(w.pending, 0, "not even a greeting");
    await waitForOutput(none, /refused a connection from 127\.0\.0\.1: 127\.0\.0\.1 is not in the allow-list/);
  } finally {
    await none.stop();
  }
}));

test("--max-connections and --max-connections-per-address: refused at once, and a freed slot is reused", () => deadline(30_000, "limits", async () => {
  const s = await serve(["--max-connections", "2", img]);
  try {
    const a = await greeted(s);
    const b = await greeted(s);
    const c = await Wire.open({ port: s.port });
    assert.ok(await c.closedWithin(3000), "the third connection is closed, not left hanging");
    await waitForOutput(s, /refused a connection from 127\.0\.0\.1: already 2 connections \(max-connections\)/);
    a.destroy();
    await Bun.sleep(100);
    const d = await greeted(s);
    d.destroy();
    b.destroy();
  } finally {
    await s.stop();
  }
  const p = await serve(["--max-connections-per-address", "1", img]);
  try {
    const a = await greeted(p);
    const b = await Wire.open({ port: p.port });
    assert.ok(await b.closedWithin(3000), "a second connection from the same address is closed");
    await waitForOutput(p, /already 1 connections from 127\.0\.0\.1 \(max-connections-per-address\)/);
    a.destroy();
  } finally {
    await p.stop();
  }
}));

test("--handshake-timeout: an idle client is dropped, also while TLS is pending; a client in transmission is not", () => deadline(30_000, "deadline", async () => {
  const pki = await makePki(join(dir, "pki"));
  const s = await serve(["--handshake-timeout", "1", "--tls=on", "--tls-certificates", pki.server, img]);
  try {
    const idle = await greeted(s);
    const t0 = Date.now();
    assert.ok(await idle.closedWithin(5000), "an idle client is closed");
    assert.ok(Date.now() - t0 >= 700, "not before the deadline");
    await waitForOutput(s, /protocol error HANDSHAKE_TIMEOUT: no export chosen within the 1 s handshake timeout; closing the connection/);
    const stalled = await greeted(s);
    stalled.write(Buffer.from([0, 0, 0, 3]));
    stalled.sendOption(OPT.STARTTLS);
    assert.is((await stalled.optionReply()).type, 1, "STARTTLS acknowledged");
    assert.ok(await stalled.closedWithin(5000), "no ClientHello: closed by the deadline too");
    const busy = await connect(`nbd://127.0.0.1:${s.port}/disk`);
    await Bun.sleep(1500);
    assert.is((await busy.read(0, 512)).length, 512, "a client that chose an export is past the deadline");
    await busy.close();
  } finally {
    await s.stop();
  }
  // The default deadline is 10 s: still connected after 1.5 s.
  const d = await serve([img]);
  try {
    const w = await greeted(d);
    assert.not.ok(await w.closedWithin(1500), "the default deadline is longer");
    w.destroy();
  } finally {
    await d.stop();
  }
}));

test("the CLI rejects bad access flags with a usage error", () => deadline(30_000, "cli", async () => {
  for (const [args, re] of [[["--allow", "10.0.0.0/40"], /allow: "10\.0\.0\.0\/40": prefix length must be 0-32/],
    [["--max-connections", "many"], /invalid --max-connections "many"/], [["--handshake-timeout=soon"], /invalid --handshake-timeout "soon"/]] as const) {
    const r = await runOk(["sh", "-c", `"$0" "$1" serve -p 0 ${args.join(" ")} "$2"; echo "exit $?"`, process.execPath, join(import.meta.dir, "../src/cli.ts"), img]);
    assert.match(r.stderr, re);
    assert.match(r.stdout, /exit [12]/);
  }
}));

test.run();
