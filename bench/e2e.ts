// End-to-end benchmark: the same 1 GiB raw image served by bun-nbd, nbdkit (file plugin) and
// qemu-nbd, one after another, each driven by the same fio nbd-engine workloads and by
// `nbdcopy URI null:`. Prints a Markdown table of MB/s or IOPS per server, the ratios
// bun-nbd/nbdkit and bun-nbd/qemu-nbd, and server CPU seconds per GiB moved (utime+stime from
// /proc/PID/stat around each workload). Then the clients side by side: `bun-nbd copy URI null:`
// against `nbdcopy URI null:` on each server's export (bench/copy-e2e.ts does that one in more
// rounds and variants).
//
//   bun bench/e2e.ts [--quick] [--runtime SECONDS] [--rounds N] [--dir DIR]
//                    [--servers bun,nbdkit,qemu] [--only WORKLOAD,...] [--unix] [--json FILE] [--full] [--bun-args="--threads 4"]
//
// The first workload, "nbdcopy-first", is a whole-image nbdcopy right after the server started
// (every round starts each server afresh), before anything has warmed it; the later "nbdcopy-null"
// is the same copy on a server that has served the fio workloads.
//
// --full: then run the rest of the story, each script's own table after this one: this table over
// unix sockets, a writer in writeback with another client's read latency (writeback-e2e.ts), 8 and
// 32 concurrent clients with one process and --workers (workers-e2e.ts), the cooked CD view
// (cd-e2e.ts) and overlays against qemu-nbd (overlay-e2e.sh). About 25 minutes.
//
// --quick: a 256 MiB image and 3 s per workload. --rounds N: run the whole sequence (every server,
// one after another) N times and keep each server's best result per workload, which filters out
// interference on a shared machine (default 1).
//
// The image lives in DIR (default: the OS temp directory; the script prints its filesystem type:
// run it on a disk-backed filesystem, not tmpfs, or writes measure nothing real). Servers listen
// on 127.0.0.1 ports 12510-12512 (or unix sockets with --unix). Server flags:
//   bun-nbd   bun src/cli.ts serve -q -p 12510 IMG
//   nbdkit    nbdkit -f -p 12511 -i 127.0.0.1 file file=IMG           (defaults: 16 threads, parallel)
//   qemu-nbd  qemu-nbd -f raw -t -e 8 -p 12512 -b 127.0.0.1 IMG       (defaults: cache=writeback,
//             aio=threads; -e 8 lets nbdcopy open several connections, like the other two allow)
import { spawn, spawnSync, type Subprocess } from "bun";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { cpus, totalmem } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";

import { benchScratch, CLK_TCK, cpuTicks, fio, fsType, PATH, ROOT, stopProcess, waitPort, writeRandomImage } from "./lib/harness.ts";
const GiB = 1024 ** 3;
const MiB = 1024 ** 2;

const { values: opt } = parseArgs({
  options: {
    quick: { type: "boolean" },
    runtime: { type: "string" },
    rounds: { type: "string" },
    dir: { type: "string" },
    servers: { type: "string" },
    only: { type: "string" },
    unix: { type: "boolean" },
    json: { type: "string" },
    full: { type: "boolean" },
    "bun-args": { type: "string" },
    help: { type: "boolean", short: "h" },
  },
});
if (opt.help) {
  console.log(readFileSync(new URL(import.meta.url)).toString().split("\n").filter((l) => l.startsWith("//")).map((l) => l.slice(3)).join("\n"));
  process.exit(0);
}
const RUNTIME = Number(opt.runtime ?? (opt.quick ? 3 : 10));
const SIZE = opt.quick ? GiB / 4 : GiB;
const ROUNDS = Math.max(1, Number(opt.rounds ?? 1));
const SERVERS = (opt.servers ?? "bun,nbdkit,qemu").split(",");

