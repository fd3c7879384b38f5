// serve --workers N (src/server/workers.ts): several processes serve one port or socket. Checked
// through the real CLI: connections reach more than one process; what one connection writes and
// flushes, a connection served by another process reads (CAN_MULTI_CONN stays true); a unix socket
// is served by the workers too (the supervisor stopped, a worker accepts); a killed worker is
// replaced while the others go on; SIGTERM stops them all, and a supervisor killed with -9 takes
// its workers down; SIGHUP reaches every process; PSK TLS in every process; one metrics endpoint
// summing them all; what cannot have several writers is refused.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { connect } from "../src/client/index.ts";
import { workerProblems, workerRole } from "../src/server/workers.ts";
import { mergeMetrics } from "../src/server/metrics.ts";
import { DEFAULT_SETTINGS, type ExportConfig, type ServiceConfig } from "../src/config/types.ts";
import { BUN, CLI, have, need, run, scratch } from "./helpers/env.ts";
import { serve, waitForOutput, type Served } from "./helpers/server.ts";
import { makePki } from "./helpers/tls.ts";

const test = suite("serve --workers");
const dir = scratch("bun-nbd-workers-");
const SIZE = 8 << 20;

function image(name: string, fill = 0): string {
  const p = join(dir, name);
  writeFileSync(p, new Uint8Array(SIZE).fill(fill));
  return p;
}

/** The processes serving, from the banner's "(pids A, B, C)". */
function pidsOf(s: Served): number[] {
  const m = /processes serve these sockets \(pids ([\d, ]+)\)/.exec(s.output());
  assert.ok(m, `no pid line in:\n${s.output()}`);
  return m![1]!.split(", ").map(Number);
}

const alive = (pid: number) => { try { process.kill(pid, 0); return true; } catch { return false; } };

async function gone(pids: number[], ms = 10_000): Promise<boolean> {
  const limit = Date.now() + ms;
  while (pids.some(alive)) {
    if (Date.now() > limit) return false;
    await Bun.sleep(25);
  }
  return true;
}

/** Which workers logged a connection ("wN [id] connection from"). */
const workersSeen = (out: string) => new Set([...out.matchAll(/ w(\d+) \[\d+\] connection from/g)].map((m) => Number(m[1])));

test("TCP: connections spread over the processes, and a FLUSHed write is read through any of them", async () => {
  const disk = image("spread.img");
  const s = await serve(["--workers", "3", disk]);
  try {
    assert.is(pidsOf(s).length, 3);
    // 24 connections, each writing its own 4 KiB and flushing
    for (let i = 0; i < 24; i++) {
      const c = await connect(s.uri());
      try {
        assert.ok(c.info.canMultiConn, "CAN_MULTI_CONN on a raw file served by several processes");
        await c.pwrite(new Uint8Array(4096).fill(i + 1), i * 4096);
        await c.flush();
      } finally {
        await c.close();
      }
    }
    await waitForOutput(s, /w\d+ \[\d+\] closed[\s\S]*$/);
    const seen = workersSeen(s.output());
    assert.ok(seen.size >= 2, `24 connections all went to one process: ${[...seen]}`);
    // every later connection, whichever process serves it, reads every write
    for (let k = 0; k < 6; k++) {
      const c = await connect(s.uri());
      try {
        const buf = new Uint8Array(24 * 4096);
        await c.pread(buf, 0);
        for (let i = 0; i < 24; i++) assert.is(buf[i * 4096 + 100], i + 1, `block ${i} through connection ${k}`);
      } finally {
        await c.close();
      }
    }
  } finally {
    assert.is(await s.stop(), 0, s.output());
  }
  const file = readFileSync(disk);
  for (let i = 0; i < 24; i++) assert.is(file[i * 4096 + 4095], i + 1, `block ${i} in the file`);
});

test("a unix socket is served by the workers too (with the supervisor stopped, a worker accepts)", async () => {
  const disk = image("unix.img", 0x3c);
  const sock = join(dir, "w.sock");
  const s = await serve(["--workers", "2", disk], { socket: sock });
  const [sup, worker] = pidsOf(s);
  try {
    process.kill(sup!, "SIGSTOP");
    const c = await connect(s.uri());
    try {
      const b = new Uint8Array(512);
      await c.pread(b, SIZE - 512);
      assert.ok(b.every((x) => x === 0x3c));
    } finally {
      await c.close();
    }
    process.kill(sup!, "SIGCONT");
    await waitForOutput(s, / w1 \[\d+\] connection from/);
    assert.ok(alive(worker!));
  } finally {
    process.kill(sup!, "SIGCONT");
    assert.is(await s.stop(), 0, s.output());
  }
});

