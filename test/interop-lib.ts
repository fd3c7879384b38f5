// Shared pieces of the interop, differential and size tests (no tests here): libnbd's python
// module as an independent client, sparse image builders, and starting nbdkit for comparisons.
import { existsSync, openSync, writeSync, closeSync, ftruncateSync } from "node:fs";
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { join } from "node:path";
import type { Subprocess } from "bun";
import { runOk, SYSTEM_PATH } from "./helpers/env.ts";

export const PY = "/usr/bin/python3";

/**
 * Run python with libnbd: `h` is a connected handle (strict mode off, so range and flag errors
 * reach the server), `uri` the URI, `out` a dict printed as JSON at the end. `err(fn)` returns the
 * errno name an nbd.Error carried, or "ok".
 */
export async function nbdpy(uri: string, code: string, opts: { connect?: boolean; timeoutMs?: number; stdin?: Uint8Array; env?: Record<string, string> } = {}): Promise<any> {
  const prelude = [
    "import nbd, json, sys, os",
    `uri = ${JSON.stringify(uri)}`,
    "out = {}",
    "def err(fn):",
    "    try:",
    "        fn()",
    "        return 'ok'",
    "    except nbd.Error as e:",
    "        return e.errno or ('errnum %d: %s' % (e.errnum, e.string))",
    "h = nbd.NBD()",
    "h.set_strict_mode(0)",
    "h.add_meta_context('base:allocation')",
  ];
  if (opts.connect !== false) prelude.push("h.connect_uri(uri)");
  const epilogue = ["", "sys.stdout.write('\\n@@JSON@@' + json.dumps(out))"];
  const r = await runOk([PY, "-c", [...prelude, code, ...epilogue].join("\n")], { timeoutMs: opts.timeoutMs ?? 60_000, stdin: opts.stdin, env: opts.env });
  const i = r.stdout.lastIndexOf("@@JSON@@");
  if (i < 0) throw new Error(`no JSON from python:\n${r.stdout}\n${r.stderr}`);
  return JSON.parse(r.stdout.slice(i + 8));
}

/** A sparse file of `size` bytes with `data` written at each offset. */
export function sparseFile(path: string, size: number, data: [number, Uint8Array][] = []): string {
  const fd = openSync(path, "w");
  try {
    // Bun's ftruncate refuses lengths of 2^52 and more: let coreutils do those.
    if (size < 2 ** 52) ftruncateSync(fd, size);
    else if (Bun.spawnSync(["truncate", "-s", String(size), path]).exitCode !== 0) throw new Error(`truncate -s ${size} ${path} failed`);
    for (const [off, b] of data) writeSync(fd, b, 0, b.length, off);
  } finally {
    closeSync(fd);
  }
  return path;
}

export interface Nbdkit {
  proc: Subprocess;
  uri: string;
  stop(): Promise<void>;
}

/** nbdkit's file plugin on a unix socket, in the foreground. */
export async function nbdkitFile(file: string, sock: string, extra: string[] = []): Promise<Nbdkit> {
  const proc = Bun.spawn(["nbdkit", "-f", "-U", sock, ...extra, "file", `file=${file}`], {
    stdout: "ignore", stderr: "pipe", stdin: "ignore", env: { ...process.env, PATH: SYSTEM_PATH },
  });
  const limit = Date.now() + 10_000;
  while (!existsSync(sock)) {
    if (proc.exitCode !== null) throw new Error(`nbdkit exited ${proc.exitCode}: ${await new Response(proc.stderr).text()}`);
    if (Date.now() > limit) { proc.kill("SIGKILL"); throw new Error("nbdkit did not create its socket"); }
    await Bun.sleep(20);
  }
  return {
    proc, uri: `nbd+unix:///?socket=${sock}`,
    stop: async () => {
      if (proc.exitCode === null) proc.kill("SIGTERM");
      const t = setTimeout(() => proc.kill("SIGKILL"), 5000);
      await proc.exited;
      clearTimeout(t);
    },
  };
}

/** `nbdinfo ARGS...` and parse stdout as JSON. */
export async function nbdinfoJson(...args: string[]): Promise<any> {
  const r = await runOk(["nbdinfo", "--json", ...args], { timeoutMs: 30_000 });
  return JSON.parse(r.stdout);
}

export const KiB = 1024;
export const MiB = 1024 * 1024;
export const GiB = 1024 * MiB;
export { join };

/**
 * Per-client overlays over one base: client vm1 of export `name` on server `s` writes 4 KiB at 8 KiB
 * and reads its write back, while vm2 still reads `base`'s bytes there.
 */
export async function checkPerClient(s: { uri(name?: string): string }, name: string, base: string): Promise<void> {
  await nbdpy(s.uri(`${name}@vm1`), `h.pwrite(b"vm1!" * 1024, 8192)\nh.flush()`);
  const o = await nbdpy(s.uri(`${name}@vm1`), `out["w"] = h.pread(4, 8192).decode()`);
  assert.is(o.w, "vm1!");
  const other = await nbdpy(s.uri(`${name}@vm2`), `out["w"] = h.pread(4, 8192) == open(${JSON.stringify(base)}, "rb").read(8196)[8192:]`);
  assert.ok(other.w, "another client sees the base, not vm1's write");
}

/**
 * A uvu suite whose setup errors fail every test. uvu 0.5.6 swallows errors thrown by before/after
 * hooks: the suite prints "(0 / N)" and the process still exits 0. Here a failed setup is
 * remembered and rethrown by each test; teardown that asserts anything belongs in a last test.
 */
export function guardedSuite(name: string, setup: () => unknown) {
  const s = suite(name);
  let failure: unknown = null;
  s.before(async () => {
    try {
      await setup();
    } catch (e) {
      failure = e;
    }
  });
  const test = (title: string, fn: () => unknown) => s(title, async () => {
    if (failure) throw new Error(`${name} setup failed: ${(failure as Error)?.stack ?? failure}`);
    await fn();
  });
  return { test, after: s.after, run: () => s.run() };
}
