// The config file contract (src/config): every problem is one "FILE:LINE: KEY: MESSAGE" line at
// the right line (unknown keys, wrong types, duplicate names, missing files, syntax errors), the
// keys map onto the CLI's settings, paths are taken from the file's directory, --print-config's
// output parses back to the same configuration, and the address syntax is strict.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { parseConfig } from "../src/config/parse.ts";
import { formatConfig } from "../src/config/print.ts";
import { formatConfigError, type PathKind } from "../src/config/types.ts";
import { parseListen } from "../src/config/values.ts";
import { AllowList, cidrProblem } from "../src/server/access.ts";
import { keyLines } from "../src/config/toml-lines.ts";

const test = suite("config");

const FILES: Record<string, PathKind> = { "/srv/disk.img": "file", "/srv/other.img": "file", "/var/lib/bun-nbd": "directory", "/srv": "directory", "/run": "directory" };
const probe = (p: string): PathKind => FILES[p] ?? "missing";
const parse = (text: string) => parseConfig(text, { file: "/etc/bun-nbd.toml", probe, checkCidr: cidrProblem });
const errors = (text: string) => {
  const r = parse(text);
  assert.ok(!r.ok, "expected errors");
  return r.ok ? [] : r.errors.map(formatConfigError);
};

const GOOD = `# a boot farm
[server]
listen = ["127.0.0.1:10809", "[::1]:10809", "unix:/run/bun-nbd.sock"]
read-only = false
log-format = "json"
metrics = "127.0.0.1:9100"
handshake-timeout = 5

[[export]]
name = "disk"
file = "/srv/disk.img"
overlay = "per-client"
overlay-dir = "/var/lib/bun-nbd"
description = "Debian 12 golden image"
allow = ["10.0.0.0/8", "::1"]

[[export]]
name = "plain"
file = "other.img"
read-only = true
`;

test("a good file: settings and exports, relative paths from the file's directory", () => {
  const r = parseConfig(GOOD, { file: "/srv/bun-nbd.toml", probe });
  if (!r.ok) throw new Error(r.errors.map(formatConfigError).join("\n"));
  const c = r.config;
  assert.equal(c.server.listen, [
    { kind: "tcp", host: "127.0.0.1", port: 10809 }, { kind: "tcp", host: "::1", port: 10809 }, { kind: "unix", path: "/run/bun-nbd.sock" },
  ]);
  assert.is(c.server.logFormat, "json");
  assert.equal(c.server.metrics, { host: "127.0.0.1", port: 9100 });
  assert.is(c.server.handshakeTimeout, 5);
  assert.is(c.server.tls, "off");
  assert.is(c.exports.length, 2);
  assert.equal(c.exports[0]!.overlay, { kind: "per-client", dir: "/var/lib/bun-nbd" });
  assert.equal(c.exports[0]!.allow, ["10.0.0.0/8", "::1"]);
  assert.is(c.exports[0]!.clientName, "tls-identity");
  assert.is(c.exports[1]!.file, "/srv/other.img");
  assert.is(c.exports[1]!.readOnly, true);
  assert.is(c.exports[1]!.source, "/srv/bun-nbd.toml:17");
  assert.ok(Object.isFrozen(c) && Object.isFrozen(c.exports[0]!.allow), "deeply frozen");
});

test("--print-config output is a config file that parses back to the same thing", () => {
  const r = parseConfig(GOOD, { file: "/srv/bun-nbd.toml", probe });
  assert.ok(r.ok);
  if (!r.ok) return;
  const text = formatConfig(r.config);
  const again = parseConfig(text, { file: "/srv/bun-nbd.toml", probe });
  if (!again.ok) throw new Error(`${text}\n${again.errors.map(formatConfigError).join("\n")}`);
  assert.equal({ ...again.config.server }, { ...r.config.server });
  assert.equal(again.config.exports.map((e) => ({ ...e, source: "" })), r.config.exports.map((e) => ({ ...e, source: "" })));
});

test("unknown keys and tables: named, with their line, and a spelling hint", () => {
  assert.equal(errors(`[server]\nliste = ["127.0.0.1:1"]\n[[export]]\nname = "d"\nfile = "/srv/disk.img"\nreadonly = true\n[logging]\nlevel = 1\n`), [
    `/etc/bun-nbd.toml:2: server.liste: unknown key "liste" in [server] (did you mean "listen"?)`,
    `/etc/bun-nbd.toml:6: export[1].readonly: unknown key "readonly" in [[export]] (did you mean "read-only"?)`,
    `/etc/bun-nbd.toml:7: logging: unknown table "logging"`,
  ]);
});

test("wrong types and values, each at its key's line", () => {
  const text = `[server]
read-only = "yes"
max-connections = -1
listen = ["127.0.0.1"]
log-format = "xml"

[[export]]
name = 42
file = "/srv/disk.img"

[[export]]
name = "x"
file = "/srv/disk.img"
allow = ["10.0.0.0/33"]
overlay = "snapshot"
read-only = true
`;
  assert.equal(errors(text), [
    `/etc/bun-nbd.toml:2: server.read-only: must be true or false, not the string "yes"`,
    `/etc/bun-nbd.toml:3: server.max-connections: must be a whole number >= 0 (0: no limit), not the number -1`,
    `/etc/bun-nbd.toml:4: server.listen: "127.0.0.1" is not HOST:PORT, [IPV6]:PORT or unix:PATH`,
    `/etc/bun-nbd.toml:5: server.log-format: must be one of "text", "json", not "xml"`,
    `/etc/bun-nbd.toml:8: export[1].name: must be a string, not the number 42`,
    `/etc/bun-nbd.toml:14: export[2].allow: "10.0.0.0/33": prefix length must be 0-32`,
    `/etc/bun-nbd.toml:16: export[2].read-only: read-only = true with overlay = "snapshot" leaves nothing to write to the overlay (the base is never written anyway)`,
  ]);
});

