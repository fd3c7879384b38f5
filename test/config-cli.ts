// The config file from the command line: `bun-nbd config check` (exit 0 with a summary, or 1 with
// one FILE:LINE line per problem), `serve --config` refusing a bad file before listening,
// `--print-config` showing flags laid over the file (and parsing back), the examples/bun-nbd.toml
// shipped with the package being valid, and the combinations that make no sense refused.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { copyFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { BUN, CLI, ROOT, need, run, runOk, scratch } from "./helpers/env.ts";
import { serve } from "./helpers/server.ts";
import { parseConfig } from "../src/config/parse.ts";

const test = suite("config CLI");
const dir = scratch("bun-nbd-config-cli-");
const plain = (s: string) => s.replace(/\x1b\[[0-9;]*m/g, "");
const cli = (...args: string[]) => run([BUN, CLI, ...args], { timeoutMs: 20_000 });
writeFileSync(join(dir, "disk.img"), new Uint8Array(1 << 20));
const good = join(dir, "good.toml");
writeFileSync(good, `[server]\nlisten = ["127.0.0.1:10999"]\n\n[[export]]\nname = "disk"\nfile = "disk.img"\n`);
const bad = join(dir, "bad.toml");
writeFileSync(bad, `[server]\nlisten = "nowhere"\n\n[[export]]\nname = "disk"\nfile = "missing.img"\nsize = 3\n`);

test("config check: a summary and exit 0, or one line per problem and exit 1", async () => {
  const ok = await cli("config", "check", good);
  assert.is(ok.code, 0, ok.stderr);
  assert.is(ok.stdout.trim(), `${good}: ok (1 export: disk)`);
  const no = await cli("config", "check", bad);
  assert.is(no.code, 1);
  assert.equal(plain(no.stderr).trim().split("\n"), [
    `${bad}:2: server.listen: "nowhere" is not HOST:PORT, [IPV6]:PORT or unix:PATH`,
    `${bad}:6: export[1].file: no such file: ${join(dir, "missing.img")}`,
    `${bad}:7: export[1].size: unknown key "size" in [[export]]`,
    `${bad}: 3 problems`,
  ]);
  assert.is((await cli("config", "check")).code, 2);
  assert.is((await cli("config", "frobnicate", good)).code, 2);
  const missing = await cli("config", "check", join(dir, "nope.toml"));
  assert.is(missing.code, 1);
  assert.match(plain(missing.stderr), /cannot read config file .*nope\.toml: ENOENT/);
});

test("the shipped examples/bun-nbd.toml is valid", async () => {
  const copy = join(dir, "example.toml");
  copyFileSync(join(ROOT, "examples/bun-nbd.toml"), copy);
  copyFileSync(join(ROOT, "examples/boot.img"), join(dir, "boot.img"));
  const r = await cli("config", "check", copy);
  assert.is(r.code, 0, r.stderr);
  assert.match(r.stdout, /ok \(2 exports: boot, farm@CLIENT\)/);
});

test("serve --config with a bad file: every problem, exit 1, nothing listens", async () => {
  const r = await cli("serve", "--config", bad);
  assert.is(r.code, 1);
  const lines = plain(r.stderr).trim().split("\n");
  assert.is(lines.length, 3, r.stderr);
  for (const l of lines) assert.match(l, new RegExp(`^bun-nbd serve: ${bad.replace(/[.]/g, "\\.")}:\\d+: `));
  assert.not.match(r.stdout, /Ready/);
});

test("--print-config: the file with flags laid over it, as a config that parses back", async () => {
  const r = await cli("serve", "--config", good, "--print-config", "-p", "0", "-b", "::1", "-r", "--log-format", "json");
  assert.is(r.code, 0, r.stderr);
  assert.match(r.stdout, /^listen = \["\[::1\]:0"\]$/m);
  assert.match(r.stdout, /^read-only = true$/m);
  assert.match(r.stdout, /^log-format = "json"$/m);
  assert.match(r.stdout, new RegExp(`^file = "${join(dir, "disk.img")}"$`, "m"));
  const back = parseConfig(r.stdout, { file: "printed.toml" });
  assert.ok(back.ok, JSON.stringify(!back.ok && back.errors));
  const files = await cli("serve", "--print-config", "--per-client-overlay", dir, join(dir, "disk.img"));
  assert.is(files.code, 0, files.stderr);
  assert.match(files.stdout, /^overlay = "per-client"$/m);
  assert.match(files.stdout, new RegExp(`^overlay-dir = "${dir}"$`, "m"));
});

test("--config with FILE arguments or per-export flags is refused", async () => {
  const a = await cli("serve", "--config", good, join(dir, "disk.img"));
  assert.is(a.code, 2);
  assert.match(plain(a.stderr), /either as FILE arguments or in the config file/);
  const b = await cli("serve", "--config", good, "--snapshot");
  assert.is(b.code, 2);
  assert.match(plain(b.stderr), /--snapshot applies to FILE arguments/);
  const c = await cli("serve", "--snapshot", "--per-client-overlay", dir, join(dir, "disk.img"));
  assert.is(c.code, 2);
  assert.match(plain(c.stderr), /--snapshot and --per-client-overlay cannot be used together/);
});

test("[server] TLS and access keys are honoured: tls-psk with tls = require serves nbds:// only; a TLS mode without credentials is refused", async () => {
  need("psktool", "nbdinfo");
  const psk = join(dir, "keys.psk");
  await runOk(["psktool", "-u", "alice", "-p", psk], { timeoutMs: 30_000 });
  const f = join(dir, "sec.toml");
  writeFileSync(f, `[server]\ntls = "require"\ntls-psk = "keys.psk"\nallow = ["127.0.0.0/8", "::1"]\nmax-connections = 5\n\n[[export]]\nname = "disk"\nfile = "disk.img"\n`);
  const s = await serve(["--config", f]);
  try {
    assert.match(s.output(), new RegExp(`nbds://127\\.0\\.0\\.1:${s.port}/disk`));
    const info = await run(["nbdinfo", "--size", `nbds://alice@127.0.0.1:${s.port}/disk?tls-psk-file=${psk}`], { timeoutMs: 20_000 });
    assert.is(info.stdout.trim(), String(1 << 20), info.stderr);
    const plainClient = await run(["nbdinfo", "--size", `nbd://127.0.0.1:${s.port}/disk`], { timeoutMs: 20_000 });
    assert.is.not(plainClient.code, 0, "a plain client is refused under tls = require");
  } finally {
    await s.stop();
  }
  writeFileSync(f, `[server]\ntls = "require"\n\n[[export]]\nname = "disk"\nfile = "disk.img"\n`);
  const r = await cli("serve", "--config", f, "-p", "0");
  assert.is(r.code, 1);
  assert.match(plain(r.stderr), /tls=require needs credentials/);
  assert.not.match(r.stdout, /Ready/);
});

test.run();
