// The serve command's contract: bad flags, a port in use, missing or unreadable files and
// duplicate names are a one-line error naming the problem with a non-zero exit, before anything
// listens; export names come from the file names (--name overrides); --help and --version work.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { chmodSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { BUN, CLI, need, run, scratch } from "./helpers/env.ts";
import { serve } from "./helpers/server.ts";

const S = suite("serve CLI");
const dir = scratch();
const a = join(dir, "alpha.img");
const b = join(dir, "beta.raw");
writeFileSync(a, new Uint8Array(1 << 20));
writeFileSync(b, new Uint8Array(3 << 20));
const cli = (...args: string[]) => run([BUN, CLI, "serve", ...args], { timeoutMs: 20_000 });

/** A failed start: non-zero exit, one error line on stderr naming `what`, nothing on stdout. */
function refused(r: { code: number; stdout: string; stderr: string }, what: RegExp): void {
  assert.is.not(r.code, 0, `exit status (stderr: ${r.stderr})`);
  // Bun colors console.error output when FORCE_COLOR is set (uvu sets it): compare the text.
  const text = r.stderr.replace(/\x1b\[[0-9;]*m/g, "");
  const lines = text.trim().split("\n").filter((l) => l.startsWith("bun-nbd serve:"));
  assert.is(lines.length, 1, `one error line, got: ${JSON.stringify(r.stderr)}`);
  assert.match(lines[0]!, what);
  assert.not.match(r.stdout, /Ready/);
}

S("missing file, unreadable file, directory: clear error, non-zero exit", async () => {
  refused(await cli("-p", "0", join(dir, "nope.img")), /cannot open .*nope\.img: no such file/);
  refused(await cli("-p", "0", dir), /is a directory/);
  const locked = join(dir, "locked.img");
  writeFileSync(locked, new Uint8Array(512));
  chmodSync(locked, 0);
  if (process.getuid?.() !== 0) refused(await cli("-p", "0", locked), /permission denied/);
  // (root reads anything: the permission case is only checked as a non-root user)
  refused(await cli("-p", "0", a, join(dir, "nope.img")), /nope\.img/); // checked before listening
});

S("bad flags, bad port, no file, --name with two files, duplicate names", async () => {
  refused(await cli("--bogus", a), /Unknown option '--bogus'/);
  refused(await cli("-p", "70000", a), /invalid port "70000"/);
  refused(await cli("-p", "0"), /no FILE given/);
  refused(await cli("-p", "0", "-n", "x", a, b), /--name needs exactly one FILE/);
  const other = join(scratch(), "alpha.img");
  writeFileSync(other, new Uint8Array(512));
  refused(await cli("-p", "0", a, other), /two exports are named "alpha"/);
});

S("a port in use: clear error naming the port", async () => {
  const first = await serve([a]);
  try {
    refused(await cli("-p", String(first.port), b), new RegExp(`port ${first.port} is already in use`));
  } finally {
    await first.stop();
  }
});

S("export names from file names, the first is the default; --name overrides", async () => {
  need("nbdinfo");
  const s = await serve([a, b]);
  try {
    assert.match(s.output(), /alpha .*nbd:\/\/127\.0\.0\.1:\d+\/alpha .*\(default export\)/);
    assert.match(s.output(), /beta .*nbd:\/\/127\.0\.0\.1:\d+\/beta/);
    const size = async (uri: string) => (await run(["nbdinfo", "--size", uri])).stdout.trim();
    assert.is(await size(s.uri("alpha")), String(1 << 20));
    assert.is(await size(s.uri("beta")), String(3 << 20));
    assert.is(await size(s.uri("")), String(1 << 20), "default export is the first file");
  } finally {
    assert.is(await s.stop(), 0);
  }
  const n = await serve(["-n", "disk", b]);
  try {
    assert.match(n.output(), /nbd:\/\/127\.0\.0\.1:\d+\/disk/);
  } finally {
    await n.stop();
  }
});

S("--help and --version", async () => {
  const h = await cli("--help");
  assert.is(h.code, 0);
  assert.match(h.stdout, /usage: bun-nbd serve/);
  assert.match(h.stdout, /--bind ADDR/);
  const v = await run([BUN, CLI, "--version"]);
  assert.is(v.code, 0);
  assert.match(v.stdout.trim(), /^\d+\.\d+\.\d+$/);
});

S.run();