test("duplicate names, missing keys and files, overlay rules", () => {
  const text = `[[export]]
name = "disk"
file = "/srv/disk.img"

[[export]]
name = "disk"
file = "/srv/missing.img"

[[export]]
file = "/srv/disk.img"

[[export]]
name = "pc"
file = "/srv/disk.img"
overlay = "per-client"

[[export]]
name = "pc2"
file = "/srv/disk.img"
overlay = "per-client"
overlay-dir = "/nope"
`;
  assert.equal(errors(text), [
    `/etc/bun-nbd.toml:6: export[2].name: duplicate export name "disk" (first defined at line 2)`,
    `/etc/bun-nbd.toml:7: export[2].file: no such file: /srv/missing.img`,
    `/etc/bun-nbd.toml:9: export[3]: missing key "name"`,
    `/etc/bun-nbd.toml:15: export[4].overlay: overlay = "per-client" needs overlay-dir (where DIR/NAME@CLIENT.qcow2 live)`,
    `/etc/bun-nbd.toml:21: export[5].overlay-dir: directory /nope does not exist`,
  ]);
  assert.equal(errors(`[[export]]\nname = "a@b"\nfile = "/srv/disk.img"\noverlay = "per-client"\noverlay-dir = "/srv"\n`), [
    `/etc/bun-nbd.toml:2: export[1].name: a per-client export's name cannot contain "@" (clients connect to NAME@CLIENT)`,
  ]);
  assert.equal(errors(`[server]\nread-only = true\n`), [`/etc/bun-nbd.toml:1: no [[export]] table: nothing to serve`]);
  assert.equal(errors(`[export]\nname = "a"\nfile = "/srv/disk.img"\n`), [`/etc/bun-nbd.toml:1: export: must be an array of tables: write [[export]], not [export]`]);
});

test("syntax errors: the line where the document stops parsing", () => {
  assert.equal(errors(`[server]\nlisten = [\n  "127.0.0.1:1",\n]\nquiet = true\nverbose = = false\n`).map((e) => e.split(": syntax")[0]), ["/etc/bun-nbd.toml:6"]);
  assert.equal(errors(`[[export]]\nname = "a"\nname = "b"\n`).map((e) => e.split(": syntax")[0]), ["/etc/bun-nbd.toml:3"]);
  assert.match(errors(`[[export]]\nname = "a\n`)[0]!, /^\/etc\/bun-nbd\.toml:2: syntax error: /);
});

test("key lines: multi-line values, quoted and dotted keys, array tables", () => {
  const lines = keyLines(`a = """x\ny = 1\n"""\n[[export]]\n"name" = "q"\ndesc = [\n  1,\n  2]\n[[export]]\nsub.key = 'v'\n`);
  assert.equal([...lines], [["a", 1], ["export.0", 4], ["export.0.name", 5], ["export.0.desc", 6], ["export.1", 9], ["export.1.sub.key", 10]]);
});

test("listen addresses, CIDR rules and IPv6 parsing are strict", () => {
  assert.equal(parseListen("unix:sock", "/run"), { ok: true, value: { kind: "unix", path: "/run/sock" } });
  assert.equal(parseListen("[::1]:0", "/"), { ok: true, value: { kind: "tcp", host: "::1", port: 0 } });
  assert.equal(parseListen("localhost:10809", "/"), { ok: true, value: { kind: "tcp", host: "localhost", port: 10809 } });
  for (const bad of ["127.0.0.1:65536", "::1:10809", "[::1]", "1.2.3.999:1", "unix:", "[]:1"]) assert.not.ok(parseListen(bad, "/").ok, bad);
  assert.equal(errors(`[server]\nlisten = ["[1::2::3]:1"]\n[[export]]\nname = "d"\nfile = "/srv/disk.img"\n`), [
    `/etc/bun-nbd.toml:2: server.listen: "[1::2::3]:1": 1::2::3 is not an IPv6 address`,
  ]);
  for (const good of ["192.168.0.0/16", "fe80::/10", "::1", "10.1.2.3", "::ffff:1.2.3.4/128"]) assert.is(cidrProblem(good), null, good);
  for (const bad of ["10.0.0.0/8/1", "10.0.0/8", "::1/200", "host/8", "10.0.0.0/-1", "1::2::3", "12345::"]) assert.ok(cidrProblem(bad), bad);
  const lab = new AllowList(["10.0.0.0/8", "2001:db8::/32"]);
  for (const yes of ["10.255.0.1", "::ffff:10.0.0.1", "2001:db8::5"]) assert.ok(lab.allows({ transport: "tcp", address: yes }), yes);
  assert.ok(lab.allows({ transport: "unix", address: null }), "unix peers");
  for (const no of ["11.0.0.1", "2001:db9::1", "::1", "not-an-address"]) assert.not.ok(lab.allows({ transport: "tcp", address: no }), no);
});

test.run();