test("a killed worker is replaced, the others serve on; SIGTERM stops every process", async () => {
  const disk = image("kill.img", 7);
  const s = await serve(["--workers", "3", disk]);
  const pids = pidsOf(s);
  process.kill(pids[2]!, "SIGKILL");
  await waitForOutput(s, /worker 2 \(pid \d+\) exited \(signal SIGKILL\); its connections are lost, starting another/);
  await waitForOutput(s, /worker 2 serving again \(pid (\d+)\)/, 20_000);
  const replacement = Number(/worker 2 serving again \(pid (\d+)\)/.exec(s.output())![1]);
  assert.ok(alive(replacement));
  for (let i = 0; i < 12; i++) {
    const c = await connect(s.uri());
    const b = new Uint8Array(4096);
    await c.pread(b, i * 4096);
    assert.is(b[0], 7);
    await c.close();
  }
  assert.is(await s.stop(), 0, s.output());
  assert.ok(await gone([pids[0]!, pids[1]!, replacement]), "every process exits after SIGTERM");
});

test("a supervisor killed with -9 takes its workers down", async () => {
  const s = await serve(["--workers", "3", image("orphan.img")]);
  const pids = pidsOf(s);
  process.kill(pids[0]!, "SIGKILL");
  await s.proc.exited;
  assert.ok(await gone(pids.slice(1)), `workers still running: ${pids.slice(1).filter(alive)}`);
});

test("SIGHUP reaches every process: each reloads the config file", async () => {
  const a = image("a.img", 1);
  const b = image("b.img", 2);
  const cfg = join(dir, "w.toml");
  const write = (files: string[]) => writeFileSync(cfg, `[server]\nworkers = 3\n\n${files.map((f) => `[[export]]\nname = "${f.slice(-5, -4)}"\nfile = "${f}"\n`).join("\n")}`);
  write([a]);
  const s = await serve(["--config", cfg]);
  try {
    assert.is(pidsOf(s).length, 3);
    write([a, b]);
    s.proc.kill("SIGHUP");
    for (const w of [0, 1, 2]) await waitForOutput(s, new RegExp(`w${w} reloaded .*1 added \\(b\\)`), 10_000);
    for (let i = 0; i < 12; i++) {
      const c = await connect(s.uri("b"));
      const buf = new Uint8Array(512);
      await c.pread(buf, 0);
      assert.is(buf[0], 2);
      await c.close();
    }
    // a reload that would need one writer is refused, the running table kept
    writeFileSync(cfg, `[server]\nworkers = 3\n\n[[export]]\nname = "a"\nfile = "${a}"\noverlay = "snapshot"\n`);
    s.proc.kill("SIGHUP");
    await waitForOutput(s, /reload of .* refused, keeping the running configuration: export "a" .*--snapshot overlay must have one writer/, 10_000);
  } finally {
    assert.is(await s.stop(), 0, s.output());
  }
});

test("TLS (PSK, --tls=require) is served by every process, each with its own engine", async () => {
  need("openssl", "psktool", "nbdinfo");
  const pki = await makePki(join(dir, "pki"));
  const disk = image("tls.img", 0x6b);
  const s = await serve(["--workers", "2", "--tls=require", "--tls-psk", pki.psk, disk], { timeoutMs: 30_000 });
  try {
    for (let i = 0; i < 16; i++) {
      const c = await connect(`nbds://alice@localhost:${s.port}/tls?tls-psk-file=${pki.psk}`);
      const b = new Uint8Array(4096);
      await c.pread(b, i * 4096);
      assert.is(b[17], 0x6b);
      await c.close();
    }
    for (const w of [0, 1]) await waitForOutput(s, new RegExp(`w${w} \\[\\d+\\] .*TLS established \\(TLSv1\\.3 [A-Z0-9_]+\\), PSK user "alice"`));
    // and a plain client is refused by whichever process answers it
    const plain = await run(["nbdinfo", "--size", s.uri("tls")]);
    assert.is.not(plain.code, 0);
  } finally {
    assert.is(await s.stop(), 0, s.output());
  }
});