interface Workload { id: string; label: string; unit: "MB/s" | "IOPS"; fio?: string[]; copy?: string[] }
const WORKLOADS: Workload[] = [
  { id: "nbdcopy-first", label: "nbdcopy URI null:, first copy after server start", unit: "MB/s", copy: ["nbdcopy"] },
  { id: "seqread-1m-qd16", label: "1 MiB sequential read, QD16", unit: "MB/s", fio: ["--rw=read", "--bs=1m", "--iodepth=16"] },
  { id: "randread-4k-qd1", label: "4 KiB random read, QD1", unit: "IOPS", fio: ["--rw=randread", "--bs=4k", "--iodepth=1"] },
  { id: "randread-4k-qd32", label: "4 KiB random read, QD32", unit: "IOPS", fio: ["--rw=randread", "--bs=4k", "--iodepth=32"] },
  { id: "randwrite-4k-qd32", label: "4 KiB random write, QD32", unit: "IOPS", fio: ["--rw=randwrite", "--bs=4k", "--iodepth=32"] },
  { id: "seqwrite-64k-qd8", label: "64 KiB sequential write, QD8", unit: "MB/s", fio: ["--rw=write", "--bs=64k", "--iodepth=8"] },
  { id: "nbdcopy-null", label: "nbdcopy URI null: (whole image)", unit: "MB/s", copy: ["nbdcopy"] },
  { id: "bun-copy-null", label: "bun-nbd copy URI null: (whole image)", unit: "MB/s", copy: [process.execPath, join(ROOT, "src/cli.ts"), "copy", "-q"] },
];

if (opt.only) {
  const keep = opt.only.split(",");
  for (const id of keep) if (!WORKLOADS.some((w) => w.id === id)) throw new Error(`unknown workload ${id} (one of ${WORKLOADS.map((w) => w.id).join(", ")})`);
  WORKLOADS.splice(0, WORKLOADS.length, ...WORKLOADS.filter((w) => keep.includes(w.id)));
}

/** `p50`/`p99`: fio's completion latency in µs (fio workloads only). */
interface Result { value: number; bytes: number; cpu: number; seconds: number; p50?: number; p99?: number }
type Results = Record<string, Record<string, Result>>;

const { dir, running } = benchScratch("bun-nbd-e2e-", opt.dir);

function makeImage(path: string): void {
  writeRandomImage(path, SIZE, 0x9e3779b9);
  spawnSync(["sync"]);
}

interface Started { proc: Subprocess; uri: string; pid: number }

async function start(server: string, img: string): Promise<Started> {
  const port = { bun: 12510, nbdkit: 12511, qemu: 12512 }[server]!;
  const sock = join(dir, `${server}.sock`);
  const tcp = !opt.unix;
  rmSync(sock, { force: true }); // nbdkit refuses a socket path left by the last round
  let cmd: string[];
  let uri: string;
  if (server === "bun") {
    cmd = [process.execPath, join(ROOT, "src/cli.ts"), "serve", "-q", ...(opt["bun-args"]?.split(" ").filter(Boolean) ?? []), ...(tcp ? ["-p", String(port)] : ["-k", sock]), img];
    uri = tcp ? `nbd://127.0.0.1:${port}/` : `nbd+unix:///?socket=${sock}`;
  } else if (server === "nbdkit") {
    cmd = ["nbdkit", "-f", ...(tcp ? ["-p", String(port), "-i", "127.0.0.1"] : ["-U", sock]), "file", `file=${img}`];
    uri = tcp ? `nbd://127.0.0.1:${port}/` : `nbd+unix:///?socket=${sock}`;
  } else if (server === "qemu") {
    cmd = ["qemu-nbd", "-f", "raw", "-t", "-e", "8", ...(tcp ? ["-p", String(port), "-b", "127.0.0.1"] : ["-k", sock]), img];
    uri = tcp ? `nbd://127.0.0.1:${port}/` : `nbd+unix:///?socket=${sock}`;
  } else throw new Error(`unknown server ${server}`);
  const proc = spawn(cmd, { stdout: "ignore", stderr: "inherit", stdin: "ignore", env: { ...process.env, PATH } });
  running(proc);
  await waitPort(uri, proc, server);
  return { proc, uri, pid: proc.pid };
}

async function stop(s: Started): Promise<void> {
  await stopProcess(s.proc);
  running(null);
}

function runFio(uri: string, w: Workload): { value: number; bytes: number; p50: number; p99: number } {
  const r = fio(w.id, uri, w.fio!, SIZE, RUNTIME);
  return { value: w.unit === "IOPS" ? r.iops : r.mbps, bytes: r.bytes, p50: r.p50, p99: r.p99 };
}

