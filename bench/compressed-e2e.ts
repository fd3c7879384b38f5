// End-to-end benchmark for compressed images: the same .img.xz and .img.gz served by bun-nbd and by
// nbdkit's filters (`nbdkit --filter=xz file FILE.xz`, `nbdkit --filter=gzip file FILE.gz`), one
// server at a time, each driven by the same fio nbd-engine workloads (sequential 1 MiB reads at
// QD16, random 4 KiB reads at QD1 and QD32, run in that order on one server process, so whatever a
// server caches during the sequential pass helps it later, for both alike). Also the time from
// starting a server to the first 4 KiB read in the middle of the image ("first open": bun-nbd
// builds its gzip index, nbdkit's gzip filter decompresses the file), and bun-nbd's second open
// with the index cached. Prints a Markdown table with the ratios bun-nbd/nbdkit.
//
//   bun bench/compressed-e2e.ts [--quick] [--size MiB] [--runtime SECONDS] [--rounds N] [--dir DIR] [--only xz,gzip]
//
// --quick: a 64 MiB image and 3 s per workload (default 256 MiB, 10 s). The image is disk-like:
// 64 KiB runs of random bytes (30%), of text (40%) and of zeros (30%). xz -T0 (multi-block) and
// gzip -6 compress it. Servers listen on unix sockets in the scratch directory (no port to collide
// with other benchmarks on a shared machine; the same transport for both). --rounds N repeats each
// server's run (a fresh process, an empty index cache) N times and keeps its best result per
// workload and its fastest open, which filters out some interference on a shared machine.
import { spawn, spawnSync, type Subprocess } from "bun";
import { closeSync, openSync, rmSync, writeSync } from "node:fs";
import { cpus, tmpdir, totalmem } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { benchScratch, fio, fsType, PATH, ROOT } from "./lib/harness.ts";

const MiB = 1024 * 1024;
const { values: opt } = parseArgs({
  options: {
    quick: { type: "boolean" }, size: { type: "string" }, runtime: { type: "string" }, rounds: { type: "string" }, dir: { type: "string" },
    only: { type: "string" }, help: { type: "boolean", short: "h" },
  },
});
if (opt.help) {
  console.log("bun bench/compressed-e2e.ts [--quick] [--size MiB] [--runtime SECONDS] [--dir DIR] [--only xz,gzip]");
  process.exit(0);
}
const SIZE = Number(opt.size ?? (opt.quick ? 64 : 256)) * MiB;
const RUNTIME = Number(opt.runtime ?? (opt.quick ? 3 : 10));
const FORMATS = (opt.only ?? "xz,gzip").split(",") as ("xz" | "gzip")[];
const ROUNDS = Math.max(1, Number(opt.rounds ?? 1));
const { dir, running } = benchScratch("bun-nbd-cbench-", opt.dir ?? tmpdir());
const cacheDir = join(dir, "cache");

const WORKLOADS = [
  { id: "seq-1m-qd16", label: "1 MiB sequential read, QD16", unit: "MB/s", fio: ["--rw=read", "--bs=1m", "--iodepth=16"] },
  { id: "rand-4k-qd1", label: "4 KiB random read, QD1", unit: "IOPS", fio: ["--rw=randread", "--bs=4k", "--iodepth=1"] },
  { id: "rand-4k-qd32", label: "4 KiB random read, QD32", unit: "IOPS", fio: ["--rw=randread", "--bs=4k", "--iodepth=32"] },
] as const;

function makeImage(path: string): void {
  const fd = openSync(path, "w");
  const run = new Uint8Array(65536);
  const words = ["block ", "device ", "network ", "sector ", "kernel ", "partition ", "ext4 ", "inode ", "superblock "].map((w) => new TextEncoder().encode(w));
  let x = 0x2545f491;
  const rnd = () => { x ^= x << 13; x ^= x >>> 17; x ^= x << 5; return x >>> 0; };
  for (let p = 0; p < SIZE; p += run.length) {
    const k = rnd() % 10;
    if (k < 3) for (let i = 0; i < run.length; i += 4) { const v = rnd(); run[i] = v; run[i + 1] = v >>> 8; run[i + 2] = v >>> 16; run[i + 3] = v >>> 24; }
    else if (k < 7) for (let i = 0; i < run.length;) { const w = words[rnd() % words.length]!; for (let j = 0; j < w.length && i < run.length; j++) run[i++] = w[j]!; }
    else run.fill(0);
    writeSync(fd, run, 0, Math.min(run.length, SIZE - p), p);
  }
  closeSync(fd);
}

function sh(cmd: string): number {
  const t0 = performance.now();
  const r = spawnSync(["sh", "-c", cmd], { cwd: dir, env: { ...process.env, PATH } });
  if (r.exitCode !== 0) throw new Error(`${cmd}: ${r.stderr.toString()}`);
  return (performance.now() - t0) / 1000;
}

interface Started { proc: Subprocess; uri: string; ready: number; firstRead: number }

