// Many clients at once: aggregate throughput of bun-nbd with one process and with `--workers N`,
// against nbdkit (threads) and qemu-nbd, on one 1 GiB raw image. Workloads: 8 and 32 concurrent
// clients (fio --numjobs, each job its own NBD connection) doing 4 KiB random reads at QD4 and
// 256 KiB sequential reads at QD2, and 4 concurrent `nbdcopy URI null:` (2 connections each).
// Server CPU is summed over the server's processes (the supervisor and its workers).
//
//   bun bench/workers-e2e.ts [--workers N] [--runtime SECONDS] [--rounds N] [--dir DIR]
//                            [--servers bun,bun-loop,bun-workers,nbdkit,qemu] [--only WORKLOAD,...]
//
// On a 2-core machine the clients (fio, nbdcopy) run on the same cores as the servers, so what
// more processes can show is bounded: a server that used one core can now use the second one when
// the clients leave it idle. "bun-loop" is one process with every connection on its event loop
// (--threads 0). Servers listen on 127.0.0.1 ports 12540-12544.
import { spawn, spawnSync, type Subprocess } from "bun";
import { readdirSync, readFileSync } from "node:fs";
import { cpus, totalmem } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { benchScratch, CLK_TCK, cpuTicks, fio, fsType, PATH, ROOT, stopProcess, waitPort, writeRandomImage } from "./lib/harness.ts";

const GiB = 1024 ** 3;
const { values: opt } = parseArgs({
  options: {
    workers: { type: "string" }, runtime: { type: "string" }, rounds: { type: "string" }, dir: { type: "string" },
    servers: { type: "string" }, only: { type: "string" }, help: { type: "boolean", short: "h" },
  },
});
if (opt.help) {
  console.log(readFileSync(new URL(import.meta.url)).toString().split("\n").filter((l) => l.startsWith("//")).map((l) => l.slice(3)).join("\n"));
  process.exit(0);
}
const WORKERS = Number(opt.workers ?? cpus().length);
const RUNTIME = Number(opt.runtime ?? 6);
const ROUNDS = Math.max(1, Number(opt.rounds ?? 1));
const SIZE = GiB;
const SERVERS = (opt.servers ?? "bun,bun-workers,nbdkit,qemu").split(",");
const COPIES = 4;

interface Workload { id: string; label: string; unit: "MB/s" | "IOPS"; fio?: string[]; copies?: number }
const WORKLOADS: Workload[] = [
  { id: "randread-4k-8c", label: "8 clients, 4 KiB random read QD4 each", unit: "IOPS", fio: ["--rw=randread", "--bs=4k", "--iodepth=4", "--numjobs=8"] },
  { id: "randread-4k-32c", label: "32 clients, 4 KiB random read QD4 each", unit: "IOPS", fio: ["--rw=randread", "--bs=4k", "--iodepth=4", "--numjobs=32"] },
  { id: "seqread-256k-8c", label: "8 clients, 256 KiB sequential read QD2 each", unit: "MB/s", fio: ["--rw=read", "--bs=256k", "--iodepth=2", "--numjobs=8"] },
  { id: "seqread-256k-32c", label: "32 clients, 256 KiB sequential read QD2 each", unit: "MB/s", fio: ["--rw=read", "--bs=256k", "--iodepth=2", "--numjobs=32"] },
  { id: "nbdcopy-4x", label: `${COPIES} nbdcopy URI null: at once (aggregate)`, unit: "MB/s", copies: COPIES },
];
if (opt.only) {
  const keep = opt.only.split(",");
  WORKLOADS.splice(0, WORKLOADS.length, ...WORKLOADS.filter((w) => keep.includes(w.id)));
}

const { dir, running } = benchScratch("bun-nbd-workers-e2e-", opt.dir);

interface Started { proc: Subprocess; uri: string }

async function start(server: string, img: string): Promise<Started> {
  const port = { bun: 12540, "bun-workers": 12541, nbdkit: 12542, qemu: 12543, "bun-loop": 12544 }[server]!;
  const cmd = server === "bun" ? [process.execPath, join(ROOT, "src/cli.ts"), "serve", "-q", "-p", String(port), img]
    : server === "bun-loop" ? [process.execPath, join(ROOT, "src/cli.ts"), "serve", "-q", "--threads", "0", "-p", String(port), img]
    : server === "bun-workers" ? [process.execPath, join(ROOT, "src/cli.ts"), "serve", "-q", "-p", String(port), "--workers", String(WORKERS), img]
    : server === "nbdkit" ? ["nbdkit", "-f", "-p", String(port), "-i", "127.0.0.1", "file", `file=${img}`]
    : ["qemu-nbd", "-f", "raw", "-t", "-e", "64", "-p", String(port), "-b", "127.0.0.1", img];
  const proc = spawn(cmd, { stdout: "ignore", stderr: "inherit", stdin: "ignore", env: { ...process.env, PATH } });
  running(proc);
  const uri = `nbd://127.0.0.1:${port}/`;
  await waitPort(uri, proc, server);
  return { proc, uri };
}