/** A whole-image copy to a null sink, timed as a whole process (start-up included). */
function runCopy(uri: string, w: Workload): { value: number; bytes: number } {
  const t0 = performance.now();
  const r = spawnSync([...w.copy!, uri, "null:"], { env: { ...process.env, PATH } });
  const secs = (performance.now() - t0) / 1000;
  if (r.exitCode !== 0) throw new Error(`${w.copy!.join(" ")} failed: ${r.stderr.toString()}`);
  return { value: SIZE / secs / 1e6, bytes: SIZE };
}

function fmt(v: number | undefined, unit: string): string {
  if (v === undefined || !Number.isFinite(v)) return "-";
  return unit === "IOPS" ? Math.round(v).toLocaleString("en-US") : v.toFixed(0);
}
const ratio = (a?: Result, b?: Result) => (a && b && b.value > 0 ? `${(a.value / b.value).toFixed(2)}x` : "-");
const cpu = (r?: Result) => (r ? (r.cpu / (r.bytes / GiB)).toFixed(2) : "-");

function machine(): string {
  const cpuModel = cpus()[0]?.model ?? "?";
  const kernel = spawnSync(["uname", "-r"]).stdout.toString().trim();
  const v = (cmd: string[]) => spawnSync(cmd, { env: { ...process.env, PATH } }).stdout.toString().split("\n")[0]!.trim();
  return [
    `${cpus().length} x ${cpuModel}, ${(totalmem() / GiB).toFixed(0)} GiB RAM, Linux ${kernel}`,
    `image: ${(SIZE / GiB).toFixed(2)} GiB in ${dir} (${fsType(dir)}), transport ${opt.unix ? "unix socket" : "TCP 127.0.0.1"}`,
    `Bun ${Bun.version}; ${v(["nbdkit", "--version"])}; ${v(["qemu-nbd", "--version"])}; ${v(["fio", "--version"])}; nbdcopy ${v(["nbdcopy", "--version"]).replace(/^nbdcopy /, "")}`,
    `fio: ioengine=nbd, time_based runtime=${RUNTIME}s (no ramp, so CPU and bytes cover the same interval), size=${SIZE / MiB} MiB, one job; ${ROUNDS > 1 ? `best of ${ROUNDS} rounds` : "one round"}`,
  ].join("\n");
}

