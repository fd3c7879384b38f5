// systemd socket activation with systemd's own tool: `systemd-socket-activate -l ADDR bun-nbd serve
// FILE` holds the socket, starts bun-nbd on the first connection with LISTEN_FDS/LISTEN_PID, and
// nbdinfo (whose connection triggered the start) and later clients are served, over TCP and over
// a unix socket. Plus the protocol's edges: another process's LISTEN_PID, the npm launcher's.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { BUN, CLI, need, run, scratch, SYSTEM_PATH } from "./helpers/env.ts";
import { activationSockets } from "../src/server/activation.ts";

const test = suite("socket activation");
const dir = scratch("bun-nbd-activate-");
const disk = join(dir, "disk.img");
const SIZE = 3 << 20;
writeFileSync(disk, new Uint8Array(SIZE).fill(0x5a));

test.before(() => need("systemd-socket-activate", "nbdinfo"));

function freePort(): number {
  const l = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
  const p = l.port;
  l.stop(true);
  return p;
}

async function activated(listenArg: string, uri: string) {
  const proc = Bun.spawn(["systemd-socket-activate", "-l", listenArg, BUN, CLI, "serve", disk],
    { stdout: "pipe", stderr: "pipe", env: { ...process.env, PATH: SYSTEM_PATH } });
  let out = "";
  const pump = async (s: ReadableStream<Uint8Array>) => { for await (const c of s) out += new TextDecoder().decode(c); };
  void pump(proc.stdout);
  void pump(proc.stderr);
  try {
    const limit = Date.now() + 10_000;
    while (!/Listening on/.test(out)) {
      if (proc.exitCode !== null || Date.now() > limit) throw new Error(`systemd-socket-activate did not listen:\n${out}`);
      await Bun.sleep(20);
    }
    assert.not.match(out, /bun-nbd .*serving/, "bun-nbd starts only on the first connection");
    // this first connection is what starts bun-nbd
    const first = await run(["nbdinfo", "--size", uri], { timeoutMs: 30_000 });
    assert.is(first.code, 0, `${first.stderr}\n${out}`);
    assert.is(first.stdout.trim(), String(SIZE));
    const again = await run(["nbdinfo", "--json", uri]);
    assert.is(again.code, 0, again.stderr);
    assert.is(JSON.parse(again.stdout).exports[0]["export-size"], SIZE);
    const read = await run(["nbdsh", "-u", uri, "-c", "import sys; sys.stdout.write(h.pread(4, 4096).hex())"]);
    assert.is(read.stdout, "5a5a5a5a", read.stderr);
    return out;
  } finally {
    proc.kill("SIGTERM");
    const code = await proc.exited;
    assert.is(code, 0, `bun-nbd exit status after SIGTERM\n${out}`);
  }
}

test("TCP: systemd-socket-activate -l 127.0.0.1:PORT", async () => {
  const port = freePort();
  const out = await activated(`127.0.0.1:${port}`, `nbd://127.0.0.1:${port}/disk`);
  assert.match(out, new RegExp(`disk .*nbd://127\\.0\\.0\\.1:${port}/disk`), "the banner names the inherited socket's address");
});

test("unix socket: systemd-socket-activate -l PATH", async () => {
  const sock = join(dir, "nbd.sock");
  const out = await activated(sock, `nbd+unix:///disk?socket=${sock}`);
  assert.match(out, new RegExp(`nbd\\+unix:///disk\\?socket=${sock.replace(/[.]/g, "\\.")}`));
});

test("LISTEN_PID of another process is not ours; the npm launcher's is; bad values are errors", () => {
  assert.is(activationSockets({ LISTEN_FDS: "1", LISTEN_PID: "1" }, 4242, 4000), null);
  assert.is(activationSockets({ LISTEN_FDS: "1" }, 4242, 4000), null);
  const env: Record<string, string | undefined> = { LISTEN_FDS: "x", LISTEN_PID: "4000", BUN_NBD_LAUNCHER_PID: "4000" };
  assert.throws(() => activationSockets(env, 4242, 4000), /LISTEN_FDS="x"/);
  assert.is(env.LISTEN_FDS, undefined, "the variables are taken out of the environment");
  // fd 3 is not a listening socket in the test runner (or not open at all)
  assert.throws(() => activationSockets({ LISTEN_FDS: "1", LISTEN_PID: "4242" }, 4242, 1), /fd 3 is not a socket|not a socket/);
});

test.run();
