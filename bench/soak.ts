// Soak: `bun bench/soak.ts [--minutes 60] [--clients 32] [--dir DIR]`. Two real servers (`bun
// src/cli.ts serve`: a raw image, and a qcow2 overlay over a raw base), each on TCP and a unix
// socket, under mixed load for the given time: library clients that write, read back and verify
// their own region, flush, zero and ask block status, then disconnect gracefully or abruptly;
// raw clients that pipeline large READs and stop reading; clients that hang up mid-handshake.
// Every 10 s it samples each server's RSS and open fds; at the end it prints the RSS slope (least
// squares after a warm-up), fds at start (idle) and end (idle again), and every error seen.
import { mkdirSync, readdirSync, readFileSync, readlinkSync, truncateSync, writeFileSync } from "node:fs";
import { connect as netConnect, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connect, type NbdClient } from "../src/client/index.ts";
import { serve, type Served } from "../test/helpers/server.ts";
import { CMD, Wire, request } from "../test/robustness-wire.ts";

const args = new Map<string, string>();
for (let i = 2; i < process.argv.length; i += 2) args.set(process.argv[i]!.replace(/^--/, ""), process.argv[i + 1] ?? "");
const MINUTES = Number(args.get("minutes") ?? 60);
const CLIENTS = Number(args.get("clients") ?? 32);
const DIR = args.get("dir") ?? join(tmpdir(), `bun-nbd-soak-${process.pid}`);
const SIZE = 256 * 1024 * 1024;
const BLOCK = 4096;
mkdirSync(DIR, { recursive: true });

let stopping = false;

interface Target { name: string; srv: Served; tcp: string; unix: string; sock: string; export: string }
const stats = { ops: 0, bytesWritten: 0, bytesRead: 0, verified: 0, connects: 0, gracefulCloses: 0, abruptCloses: 0, stalledClients: 0, handshakeHangups: 0 };
/** Errors by kind (digits blanked): the first of each kind with its time, and how many there were. */
const errors = new Map<string, { first: string; count: number }>();
let errorCount = 0;
function error(msg: string): void {
  errorCount++;
  const kind = msg.replace(/\d+/g, "N");
  const e = errors.get(kind);
  if (e) e.count++;
  else if (errors.size < 100) errors.set(kind, { first: `${new Date().toISOString().slice(11, 19)} ${msg}`, count: 1 });
}

const rssKiB = (pid: number) => { try { return Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))?.[1] ?? 0); } catch { return -1; } };
/** Open fds, not counting duplicates of stdin/stdout/stderr (Bun dups stderr when it first logs); -1 once the process is gone. */
function fdList(pid: number): string[] | null {
  const link = (f: string) => { try { return readlinkSync(`/proc/${pid}/fd/${f}`); } catch { return "?"; } };
  try {
    const std = new Set(["0", "1", "2"].map(link));
    return readdirSync(`/proc/${pid}/fd`).filter((f) => Number(f) <= 2 || !std.has(link(f))).map(link);
  } catch { return null; }
}
const fds = (pid: number) => fdList(pid)?.length ?? -1;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const rand = (n: number) => Math.floor(Math.random() * n);

async function startTargets(): Promise<Target[]> {
  const raw = join(DIR, "raw.img");
  writeFileSync(raw, "");
  truncateSync(raw, SIZE);
  const base = join(DIR, "base.img");
  writeFileSync(base, new Uint8Array(8 * 1024 * 1024).fill(0x42));
  truncateSync(base, SIZE);
  const out: Target[] = [];
  for (const [name, files, exp] of [["raw", [raw], "raw"], ["overlay", ["--overlay", join(DIR, "overlay.qcow2"), base], "base"]] as const) {
    const sock = join(DIR, `${name}.sock`);
    // Info logging (each connection is a line): if a server stops, its last lines say why.
    const srv = await serve(["-p", "0", ...files], { socket: sock });
    void srv.proc.exited.then((code) => {
      if (stopping) return;
      error(`${name} server exited with ${code}; its last log lines:\n      ${srv.output().trim().split("\n").slice(-30).join("\n      ")}`);
    });
    out.push({ name, srv, sock, export: exp, tcp: `nbd://127.0.0.1:${srv.port}/${exp}`, unix: `nbd+unix:///${exp}?socket=${sock}` });
  }
  return out;
}