test("--metrics: the supervisor's endpoint sums every process's counters", async () => {
  const disk = image("metrics.img", 9);
  const s = await serve(["--workers", "3", "--metrics", "127.0.0.1:0", disk]);
  try {
    const url = /Metrics at (http:\/\/\S+)/.exec(s.output())![1]!;
    for (let i = 0; i < 24; i++) {
      const c = await connect(s.uri());
      await c.pread(new Uint8Array(4096), i * 4096);
      await c.close();
    }
    assert.ok(workersSeen(s.output()).size >= 2, "connections reached more than one process");
    const text = await (await fetch(url)).text();
    assert.match(text, /^bun_nbd_read_bytes_total\{export="metrics"\} 98304$/m, text);
    assert.match(text, /^bun_nbd_requests_total\{export="metrics",command="read"\} 24$/m);
    assert.is(text.match(/^# TYPE bun_nbd_read_bytes_total counter$/gm)?.length, 1, "one family header");
  } finally {
    assert.is(await s.stop(), 0, s.output());
  }
});

test("mergeMetrics sums series and keeps families together", () => {
  const a = '# TYPE x counter\nx{e="a"} 1\nx{e="b"} 2\n# TYPE g gauge\ng 3\n';
  const b = '# TYPE x counter\nx{e="a"} 10\nx{e="c"} 5\n# TYPE g gauge\ng 4\n';
  assert.is(mergeMetrics([a, b]), '# TYPE x counter\nx{e="a"} 11\nx{e="b"} 2\nx{e="c"} 5\n# TYPE g gauge\ng 7\n');
  assert.is(mergeMetrics([a]), a);
  assert.is(mergeMetrics(["h_bucket{le=\"0.5\"} 0.25\n", "h_bucket{le=\"0.5\"} 0.5\n"]), "h_bucket{le=\"0.5\"} 0.75\n");
});

test("refused: what must have one writer, and limits that would become per process", async () => {
  const disk = image("refuse.img");
  const cases: [string[], RegExp][] = [
    [["--overlay", join(dir, "o.qcow2")], /export "refuse" .*its overlay .*o\.qcow2 must have one writer/],
    [["--snapshot"], /its --snapshot overlay must have one writer/],
    [["--per-client-overlay", dir], /its per-client overlays must have one writer/],
    [["--max-connections", "4"], /connection limits are counted per process/],
  ];
  for (const [extra, why] of cases) {
    const r = await run([BUN, CLI, "serve", "-p", "0", "--workers", "2", ...extra, disk], { timeoutMs: 20_000 });
    assert.is(r.code, 2, `${extra.join(" ")}: ${r.stderr}`);
    assert.match(r.stderr, why);
    assert.match(r.stderr, /bun-nbd serve: --workers 2: /);
  }
  for (const bad of ["0", "x", "65"]) {
    const r = await run([BUN, CLI, "serve", "-p", "0", "--workers", bad, disk]);
    assert.is(r.code, 2, r.stderr);
    assert.match(r.stderr, new RegExp(`invalid --workers "${bad}"`));
  }
  const cfg = join(dir, "bad.toml");
  writeFileSync(cfg, `[server]\nworkers = 0\n\n[[export]]\nname = "d"\nfile = "${disk}"\n`);
  const r = await run([BUN, CLI, "serve", "--config", cfg]);
  assert.is(r.code, 1, r.stderr);
  assert.match(r.stderr, /bad\.toml:2: server\.workers: must be a whole number from 1 to 64, not the number 0/);
  writeFileSync(cfg, `[server]\nworkers = 4\n\n[[export]]\nname = "d"\nfile = "${disk}"\n`);
  const printed = await run([BUN, CLI, "serve", "--config", cfg, "--print-config"]);
  assert.match(printed.stdout, /^workers = 4$/m);
});

test("a writable qcow2 or VHD is refused, and served read-only it is allowed", async () => {
  const base = (over: Partial<ExportConfig>): ServiceConfig => ({
    file: null, server: { ...DEFAULT_SETTINGS, workers: 2 },
    exports: [{ name: "x", file: "/x", readOnly: false, overlay: { kind: "none" }, compat: false, partitions: true, description: null, allow: [], clientName: "tls-identity", source: "t", ...over }],
  });
  for (const kind of ["qcow2", "vhd"]) {
    assert.match(workerProblems(base({}), () => kind).join(), new RegExp(`writable ${kind} image's metadata must have one writer`));
    assert.equal(workerProblems(base({ readOnly: true }), () => kind), []);
  }
  for (const kind of ["raw", "xz", "cue", "iso"]) assert.equal(workerProblems(base({}), () => kind), [], kind);
  assert.match(workerProblems(base({ file: "https://127.0.0.1/disk.img" })).join(), /remote image's local cache has one writer/);
  assert.equal(workerProblems({ ...base({ overlay: { kind: "snapshot" } }), server: DEFAULT_SETTINGS }), [], "one process: anything goes");
  assert.is(workerRole({}), null);
  assert.throws(() => workerRole({ BUN_NBD_WORKER: "{oops" }), /BUN_NBD_WORKER is set but is not a worker description/);
  assert.equal(workerRole({ BUN_NBD_WORKER: JSON.stringify({ index: 2, listen: [{ kind: "fd", fd: 3 }] }) }), { index: 2, listen: [{ kind: "fd", fd: 3 }] });
  if (!have("qemu-img")) return;
  const q = join(dir, "ro.qcow2");
  await run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", image("qbase.img"), "-F", "raw", q]);
  const refused = await run([BUN, CLI, "serve", "-p", "0", "--workers", "2", q]);
  assert.is(refused.code, 2, refused.stderr);
  const s = await serve(["--workers", "2", "--read-only", q]);
  assert.is(await s.stop(), 0, s.output());
});

test.run();