async function start(server: "bun" | "nbdkit", file: string, format: "xz" | "gzip"): Promise<Started> {
  const sock = join(dir, `${server}.sock`);
  rmSync(sock, { force: true });
  const cmd = server === "bun"
    ? [process.execPath, join(ROOT, "src/cli.ts"), "serve", "-q", "-k", sock, file]
    : ["nbdkit", "-f", "-U", sock, `--filter=${format}`, "file", `file=${file}`];
  const uri = `nbd+unix:///?socket=${sock}`;
  const t0 = performance.now();
  const proc = spawn(cmd, { stdout: "ignore", stderr: "inherit", stdin: "ignore", env: { ...process.env, PATH, BUN_NBD_CACHE_DIR: cacheDir } });
  running(proc);
  for (;;) {
    if (spawnSync(["nbdinfo", "--size", uri], { env: { ...process.env, PATH } }).exitCode === 0) break;
    if (proc.exitCode !== null) throw new Error(`${server} exited ${proc.exitCode}`);
    if (performance.now() - t0 > 600_000) throw new Error(`${server} did not come up`);
    await Bun.sleep(20);
  }
  const ready = (performance.now() - t0) / 1000;
  const r = spawnSync(["qemu-io", "-r", "-f", "raw", "-c", `read ${Math.floor(SIZE / 2 / 4096) * 4096} 4k`, uri], { env: { ...process.env, PATH } });
  if (r.exitCode !== 0 || !/read 4096\/4096/.test(r.stdout.toString())) throw new Error(`first read from ${server} failed: ${r.stdout}${r.stderr}`);
  return { proc, uri, ready, firstRead: (performance.now() - t0) / 1000 };
}

async function stop(s: Started): Promise<void> {
  s.proc.kill("SIGTERM");
  const t = setTimeout(() => s.proc.kill("SIGKILL"), 10_000);
  await s.proc.exited;
  clearTimeout(t);
  running(null);
}

const fmt = (v: number | undefined, unit: string) => v === undefined ? "-" : unit === "IOPS" ? Math.round(v).toLocaleString("en-US") : v.toFixed(0);
const ratio = (a?: number, b?: number) => (a !== undefined && b ? `${(a / b).toFixed(2)}x` : "-");

async function main(): Promise<void> {
  const img = join(dir, "disk.img");
  console.error(`# a ${SIZE / MiB} MiB disk-like image in ${dir} (${fsType(dir)})`);
  makeImage(img);
  const compressTimes: Record<string, number> = {};
  if (FORMATS.includes("xz")) compressTimes.xz = sh("xz -T0 -k disk.img");
  if (FORMATS.includes("gzip")) compressTimes.gzip = sh("gzip -6 -k disk.img");
  const sizes: Record<string, number> = {};
  for (const f of FORMATS) sizes[f] = Bun.file(join(dir, f === "xz" ? "disk.img.xz" : "disk.img.gz")).size;
  const rows: string[] = [];
  const opens: string[] = [];
  for (const format of FORMATS) {
    const file = join(dir, format === "xz" ? "disk.img.xz" : "disk.img.gz");
    const res: Record<string, Record<string, number>> = { bun: {}, nbdkit: {} };
    const best: Record<string, [number, number]> = {};
    const keep = (key: string, ready: number, first: number) => { if (!best[key] || first < best[key]![1]) best[key] = [ready, first]; };
    for (let round = 1; round <= ROUNDS; round++) {
      for (const server of ["bun", "nbdkit"] as const) {
        rmSync(cacheDir, { recursive: true, force: true });
        const s = await start(server, file, format);
        try {
          keep(`${server} first`, s.ready, s.firstRead);
          console.error(`# round ${round} ${format} ${server}: ready after ${s.ready.toFixed(2)} s, first read done after ${s.firstRead.toFixed(2)} s`);
          for (const w of WORKLOADS) {
            const r = fio(w.id, s.uri, [...w.fio], SIZE, RUNTIME);
            const v = w.unit === "IOPS" ? r.iops : r.mbps;
            res[server]![w.id] = Math.max(res[server]![w.id] ?? 0, v);
            console.error(`# round ${round} ${format} ${server.padEnd(6)} ${w.id.padEnd(13)} ${fmt(v, w.unit).padStart(9)} ${w.unit}`);
          }
        } finally {
          await stop(s);
        }
        if (server === "bun") {
          const again = await start("bun", file, format);
          keep("bun second", again.ready, again.firstRead);
          await stop(again);
        }
      }
    }
    for (const [key, label] of [["bun first", "bun-nbd | first open"], ["bun second", "bun-nbd | second open (index cached)"], ["nbdkit first", "nbdkit | first open"]] as const) {
      opens.push(`| ${format} | ${label} | ${best[key]![0].toFixed(2)} | ${best[key]![1].toFixed(2)} |`);
    }
    for (const w of WORKLOADS) {
      rows.push(`| ${format} | ${w.label} | ${w.unit} | ${fmt(res.bun![w.id], w.unit)} | ${fmt(res.nbdkit![w.id], w.unit)} | ${ratio(res.bun![w.id], res.nbdkit![w.id])} |`);
    }
  }
  const v = (cmd: string[]) => spawnSync(cmd, { env: { ...process.env, PATH } }).stdout.toString().split("\n")[0]!.trim();
  console.log([
    `${cpus().length} x ${cpus()[0]?.model ?? "?"}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB RAM; Bun ${Bun.version}; ${v(["nbdkit", "--version"])}; ${v(["fio", "--version"])}`,
    `image: ${SIZE / MiB} MiB disk-like; ${FORMATS.map((f) => `${f}: ${(sizes[f]! / MiB).toFixed(1)} MiB (compressed in ${compressTimes[f]!.toFixed(1)} s)`).join("; ")}; unix sockets; fio runtime ${RUNTIME} s per workload, ${ROUNDS > 1 ? `best of ${ROUNDS} rounds` : "one run"}`,
    "",
    "| format | workload | unit | bun-nbd | nbdkit | bun-nbd/nbdkit |",
    "|---|---|---|---:|---:|---:|",
    ...rows,
    "",
    "| format | server | open | ready (s) | first 4 KiB read done (s) |",
    "|---|---|---|---:|---:|",
    ...opens,
  ].join("\n"));
}

await main();