/** A library client on its own 1/CLIENTS of the export: what it wrote (and knows it wrote) reads back. */
async function worker(id: number, t: Target, until: number): Promise<void> {
  const region = Math.floor(SIZE / CLIENTS / BLOCK) * BLOCK;
  const start = id * region;
  const blocks = region / BLOCK;
  // The model: per block, the seed of its content; -1 unknown (trimmed, or a write cut off by our own hang-up).
  const model = new Float64Array(blocks).fill(-2); // -2: never written by us (the export's initial content)
  const content = (seed: number, n: number) => {
    const b = new Uint8Array(n);
    let x = seed * 2654435761 >>> 0 || 1;
    for (let i = 0; i < n; i += 4) { x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0; b[i] = x; b[i + 1] = x >>> 8; b[i + 2] = x >>> 16; b[i + 3] = x >>> 24; }
    return b;
  };
  let seedCounter = id * 1_000_000;
  while (Date.now() < until) {
    let c: NbdClient;
    try {
      c = await connect(rand(2) ? t.tcp : t.unix, { connectTimeoutMs: 30_000 });
    } catch (e) {
      error(`${t.name} client ${id}: connect failed: ${(e as Error).message}`);
      await sleep(1000);
      continue;
    }
    stats.connects++;
    const rounds = 1 + rand(60);
    const abrupt = rand(10) < 3;
    try {
      for (let r = 0; r < rounds && Date.now() < until; r++) {
        // A batch of writes to distinct blocks, pipelined; then verifying reads of known blocks.
        const n = 1 + rand(8);
        const picked = new Set<number>();
        while (picked.size < n) picked.add(rand(blocks / 16 - 1) * 16); // 16-block slots: writes never overlap
        const ops: Promise<unknown>[] = [];
        const touched: [number, number, number][] = [];
        for (const b of picked) {
          const len = 1 + rand(16);
          const seed = ++seedCounter;
          const kind = rand(10);
          for (let k = 0; k < len; k++) model[b + k] = -1; // unknown until the reply
          if (kind < 7) {
            ops.push(c.pwrite(content(seed, len * BLOCK), start + b * BLOCK, { fua: kind === 0 }).then(() => { stats.bytesWritten += len * BLOCK; }));
            touched.push([b, len, seed]);
          } else if (kind < 9) {
            ops.push(c.zero(start + b * BLOCK, len * BLOCK, { noHole: kind === 8 }));
            touched.push([b, len, 0]);
          } else {
            ops.push(c.trim(start + b * BLOCK, len * BLOCK)); // contents undefined afterwards: stay unknown
          }
        }
        if (abrupt && r === rounds - 1) {
          // Hang up with the batch in flight: those blocks stay unknown.
          c.destroy();
          await Promise.allSettled(ops);
          stats.abruptCloses++;
          break;
        }
        await Promise.all(ops);
        stats.ops += ops.length;
        for (const [b, len, seed] of touched) for (let k = 0; k < len; k++) model[b + k] = seed === 0 ? 0 : seed * 64 + k;
        if (rand(4) === 0) { await c.flush(); stats.ops++; }
        if (rand(6) === 0) { await c.blockStatus(start, Math.min(region, 64 * BLOCK * 16)); stats.ops++; }
        await sleep(rand(20)); // think time: a mixed load, not a benchmark
        // Verify a few known blocks.
        for (let v = 0; v < 4; v++) {
          const b = rand(blocks);
          const m = model[b]!;
          if (m < 0 && m !== -2) continue;
          const got = await c.read(start + b * BLOCK, BLOCK);
          stats.ops++;
          stats.bytesRead += BLOCK;
          if (m === -2) continue; // initial content: not ours to check
          const want = m === 0 ? new Uint8Array(BLOCK) : content(Math.floor(m / 64), (m % 64 + 1) * BLOCK).subarray((m % 64) * BLOCK);
          if (Buffer.compare(Buffer.from(got), Buffer.from(want)) !== 0) error(`${t.name} client ${id}: block ${b} read back wrong data`);
          else stats.verified++;
        }
      }
      if (!abrupt) { await c.close(); stats.gracefulCloses++; } else c.destroy(); // (time ran out before the planned hang-up)
    } catch (e) {
      if (!abrupt) error(`${t.name} client ${id}: ${(e as Error).message}`);
      c.destroy();
    }
    await sleep(rand(200));
  }
}