/** CPU ticks of a process and its children (serve --workers' worker processes). */
function treeTicks(pid: number): number {
  let t = cpuTicks(pid);
  for (const task of readdirSync(`/proc/${pid}/task`)) {
    let children: string;
    try { children = readFileSync(`/proc/${pid}/task/${task}/children`, "utf8"); } catch { continue; } // a thread that ended
    for (const c of children.split(" ").filter(Boolean)) {
      try { t += cpuTicks(Number(c)); } catch { /* exited */ }
    }
  }
  return t;
}

async function runCopies(uri: string, n: number): Promise<{ value: number; bytes: number }> {
  const t0 = performance.now();
  const procs = Array.from({ length: n }, () => spawn(["nbdcopy", uri, "null:"], { env: { ...process.env, PATH }, stdout: "ignore", stderr: "pipe" }));
  const codes = await Promise.all(procs.map((p) => p.exited));
  if (codes.some((c) => c !== 0)) throw new Error(`nbdcopy failed: ${await new Response(procs[codes.findIndex((c) => c !== 0)]!.stderr).text()}`);
  return { value: (n * SIZE) / ((performance.now() - t0) / 1000) / 1e6, bytes: n * SIZE };
}

interface Result { value: number; bytes: number; cpu: number }
const fmt = (v: number | undefined, unit: string) => (v === undefined ? "-" : unit === "IOPS" ? Math.round(v).toLocaleString("en-US") : v.toFixed(0));
const ratio = (a?: Result, b?: Result) => (a && b && b.value > 0 ? `${(a.value / b.value).toFixed(2)}x` : "-");
const cpuPerGiB = (r?: Result) => (r ? (r.cpu / (r.bytes / GiB)).toFixed(2) : "-");
const NAME: Record<string, string> = { bun: "bun-nbd", "bun-loop": "bun-nbd --threads 0", "bun-workers": `bun-nbd --workers ${WORKERS}`, nbdkit: "nbdkit", qemu: "qemu-nbd" };

async function main(): Promise<void> {
  const img = join(dir, "bench.img");
  console.error(`# creating a 1 GiB image in ${dir} (${fsType(dir)})`);
  writeRandomImage(img, SIZE, 0x6a09e667);
  spawnSync(["sync"]);
  const results: Record<string, Result> = {};
  for (let round = 1; round <= ROUNDS; round++) {
    for (const server of SERVERS) {
      const s = await start(server, img);
      try {
        for (const w of WORKLOADS) {
          const c0 = treeTicks(s.proc.pid);
          const r = w.copies ? await runCopies(s.uri, w.copies) : (() => {
            const f = fio(w.id, s.uri, [...w.fio!, "--group_reporting"], SIZE, RUNTIME);
            return { value: w.unit === "IOPS" ? f.iops : f.mbps, bytes: f.bytes };
          })();
          const cpu = (treeTicks(s.proc.pid) - c0) / CLK_TCK;
          const key = `${w.id}/${server}`;
          if (!results[key] || r.value > results[key]!.value) results[key] = { ...r, cpu };
          console.error(`# round ${round} ${server.padEnd(11)} ${w.id.padEnd(17)} ${fmt(r.value, w.unit).padStart(9)} ${w.unit}  server CPU ${cpu.toFixed(2)} s for ${(r.bytes / GiB).toFixed(2)} GiB`);
        }
      } finally {
        await stopProcess(s.proc);
        running(null);
      }
    }
  }
  const kernel = spawnSync(["uname", "-r"]).stdout.toString().trim();
  console.log(`\n${cpus().length} x ${cpus()[0]?.model}, ${(totalmem() / GiB).toFixed(0)} GiB RAM, Linux ${kernel}; Bun ${Bun.version}`);
  console.log(`image 1 GiB (${fsType(dir)}), TCP 127.0.0.1, ${RUNTIME} s per fio workload, ${ROUNDS > 1 ? `best of ${ROUNDS} rounds` : "one round"}\n`);
  const has = (s: string) => SERVERS.includes(s);
  console.log(`| workload | unit | ${SERVERS.map((s) => NAME[s]).join(" | ")} |${has("bun-workers") && has("bun") ? " workers/one |" : ""}${has("bun-workers") && has("nbdkit") ? " workers/nbdkit |" : ""}${has("bun-workers") && has("qemu") ? " workers/qemu-nbd |" : ""} CPU s/GiB ${SERVERS.map((s) => NAME[s]).join(" / ")} |`);
  const extra = [has("bun-workers") && has("bun"), has("bun-workers") && has("nbdkit"), has("bun-workers") && has("qemu")].filter(Boolean).length;
  console.log(`|---|---|${SERVERS.map(() => "---:").join("|")}|${"---:|".repeat(extra)}---:|`);
  for (const w of WORKLOADS) {
    const r = (s: string) => results[`${w.id}/${s}`];
    const ratios = [
      has("bun-workers") && has("bun") ? ratio(r("bun-workers"), r("bun")) : null,
      has("bun-workers") && has("nbdkit") ? ratio(r("bun-workers"), r("nbdkit")) : null,
      has("bun-workers") && has("qemu") ? ratio(r("bun-workers"), r("qemu")) : null,
    ].filter((x) => x !== null);
    console.log(`| ${w.label} | ${w.unit} | ${SERVERS.map((s) => fmt(r(s)?.value, w.unit)).join(" | ")} |${ratios.map((x) => ` ${x} |`).join("")} ${SERVERS.map((s) => cpuPerGiB(r(s))).join(" / ")} |`);
  }
}

await main();
