// End-to-end benchmark of the cooked CD view: a large MODE1/2352 BIN (made with `bun-nbd cd make`
// from a random ISO) served by bun-nbd as `disc` (2048-byte user data strided out of 2352-byte
// sectors), against the same ISO served as a plain file by bun-nbd and by nbdkit. fio nbd-engine
// workloads: 64 KiB sequential reads (QD8) and 2 KiB random reads (QD1, QD16). Prints a Markdown
// table with the ratio cooked / bun-nbd plain (target: at least 0.7x) and cooked / nbdkit plain.
//
//   bun bench/cd-e2e.ts [--size-mib N (default 640)] [--runtime SECONDS (default 8)] [--rounds N] [--dir DIR]
//
// Servers listen on 127.0.0.1 ports 12520-12522.
import { spawn, spawnSync, type Subprocess } from "bun";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { CLK_TCK, cpuTicks, fio, fsType, PATH, ROOT, waitPort, writeRandomImage } from "./lib/harness.ts";

const { values: opt } = parseArgs({
  options: { "size-mib": { type: "string" }, runtime: { type: "string" }, rounds: { type: "string" }, dir: { type: "string" } },
});
const MiB = 1024 * 1024;
const SIZE = Number(opt["size-mib"] ?? 640) * MiB;
const RUNTIME = Number(opt.runtime ?? 8);
const ROUNDS = Math.max(1, Number(opt.rounds ?? 1));
const dir = mkdtempSync(join(opt.dir ?? tmpdir(), "bun-nbd-cd-bench-"));
let current: Subprocess | null = null;
process.on("exit", () => {
  if (current && current.exitCode === null) current.kill("SIGKILL");
  rmSync(dir, { recursive: true, force: true });
});

const WORKLOADS = [
  { id: "seq64k", label: "64 KiB sequential read, QD8", unit: "MB/s", args: ["--rw=read", "--bs=64k", "--iodepth=8"] },
  { id: "rand2k-qd1", label: "2 KiB random read, QD1", unit: "IOPS", args: ["--rw=randread", "--bs=2k", "--iodepth=1"] },
  { id: "rand2k-qd16", label: "2 KiB random read, QD16", unit: "IOPS", args: ["--rw=randread", "--bs=2k", "--iodepth=16"] },
] as const;

const SERVERS = [
  { id: "cooked", label: "bun-nbd cooked BIN", port: 12520 },
  { id: "plain", label: "bun-nbd plain ISO", port: 12521 },
  { id: "nbdkit", label: "nbdkit plain ISO", port: 12522 },
] as const;

function makeIso(path: string): void {
  writeRandomImage(path, SIZE, 0x2545f491);
}

async function start(server: (typeof SERVERS)[number], iso: string, cue: string) {
  const p = String(server.port);
  const cmd = server.id === "nbdkit"
    ? ["nbdkit", "-f", "-r", "-p", p, "-i", "127.0.0.1", "file", `file=${iso}`]
    : [process.execPath, join(ROOT, "src/cli.ts"), "serve", "-q", "-r", "-p", p, server.id === "cooked" ? cue : iso];
  const uri = server.id === "nbdkit" ? `nbd://127.0.0.1:${p}/` : `nbd://127.0.0.1:${p}/disc`;
  const proc = spawn(cmd, { stdout: "ignore", stderr: "inherit", stdin: "ignore", env: { ...process.env, PATH } });
  current = proc;
  await waitPort(uri, proc, server.label);
  return { proc, uri };
}

async function main(): Promise<void> {
  const iso = join(dir, "disc.iso");
  const cue = join(dir, "cooked", "disc.cue");
  console.error(`# making a ${SIZE / MiB} MiB ISO and its MODE1/2352 BIN in ${dir} (${fsType(dir)})`);
  makeIso(iso);
  spawnSync(["mkdir", "-p", join(dir, "cooked")]);
  const made = spawnSync([process.execPath, join(ROOT, "src/cli.ts"), "cd", "make", iso, cue, "--mode", "MODE1"], { env: { ...process.env, PATH } });
  if (made.exitCode !== 0) throw new Error(`cd make failed: ${made.stderr.toString()}`);
  spawnSync(["sync"]);
  const best: Record<string, Record<string, { value: number; cpu: number; bytes: number }>> = {};
  for (let round = 1; round <= ROUNDS; round++) {
    for (const server of SERVERS) {
      const s = await start(server, iso, cue);
      try {
        for (const w of WORKLOADS) {
          const c0 = cpuTicks(s.proc.pid);
          const r = fio(w.id, s.uri, [...w.args], SIZE, RUNTIME);
          const cpu = (cpuTicks(s.proc.pid) - c0) / CLK_TCK;
          const value = w.unit === "IOPS" ? r.iops : r.mbps;
          const prev = (best[server.id] ??= {})[w.id];
          if (!prev || value > prev.value) best[server.id]![w.id] = { value, cpu, bytes: r.bytes };
          console.error(`# round ${round} ${server.label.padEnd(20)} ${w.id.padEnd(12)} ${value.toFixed(0).padStart(8)} ${w.unit}  server CPU ${cpu.toFixed(2)} s`);
        }
      } finally {
        s.proc.kill("SIGTERM");
        await s.proc.exited;
        current = null;
      }
    }
  }
  const v = (s: string, w: string) => best[s]?.[w]?.value ?? NaN;
  const lines = [
    `| workload | unit | ${SERVERS.map((s) => s.label).join(" | ")} | cooked / bun-nbd plain | cooked / nbdkit plain |`,
    `|---|---|---:|---:|---:|---:|---:|`,
    ...WORKLOADS.map((w) => `| ${w.label} | ${w.unit} | ${SERVERS.map((s) => v(s.id, w.id).toFixed(0)).join(" | ")} | ${(v("cooked", w.id) / v("plain", w.id)).toFixed(2)}x | ${(v("cooked", w.id) / v("nbdkit", w.id)).toFixed(2)}x |`),
  ];
  console.log(`\n${SIZE / MiB} MiB MODE1/2352 BIN vs the same data as a 2048-byte ISO; fio nbd engine, ${RUNTIME} s per workload, best of ${ROUNDS}\n\n${lines.join("\n")}`);
}

await main();