/** A client that pipelines 1 MiB READs, stops reading for a while, then hangs up. */
async function staller(id: number, t: Target, until: number): Promise<void> {
  while (Date.now() < until) {
    try {
      const w = await Wire.open(rand(2) ? { port: t.srv.port } : { path: t.sock });
      await w.hello();
      await w.go(t.export);
      w.sock.pause();
      const reqs: Buffer[] = [];
      for (let i = 0; i < 48; i++) reqs.push(request(CMD.READ, BigInt(i), rand(SIZE / 1048576 - 1) * 1048576, 1048576));
      w.write(Buffer.concat(reqs));
      stats.stalledClients++;
      await sleep(3000 + rand(15000));
      w.destroy();
    } catch (e) {
      error(`${t.name} staller ${id}: ${(e as Error).message}`);
    }
    await sleep(rand(2000));
  }
}

/** A client that connects and hangs up part-way through the handshake. */
async function churner(id: number, t: Target, until: number): Promise<void> {
  while (Date.now() < until) {
    await new Promise<void>((resolve) => {
      const s: Socket = rand(2) ? netConnect({ host: "127.0.0.1", port: t.srv.port }) : netConnect({ path: t.sock });
      s.on("error", () => {});
      s.once("connect", () => {
        const steps = rand(3);
        if (steps > 0) s.write(Buffer.from([0, 0, 0, 3]));
        if (steps > 1) s.write(Buffer.concat([Buffer.from("IHAVEOPT"), Buffer.from([0, 0, 0, 7, 0, 0, 0, 20])])); // a GO cut short
        setTimeout(() => { s.destroy(); resolve(); }, rand(300));
      });
      s.once("close", () => resolve());
    });
    stats.handshakeHangups++;
    await sleep(rand(500));
  }
}

function slope(samples: { t: number; rss: number }[]): number {
  // KiB per minute, least squares.
  const n = samples.length;
  if (n < 2) return 0;
  const mt = samples.reduce((s, x) => s + x.t, 0) / n, mr = samples.reduce((s, x) => s + x.rss, 0) / n;
  let num = 0, den = 0;
  for (const x of samples) { num += (x.t - mt) * (x.rss - mr); den += (x.t - mt) ** 2; }
  return den ? (num / den) * 60 : 0;
}