async function main(): Promise<void> {
  const img = join(dir, "bench.img");
  const type = fsType(dir);
  console.error(`# creating a ${(SIZE / GiB).toFixed(2)} GiB image in ${dir} (${type})`);
  if (type === "tmpfs" || type === "ramfs") console.error("# warning: the image is on tmpfs; use --dir on a disk-backed filesystem");
  makeImage(img);
  const results: Results = {};
  for (let round = 1; round <= ROUNDS; round++) {
    for (const server of SERVERS) {
      results[server] ??= {};
      const s = await start(server, img);
      try {
        for (const w of WORKLOADS) {
          const c0 = cpuTicks(s.pid);
          const t0 = performance.now();
          const r = w.copy ? runCopy(s.uri, w) : runFio(s.uri, w);
          const seconds = (performance.now() - t0) / 1000;
          const cpuS = (cpuTicks(s.pid) - c0) / CLK_TCK;
          const prev = results[server]![w.id];
          if (!prev || r.value > prev.value) results[server]![w.id] = { ...r, cpu: cpuS, seconds };
          console.error(`# round ${round} ${server.padEnd(6)} ${w.id.padEnd(18)} ${fmt(r.value, w.unit).padStart(9)} ${w.unit}  server CPU ${cpuS.toFixed(2)} s for ${(r.bytes / GiB).toFixed(2)} GiB`);
        }
      } finally {
        await stop(s);
      }
    }
  }
  const name = (s: string) => ({ bun: "bun-nbd", nbdkit: "nbdkit", qemu: "qemu-nbd" }[s] ?? s);
  const lines = [
    `| workload | unit | ${SERVERS.map(name).join(" | ")} | bun-nbd/nbdkit | bun-nbd/qemu-nbd | CPU s/GiB ${SERVERS.map(name).join(" / ")} |`,
    `|---|---|${SERVERS.map(() => "---:").join("|")}|---:|---:|---:|`,
  ];
  for (const w of WORKLOADS) {
    if (w.id === "bun-copy-null") continue; // a client workload: in the second table
    const r = (s: string) => results[s]?.[w.id];
    lines.push(`| ${w.label} | ${w.unit} | ${SERVERS.map((s) => fmt(r(s)?.value, w.unit)).join(" | ")} | ${ratio(r("bun"), r("nbdkit"))} | ${ratio(r("bun"), r("qemu"))} | ${SERVERS.map((s) => cpu(r(s))).join(" / ")} |`);
  }
  const clients = ["", "Clients on the same export, whole image to null: (MB/s, best of the rounds):", "",
    `| client | ${SERVERS.map(name).join(" | ")} |`, `|---|${SERVERS.map(() => "---:").join("|")}|`];
  const copyOf = (id: string, s: string) => results[s]?.[id];
  clients.push(`| nbdcopy | ${SERVERS.map((s) => fmt(copyOf("nbdcopy-null", s)?.value, "MB/s")).join(" | ")} |`);
  clients.push(`| bun-nbd copy | ${SERVERS.map((s) => fmt(copyOf("bun-copy-null", s)?.value, "MB/s")).join(" | ")} |`);
  clients.push(`| bun-nbd copy / nbdcopy | ${SERVERS.map((s) => ratio(copyOf("bun-copy-null", s), copyOf("nbdcopy-null", s))).join(" | ")} |`);
  const haveClients = WORKLOADS.some((w) => w.id === "bun-copy-null");
  // Per-request latency where it is the point: QD1 (from each server's best round).
  const lat = ["", "Completion latency per request at QD1 (fio clat, µs, from each server's best round):", "",
    `| workload | ${SERVERS.map((s) => `${name(s)} p50 / p99`).join(" | ")} |`, `|---|${SERVERS.map(() => "---:").join("|")}|`];
  const us = (v?: number) => (v === undefined || !Number.isFinite(v) ? "-" : v.toFixed(0));
  for (const w of WORKLOADS.filter((x) => x.fio?.includes("--iodepth=1"))) {
    lat.push(`| ${w.label} | ${SERVERS.map((s) => `${us(results[s]?.[w.id]?.p50)} / ${us(results[s]?.[w.id]?.p99)}`).join(" | ")} |`);
  }
  const haveLat = lat.length > 5;
  console.log(`\n${machine()}\n\n${lines.join("\n")}${haveClients ? `\n${clients.join("\n")}` : ""}${haveLat ? `\n${lat.join("\n")}` : ""}`);
  if (opt.json) writeFileSync(opt.json, JSON.stringify({ machine: machine(), runtime: RUNTIME, size: SIZE, results }, null, 2));
}

await main();

if (opt.full) {
  // The rest of the story, one script after another, each printing its own table.
  const dirArgs = opt.dir ? ["--dir", opt.dir] : [];
  const rounds = opt.rounds ? ["--rounds", opt.rounds] : [];
  const steps: [string, string[], Record<string, string>?][] = [
    ["bench/e2e.ts over unix sockets", [process.execPath, join(ROOT, "bench/e2e.ts"), "--unix", "--runtime", String(RUNTIME), ...rounds, ...dirArgs]],
    ["bench/writeback-e2e.ts", [process.execPath, join(ROOT, "bench/writeback-e2e.ts"), ...rounds, ...dirArgs]],
    ["bench/workers-e2e.ts", [process.execPath, join(ROOT, "bench/workers-e2e.ts"), "--runtime", String(Math.min(RUNTIME, 6)), ...dirArgs]],
    ["bench/cd-e2e.ts", [process.execPath, join(ROOT, "bench/cd-e2e.ts"), "--size-mib", "256", "--runtime", "4", ...rounds, ...dirArgs]],
    ["bench/overlay-e2e.sh", ["bash", join(ROOT, "bench/overlay-e2e.sh")], { RUNTIME: "5", ...(opt.dir ? { TMPDIR: opt.dir } : {}) }],
  ];
  for (const [what, cmd, env] of steps) {
    console.log(`\n## ${what}\n`);
    const r = spawnSync(cmd, { env: { ...process.env, PATH, ...env }, stdout: "inherit", stderr: "inherit" });
    if (r.exitCode !== 0) console.log(`(${what} failed with exit code ${r.exitCode})`);
  }
}

