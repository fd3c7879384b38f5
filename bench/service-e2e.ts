// Does running bun-nbd as a service cost anything on the hot path? The same fio nbd-engine
// workloads against one image served four ways: a plain `serve -p`, a socket inherited from
// systemd-socket-activate (Bun.listen on the passed fd), with --metrics on (the per-request counters
// and latency histogram), and from a --config file. Prints each and its ratio to the plain serve.
// Noisy on a shared 2-core machine: read the ratios, and run --rounds 3 to see the spread.
//
//   node_modules/.bin/bun bench/service-e2e.ts [--quick] [--rounds N] [--runtime S] [--dir DIR]
import { spawn, type Subprocess } from "bun";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { CLK_TCK, PATH, ROOT, cpuTicks, fio, fsType, waitPort, writeRandomImage } from "./lib/harness.ts";

const { values: o } = parseArgs({ options: { quick: { type: "boolean" }, rounds: { type: "string" }, runtime: { type: "string" }, dir: { type: "string" } } });
const MiB = 1 << 20;
const SIZE = (o.quick ? 256 : 1024) * MiB;
const RUNTIME = Number(o.runtime ?? (o.quick ? 3 : 8));
const ROUNDS = Number(o.rounds ?? 1);
const dir = o.dir ?? mkdtempSync(join(tmpdir(), "bun-nbd-service-bench-"));
mkdirSync(dir, { recursive: true });
const img = join(dir, "disk.img");
const CLI = join(ROOT, "src/cli.ts");

const WORKLOADS: [string, string[]][] = [
  ["4 KiB random read, QD32", ["--rw=randread", "--bs=4k", "--iodepth=32"]],
  ["1 MiB sequential read, QD16", ["--rw=read", "--bs=1m", "--iodepth=16"]],
  ["4 KiB random write, QD32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"]],
];

interface Mode { name: string; start(port: number): { proc: Subprocess; pid: () => number } }
const plain = (extra: string[]): Mode["start"] => (port) => {
  const proc = spawn([process.execPath, CLI, "serve", "-q", "-p", String(port), ...extra, img], { stdout: "ignore", stderr: "inherit" });
  return { proc, pid: () => proc.pid };
};
const MODES: Mode[] = [
  { name: "serve -p", start: plain([]) },
  {
    name: "socket-activated",
    start: (port) => {
      // systemd-socket-activate execs bun-nbd in its own process: the pid stays the same
      const proc = spawn(["systemd-socket-activate", "-l", `127.0.0.1:${port}`, process.execPath, CLI, "serve", "-q", img],
        { stdout: "ignore", stderr: "ignore", env: { ...process.env, PATH } });
      return { proc, pid: () => proc.pid };
    },
  },
  { name: "--metrics on", start: plain(["--metrics", "127.0.0.1:0"]) },
  {
    name: "--config file",
    start: (port) => {
      const cfg = join(dir, "bench.toml");
      writeFileSync(cfg, `[server]\nlisten = ["127.0.0.1:${port}"]\nquiet = true\n\n[[export]]\nname = "disk"\nfile = "${img}"\n`);
      const proc = spawn([process.execPath, CLI, "serve", "--config", cfg], { stdout: "ignore", stderr: "inherit" });
      return { proc, pid: () => proc.pid };
    },
  },
];

console.log(`service benchmark: ${SIZE / MiB} MiB image in ${dir} (${fsType(dir)}), fio ${RUNTIME}s per workload, ${ROUNDS} round(s)`);
writeRandomImage(img, SIZE, 3);
const best = new Map<string, number>();
const cpuPer = new Map<string, number>();
let port = 12900 + Math.floor(Math.random() * 90);
for (let round = 0; round < ROUNDS; round++) {
  for (const m of MODES) {
    const p = port++;
    const s = m.start(p);
    try {
      await waitPort(`nbd://127.0.0.1:${p}/disk`, s.proc, m.name);
      for (const [w, args] of WORKLOADS) {
        const c0 = cpuTicks(s.pid());
        const r = fio(w.replace(/\W+/g, "-"), `nbd://127.0.0.1:${p}/disk`, args, SIZE, RUNTIME);
        const cpu = (cpuTicks(s.pid()) - c0) / CLK_TCK;
        const key = `${m.name}|${w}`;
        const v = w.includes("MiB") ? r.mbps : r.iops;
        if (v > (best.get(key) ?? 0)) { best.set(key, v); cpuPer.set(key, cpu / (r.bytes / 2 ** 30)); }
      }
    } finally {
      s.proc.kill("SIGTERM");
      await s.proc.exited;
    }
  }
}
console.log(`\n| workload | ${MODES.map((m) => m.name).join(" | ")} |`);
console.log(`|---|${MODES.map(() => "---:").join("|")}|`);
for (const [w] of WORKLOADS) {
  const ref = best.get(`${MODES[0]!.name}|${w}`)!;
  const unit = w.includes("MiB") ? "MB/s" : "IOPS";
  const cells = MODES.map((m, i) => {
    const v = best.get(`${m.name}|${w}`)!;
    const cpu = cpuPer.get(`${m.name}|${w}`)!.toFixed(2);
    return i === 0 ? `${Math.round(v)} ${unit} (${cpu} CPU s/GiB)` : `${(v / ref).toFixed(2)}x (${cpu})`;
  });
  console.log(`| ${w} | ${cells.join(" | ")} |`);
}
if (!o.dir) rmSync(dir, { recursive: true, force: true });