async function main(): Promise<void> {
  const targets = await startTargets();
  await sleep(1000);
  const fdStart = targets.map((t) => fds(t.srv.proc.pid));
  console.log(`fds at start: ${targets.map((t) => fdList(t.srv.proc.pid)?.join(" ")).join(" | ")}`);
  const rssStart = targets.map((t) => rssKiB(t.srv.proc.pid));
  console.log(`soak: ${MINUTES} min, ${CLIENTS} clients, servers ${targets.map((t) => `${t.name} pid ${t.srv.proc.pid}`).join(", ")}; dir ${DIR}`);
  const t0 = Date.now();
  const until = t0 + MINUTES * 60_000;
  const samples: { t: number; rss: number }[][] = targets.map(() => []);
  const csv = ["elapsed_s,server,rss_kib,fds,ops,errors"];
  const sampler = setInterval(() => {
    const el = (Date.now() - t0) / 1000;
    targets.forEach((t, i) => {
      if (t.srv.proc.exitCode !== null) return; // reported once, by the exit handler
      const rss = rssKiB(t.srv.proc.pid), f = fds(t.srv.proc.pid);
      samples[i]!.push({ t: el, rss });
      csv.push(`${el.toFixed(0)},${t.name},${rss},${f},${stats.ops},${errorCount}`);
    });
    if (Math.round(el) % 300 < 10) {
      console.log(`  ${(el / 60).toFixed(1)} min: ${targets.map((t, i) => `${t.name} RSS ${(samples[i]!.at(-1)?.rss ?? 0) >> 10} MiB`).join(", ")}, ops ${stats.ops}, verified ${stats.verified}, errors ${errorCount}`);
    }
  }, 10_000);
  const jobs: Promise<void>[] = [];
  const nStall = Math.max(1, Math.round(CLIENTS / 8)), nChurn = Math.max(1, Math.round(CLIENTS / 8));
  const nWork = CLIENTS - nStall - nChurn;
  for (let i = 0; i < nWork; i++) jobs.push(worker(i, targets[i % 2]!, until));
  for (let i = 0; i < nStall; i++) jobs.push(staller(i, targets[i % 2]!, until));
  for (let i = 0; i < nChurn; i++) jobs.push(churner(i, targets[i % 2]!, until));
  await Promise.all(jobs);
  clearInterval(sampler);
  await sleep(5000); // let the servers notice every hang-up
  const fdEnd = targets.map((t) => fds(t.srv.proc.pid));
  const rssEnd = targets.map((t) => rssKiB(t.srv.proc.pid));
  writeFileSync(join(DIR, "soak.csv"), csv.join("\n") + "\n");
  const warm = 0.1 * MINUTES * 60;
  console.log(`\nsoak finished after ${((Date.now() - t0) / 60000).toFixed(1)} min`);
  targets.forEach((t, i) => {
    const s = samples[i]!;
    const max = Math.max(0, ...s.map((x) => x.rss));
    const logLines = t.srv.output().split("\n");
    const errLines = logLines.filter((l) => / error: /.test(l));
    console.log(`  ${t.name}: RSS start ${rssStart[i]! >> 10} MiB, end ${rssEnd[i]! >> 10} MiB, max ${max >> 10} MiB, ` +
      `slope after warm-up ${slope(s.filter((x) => x.t >= warm)).toFixed(0)} KiB/min; fds start ${fdStart[i]}, end ${fdEnd[i]}; ` +
      `server log: ${logLines.filter((l) => /warning:/.test(l)).length} warnings, ${errLines.length} errors`);
    for (const l of errLines.slice(0, 5)) error(`${t.name} server logged: ${l}`);
    if (fdEnd[i] !== fdStart[i]) error(`${t.name}: ${fdEnd[i]} fds at the end, ${fdStart[i]} at the start: ${fdList(t.srv.proc.pid)?.join(" ")}`);
  });
  console.log(`  load: ${stats.ops} ops, ${(stats.bytesWritten / 2 ** 30).toFixed(1)} GiB written, ${stats.verified} blocks verified, ` +
    `${stats.connects} library connections (${stats.gracefulCloses} closed, ${stats.abruptCloses} hung up with requests in flight), ` +
    `${stats.stalledClients} stalled readers, ${stats.handshakeHangups} handshake hang-ups`);
  console.log(`  errors: ${errorCount}${[...errors.values()].map((e) => `\n    ${e.count} x ${e.first}`).join("")}`);
  console.log(`  samples: ${join(DIR, "soak.csv")}`);
  stopping = true;
  for (const t of targets) await t.srv.stop();
  process.exit(errorCount ? 1 : 0);
}

await main();
