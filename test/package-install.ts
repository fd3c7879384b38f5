// The npm package works where only Node and npm are: `npm pack`, then `npm install -g` of the
// tarball into a temporary prefix with PATH holding nothing but the system's node and npm; the
// installed `bun-nbd` prints its version, serves an image that nbdinfo reads, stops on SIGTERM, and
// serves sockets systemd passes through the launcher. The tarball ships no tests or benchmarks, and
// the example systemd units verify against the installed command.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { need, ROOT, run, runOk, scratch, SYSTEM_PATH } from "./helpers/env.ts";

const test = suite("package install");
const dir = scratch("bun-nbd-package-");
/** Node and npm only: no bun on this PATH. */
const NODE_ONLY = "/usr/bin:/bin";
let bin = "";

test.before(() => need("npm", "node", "nbdinfo", "systemd-socket-activate"));

test("npm pack: bin, src, examples; no tests, fixtures or benchmarks", async () => {
  await runOk(["npm", "pack", "--pack-destination", dir], { cwd: ROOT, env: { PATH: NODE_ONLY }, timeoutMs: 120_000 });
  const tgz = readdirSync(dir).find((f) => /^bun-nbd-.*\.tgz$/.test(f));
  assert.ok(tgz, "a tarball");
  const files = (await runOk(["tar", "tzf", join(dir, tgz!)])).stdout.trim().split("\n");
  for (const f of ["package/package.json", "package/bin/bun-nbd.js", "package/src/cli.ts", "package/src/server/server.ts",
    "package/examples/bun-nbd.toml", "package/examples/systemd/bun-nbd.socket", "package/examples/systemd/bun-nbd.service"]) {
    assert.ok(files.includes(f), `${f} is shipped`);
  }
  const unwanted = files.filter((f) => /^package\/(test|bench|\.ci|node_modules)\/|fixtures|\.img$|\.bin$/.test(f));
  assert.equal(unwanted, [], "nothing but what runs");
});

test("npm install -g into a temporary prefix: --version, serve, SIGTERM", async () => {
  const tgz = join(dir, readdirSync(dir).find((f) => f.endsWith(".tgz"))!);
  const prefix = join(dir, "prefix");
  await runOk(["npm", "install", "-g", "--prefix", prefix, "--no-audit", "--no-fund", tgz], { env: { PATH: NODE_ONLY }, timeoutMs: 600_000 });
  bin = join(prefix, "bin", "bun-nbd");
  assert.ok(existsSync(bin), "the bun-nbd command is installed");
  assert.is.not(Bun.spawnSync(["/bin/sh", "-c", "command -v bun"], { env: { PATH: NODE_ONLY } }).exitCode, 0, "no bun on the Node-only PATH");
  const v = await runOk([bin, "--version"], { env: { PATH: NODE_ONLY } });
  const pkg = await Bun.file(join(ROOT, "package.json")).json();
  assert.is(v.stdout.trim(), pkg.version);

  const disk = join(dir, "disk.img");
  copyFileSync(join(ROOT, "examples/boot.img"), disk);
  const proc = Bun.spawn([bin, "serve", "-p", "0", "disk.img"], { cwd: dir, stdout: "pipe", stderr: "pipe", env: { ...process.env, PATH: NODE_ONLY } });
  let out = "";
  const pump = async (s: ReadableStream<Uint8Array>) => { for await (const c of s) out += new TextDecoder().decode(c); };
  void pump(proc.stdout);
  void pump(proc.stderr);
  try {
    const limit = Date.now() + 30_000;
    let m: RegExpExecArray | null = null;
    while (!(m = /(nbd:\/\/127\.0\.0\.1:\d+\/disk)[\s\S]*Ready/.exec(out))) {
      if (proc.exitCode !== null || Date.now() > limit) throw new Error(`installed bun-nbd did not start:\n${out}`);
      await Bun.sleep(50);
    }
    const size = await run(["nbdinfo", "--size", m[1]!], { env: { PATH: SYSTEM_PATH } });
    assert.is(size.stdout.trim(), String(4 << 20), size.stderr);
  } finally {
    proc.kill("SIGTERM");
  }
  assert.is(await proc.exited, 0, `exit status after SIGTERM (the launcher forwards it)\n${out}`);
});

test("socket activation through the launcher (LISTEN_PID is the launcher's)", async () => {
  assert.ok(bin, "installed by the previous test");
  const l = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
  const port = l.port;
  l.stop(true);
  const proc = Bun.spawn(["systemd-socket-activate", "-l", `127.0.0.1:${port}`, bin, "serve", join(dir, "disk.img")],
    { stdout: "pipe", stderr: "pipe", env: { ...process.env, PATH: `${NODE_ONLY}:${SYSTEM_PATH}` } });
  let out = "";
  const pump = async (s: ReadableStream<Uint8Array>) => { for await (const c of s) out += new TextDecoder().decode(c); };
  void pump(proc.stderr);
  void pump(proc.stdout);
  try {
    const limit = Date.now() + 10_000;
    while (!/Listening on/.test(out)) {
      if (proc.exitCode !== null || Date.now() > limit) throw new Error(out);
      await Bun.sleep(20);
    }
    const size = await run(["nbdinfo", "--size", `nbd://127.0.0.1:${port}/disk`], { timeoutMs: 30_000 });
    assert.is(size.stdout.trim(), String(4 << 20), `${size.stderr}\n${out}`);
  } finally {
    proc.kill("SIGTERM");
  }
  assert.is(await proc.exited, 0, out);
});

test("the example systemd units pass systemd-analyze verify with the installed command", async () => {
  need("systemd-analyze");
  assert.ok(bin, "installed by an earlier test");
  const units = join(dir, "units");
  mkdirSync(units, { recursive: true });
  for (const u of ["bun-nbd.socket", "bun-nbd.service"]) {
    const text = readFileSync(join(ROOT, "examples/systemd", u), "utf8").replaceAll("/usr/bin/bun-nbd", bin);
    writeFileSync(join(units, u), text);
  }
  const r = await run(["systemd-analyze", "verify", join(units, "bun-nbd.socket"), join(units, "bun-nbd.service")], { env: { PATH: SYSTEM_PATH } });
  assert.is(r.code, 0, r.stderr);
  assert.is((r.stdout + r.stderr).trim(), "", "no warnings");
});

test.run();
