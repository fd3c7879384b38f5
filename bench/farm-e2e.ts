// Boot farm benchmark: N clients (default 32) run the same boot-like I/O pattern at once, each
// through copy-on-write over one shared base: bun-nbd's per-client overlays (base@cNN, one qcow2
// each), bun-nbd --snapshot and nbdkit's cow filter (one overlay shared by all), and nbd-server's
// copyonwrite (a diff file per connection). Prints aggregate read MB/s, server CPU per GB, how long
// the server waited for a CPU, and server memory (PSS of its process tree) per connected client.
// Noisy on a shared 2-core machine: compare ratios from one run.
//
//   node_modules/.bin/bun bench/farm-e2e.ts [--clients 32] [--quick] [--servers bun,bun-shared,nbdkit,nbd-server] [--dir DIR]
import { spawn, spawnSync, type Subprocess } from "bun";
import { closeSync, fsyncSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { connect, type NbdClient } from "../src/client/index.ts";
import { CLK_TCK, PATH, ROOT, cpuTicks, fsType, waitPort, writeRandomImage } from "./lib/harness.ts";

const { values: o } = parseArgs({ options: {
  clients: { type: "string" }, quick: { type: "boolean" }, servers: { type: "string" }, dir: { type: "string" }, depth: { type: "string" },
} });
const MiB = 1 << 20;
const N = Number(o.clients ?? (o.quick ? 16 : 32));
const SIZE = (o.quick ? 256 : 1024) * MiB;
const DEPTH = Number(o.depth ?? 8);
const servers = (o.servers ?? "bun,bun-shared,nbdkit,nbd-server").split(",");
const dir = o.dir ?? mkdtempSync(join(tmpdir(), "bun-nbd-farm-bench-"));
mkdirSync(dir, { recursive: true });
const base = join(dir, "base.img");

type Op = { write: boolean; offset: number; length: number };

/** xorshift32, seeded: the same pattern every run. */
function rng(seed: number): () => number {
  let x = seed | 0 || 1;
  return () => { x ^= x << 13; x ^= x >>> 17; x ^= x << 5; return (x >>> 0) / 2 ** 32; };
}

/**
 * What booting looks like from the disk: the kernel and initrd read sequentially in 128 KiB
 * requests, then libraries and configuration read as 4-64 KiB requests from a hot set every client
 * shares (in its own order), and a few 4 KiB writes (logs, /tmp) that copy-on-write must take.
 */
function bootPattern(client: number): Op[] {
  const ops: Op[] = [];
  const kernel = (o.quick ? 16 : 40) * MiB;
  for (let off = 8 * MiB; off < 8 * MiB + kernel; off += 128 * 1024) ops.push({ write: false, offset: off, length: 128 * 1024 });
  const shared = rng(12345);
  const hot: Op[] = [];
  for (let i = 0; i < (o.quick ? 500 : 1200); i++) {
    const r = shared();
    const length = r < 0.5 ? 4096 : r < 0.75 ? 16384 : 65536;
    hot.push({ write: false, offset: Math.floor(shared() * ((SIZE - 128 * MiB) / 4096)) * 4096 + 64 * MiB, length });
  }
  const mine = rng(1000 + client);
  for (let i = hot.length - 1; i > 0; i--) { const j = Math.floor(mine() * (i + 1)); [hot[i], hot[j]] = [hot[j]!, hot[i]!]; }
  ops.push(...hot);
  for (let i = 0; i < 48; i++) ops.push({ write: true, offset: SIZE - 64 * MiB + Math.floor(mine() * 16384) * 4096, length: 4096 });
  return ops;
}

/** Run `ops` on one connection with DEPTH requests in flight; returns bytes read. */
async function drive(c: NbdClient, ops: Op[]): Promise<number> {
  let next = 0;
  let read = 0;
  const payload = new Uint8Array(4096).fill(0x5a);
  const worker = async () => {
    while (next < ops.length) {
      const op = ops[next++]!;
      if (op.write) await c.pwrite(payload, op.offset);
      else { await c.read(op.offset, op.length); read += op.length; }
    }
  };
  await Promise.all(Array.from({ length: DEPTH }, worker));
  return read;
}

/** The server's process and its descendants (nbd-server forks one per connection). */
function tree(pid: number): number[] {
  const out = [pid];
  for (let i = 0; i < out.length; i++) {
    try {
      for (const t of readdirSync(`/proc/${out[i]}/task`)) {
        const kids = readFileSync(`/proc/${out[i]}/task/${t}/children`, "utf8").trim();
        if (kids) out.push(...kids.split(/\s+/).map(Number));
      }
    } catch { /* gone */ }
  }
  return out;
}
/** Proportional set size of the whole tree, bytes (shared pages split between the processes). */
function pss(pid: number): number {
  let kb = 0;
  for (const p of tree(pid)) {
    try { kb += Number(/^Pss:\s+(\d+) kB/m.exec(readFileSync(`/proc/${p}/smaps_rollup`, "utf8"))?.[1] ?? 0); } catch { /* gone */ }
  }
  return kb * 1024;
}
const cpu = (pid: number) => tree(pid).reduce((a, p) => { try { return a + cpuTicks(p); } catch { return a; } }, 0);
/** Seconds the tree's threads were runnable but waiting for a CPU (schedstat): how starved it was. */
function waited(pid: number): number {
  let ns = 0;
  for (const p of tree(pid)) {
    try {
      for (const t of readdirSync(`/proc/${p}/task`)) ns += Number(readFileSync(`/proc/${p}/task/${t}/schedstat`, "utf8").split(" ")[1]);
    } catch { /* gone */ }
  }
  return ns / 1e9;
}

interface Server { name: string; pid: number; uri(client: number): string; stop(): Promise<void> }

async function startBun(port: number): Promise<Server> {
  const ov = join(dir, "overlays-bun");
  rmSync(ov, { recursive: true, force: true });
  mkdirSync(ov);
  const p = spawn([process.execPath, join(ROOT, "src/cli.ts"), "serve", "-q", "-p", String(port), "--per-client-overlay", ov, base], { stdout: "ignore", stderr: "inherit" });
  await waitPort(`nbd://127.0.0.1:${port}/base`, p, "bun-nbd");
  return { name: "bun-nbd per-client", pid: p.pid, uri: (c) => `nbd://127.0.0.1:${port}/base@c${c}`, stop: () => stopProc(p) };
}

/** bun-nbd with one throw-away overlay shared by all (serve --snapshot): the same shape as nbdkit's cow. */
async function startBunShared(port: number): Promise<Server> {
  const p = spawn([process.execPath, join(ROOT, "src/cli.ts"), "serve", "-q", "-p", String(port), "--snapshot", base],
    { stdout: "ignore", stderr: "inherit", env: { ...process.env, TMPDIR: dir } });
  await waitPort(`nbd://127.0.0.1:${port}/base`, p, "bun-nbd --snapshot");
  return { name: "bun-nbd --snapshot (shared)", pid: p.pid, uri: () => `nbd://127.0.0.1:${port}/base`, stop: () => stopProc(p) };
}

async function startNbdkit(port: number): Promise<Server> {
  const p = spawn(["nbdkit", "-f", "-p", String(port), "-i", "127.0.0.1", "--filter=cow", "file", `file=${base}`],
    { stdout: "ignore", stderr: "inherit", env: { ...process.env, PATH, TMPDIR: dir } });
  await waitPort(`nbd://127.0.0.1:${port}/`, p, "nbdkit");
  return { name: "nbdkit cow (shared)", pid: p.pid, uri: () => `nbd://127.0.0.1:${port}/`, stop: () => stopProc(p) };
}

async function startNbdServer(port: number): Promise<Server> {
  const cow = join(dir, "cow-nbd-server");
  mkdirSync(cow, { recursive: true });
  const conf = join(dir, "nbd-server.conf");
  writeFileSync(conf, `[generic]\nport = ${port}\nlisten = 127.0.0.1\nallowlist = false\n\n[farm]\nexportname = ${base}\ncopyonwrite = true\ncowdir = ${cow}\n`);
  const r = spawnSync(["nbd-server", "-C", conf], { env: { ...process.env, PATH } });
  if (r.exitCode !== 0) throw new Error(`nbd-server: ${r.stderr.toString()}`);
  // it daemonizes: find it by its (unique) config path
  let pid = 0;
  for (let i = 0; i < 50 && pid === 0; i++) {
    for (const d of readdirSync("/proc")) {
      if (!/^\d+$/.test(d)) continue;
      try { if (readFileSync(`/proc/${d}/cmdline`, "utf8").split("\0").includes(conf)) pid = Number(d); } catch { /* gone */ }
    }
    if (pid === 0) await Bun.sleep(100);
  }
  if (pid === 0) throw new Error("nbd-server did not start");
  await waitPort(`nbd://127.0.0.1:${port}/farm`, { exitCode: null } as Subprocess, "nbd-server");
  return {
    name: "nbd-server copyonwrite", pid, uri: () => `nbd://127.0.0.1:${port}/farm`,
    stop: async () => { for (const p of tree(pid).reverse()) { try { process.kill(p, "SIGTERM"); } catch { /* gone */ } } await Bun.sleep(300); },
  };
}

async function stopProc(p: Subprocess): Promise<void> {
  p.kill("SIGTERM");
  const t = setTimeout(() => p.kill("SIGKILL"), 10_000);
  await p.exited;
  clearTimeout(t);
}

interface Row { name: string; mbps: number; seconds: number; cpu: number; pssBase: number; pssPeak: number; connectSeconds: number; bytes: number; wait: number }

async function measure(s: Server): Promise<Row> {
  const pssBase = pss(s.pid);
  // One after the other: nbd-server negotiates each connection in its main process before forking,
  // with a short listen backlog, so 32 simultaneous connects leave some SYNs dropped and waiting for
  // the kernel's retransmissions (measured: 9 of 32 without a greeting after 20 s).
  const t = performance.now();
  const clients: NbdClient[] = [];
  for (let i = 0; i < N; i++) clients.push(await connect(s.uri(i + 1), { connectTimeoutMs: 60_000, requestTimeoutMs: 120_000 }));
  const connectSeconds = (performance.now() - t) / 1000;
  const patterns = clients.map((_, i) => bootPattern(i));
  let pssPeak = pss(s.pid);
  const sampler = setInterval(() => { pssPeak = Math.max(pssPeak, pss(s.pid)); }, 100);
  const c0 = cpu(s.pid);
  const w0 = waited(s.pid);
  const t0 = performance.now();
  const bytes = (await Promise.all(clients.map((c, i) => drive(c, patterns[i]!)))).reduce((a, b) => a + b, 0);
  const seconds = (performance.now() - t0) / 1000;
  const ticks = cpu(s.pid) - c0;
  const wait = waited(s.pid) - w0;
  pssPeak = Math.max(pssPeak, pss(s.pid));
  clearInterval(sampler);
  await Promise.all(clients.map((c) => c.close()));
  return { name: s.name, mbps: bytes / seconds / 1e6, seconds, cpu: ticks / CLK_TCK, pssBase, pssPeak, connectSeconds, bytes, wait };
}

console.log(`farm benchmark: ${N} clients, ${SIZE / MiB} MiB base in ${dir} (${fsType(dir)}), ${DEPTH} requests in flight per client`);
writeRandomImage(base, SIZE, 7);
// Write the base back now: on ext4 the first fsync a server does (creating an overlay) would
// otherwise wait for a whole GiB of dirty pages, and the first clients would time out.
const bfd = openSync(base, "r+");
fsyncSync(bfd);
closeSync(bfd);
const rows: Row[] = [];
let port = 12600 + Math.floor(Math.random() * 300);
for (const name of servers) {
  const start = { bun: startBun, "bun-shared": startBunShared, nbdkit: startNbdkit, "nbd-server": startNbdServer }[name];
  if (!start) throw new Error(`unknown server ${name}`);
  const s = await start(port++);
  try {
    rows.push(await measure(s));
  } finally {
    await s.stop();
  }
}
const mb = (b: number) => (b / MiB).toFixed(1);
console.log("\n| server | all connected in s | aggregate read MB/s | wall s | server CPU s per GB | waiting for a CPU, s | PSS before | PSS with clients | per client |");
console.log("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
for (const r of rows) {
  console.log(`| ${r.name} | ${r.connectSeconds.toFixed(2)} | ${r.mbps.toFixed(0)} | ${r.seconds.toFixed(2)} | ${(r.cpu / (r.bytes / 1e9)).toFixed(2)} | ${r.wait.toFixed(1)} | ${mb(r.pssBase)} MiB | ${mb(r.pssPeak)} MiB | ${mb((r.pssPeak - r.pssBase) / N)} MiB |`);
}
const bun = rows.find((r) => r.name.startsWith("bun-nbd per-client"));
for (const r of rows) {
  if (r === bun || !bun) continue;
  console.log(`bun-nbd / ${r.name}: throughput ${(bun.mbps / r.mbps).toFixed(2)}x, memory per client ${((bun.pssPeak - bun.pssBase) / Math.max(1, r.pssPeak - r.pssBase)).toFixed(2)}x`);
}
if (!o.dir) rmSync(dir, { recursive: true, force: true });
