// Shared pieces of the end-to-end benchmark scripts: the PATH the tools need, a server's CPU
// ticks, waiting for an NBD server to answer and stopping it, and one fio nbd-engine run.
import { spawnSync, type Subprocess } from "bun";
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export const ROOT = new URL("../..", import.meta.url).pathname.replace(/\/$/, "");
/** /usr/bin first: the system python3 has the libnbd module, and the Debian tools live there. */
export const PATH = `/usr/bin:/usr/sbin:/bin:/sbin:${process.env.PATH ?? ""}`;
export const CLK_TCK = Number(spawnSync(["getconf", "CLK_TCK"]).stdout.toString().trim()) || 100;

export function fsType(path: string): string {
  const r = spawnSync(["df", "--output=fstype", path]);
  return r.stdout.toString().trim().split("\n").at(-1) ?? "?";
}

/** utime + stime of a process, in clock ticks. */
export function cpuTicks(pid: number): number {
  // fields after the ")" of comm: state is field 3; utime and stime are fields 14 and 15
  const s = readFileSync(`/proc/${pid}/stat`, "utf8");
  const f = s.slice(s.lastIndexOf(")") + 2).split(" ");
  return Number(f[11]) + Number(f[12]);
}

/** Poll with `nbdinfo --size` until the server answers. */
export async function waitPort(uri: string, proc: Subprocess, what: string): Promise<void> {
  const limit = Date.now() + 20_000;
  for (;;) {
    const r = spawnSync(["nbdinfo", "--size", uri], { env: { ...process.env, PATH } });
    if (r.exitCode === 0) return;
    if (proc.exitCode !== null) throw new Error(`${what} exited ${proc.exitCode}`);
    if (Date.now() > limit) throw new Error(`${what} did not come up`);
    await Bun.sleep(100);
  }
}

/**
 * A scratch directory under `parent` that is removed at exit (and on Ctrl-C), and `running(p)` to
 * name the server process that must be killed with it if the script dies midway.
 */
export function benchScratch(prefix: string, parent = tmpdir()): { dir: string; running: (p: Subprocess | null) => void } {
  const dir = mkdtempSync(join(parent, prefix));
  let current: Subprocess | null = null;
  const cleanup = () => {
    if (current && current.exitCode === null) current.kill("SIGKILL");
    rmSync(dir, { recursive: true, force: true });
  };
  process.on("exit", cleanup);
  process.on("SIGINT", () => { cleanup(); process.exit(130); });
  return { dir, running: (p) => { current = p; } };
}

/** SIGTERM, then SIGKILL after 10 s if the server has not exited; resolves once it has. */
export async function stopProcess(proc: Subprocess): Promise<void> {
  proc.kill("SIGTERM");
  const t = setTimeout(() => proc.kill("SIGKILL"), 10_000);
  await proc.exited;
  clearTimeout(t);
}

/** Throughput, bytes moved, and the completion latency's median and 99th percentile (µs). */
export interface FioResult { iops: number; mbps: number; bytes: number; p50: number; p99: number }

/** One time-based fio job with the nbd engine; `args` are fio's --rw/--bs/--iodepth options. */
export function fio(name: string, uri: string, args: string[], size: number, runtime: number): FioResult {
  const r = spawnSync(["fio", `--name=${name}`, "--ioengine=nbd", `--uri=${uri}`, ...args, `--size=${size}`,
    "--time_based", `--runtime=${runtime}`, "--randrepeat=1", "--random_generator=lfsr",
    "--norandommap", "--output-format=json"], { env: { ...process.env, PATH } });
  if (r.exitCode !== 0) throw new Error(`fio ${name} failed: ${r.stderr.toString()}`);
  const out = r.stdout.toString();
  const job = JSON.parse(out.slice(out.indexOf("{"))).jobs[0];
  const rw = args.some((a) => a.includes("write")) ? job.write : job.read;
  const pct = (rw.clat_ns?.percentile ?? {}) as Record<string, number>;
  return {
    iops: rw.iops, mbps: rw.bw_bytes / 1e6, bytes: job.read.io_bytes + job.write.io_bytes,
    p50: (pct["50.000000"] ?? NaN) / 1000, p99: (pct["99.000000"] ?? NaN) / 1000,
  };
}

/** Write `size` bytes of seeded xorshift32 noise (fully allocated, incompressible) to `path`. */
export function writeRandomImage(path: string, size: number, seed: number): void {
  const MiB = 1024 * 1024;
  const fd = openSync(path, "w");
  const block = new Uint8Array(MiB);
  let x = seed | 0 || 1;
  for (let p = 0; p < size; p += MiB) {
    for (let i = 0; i < block.length; i += 4) {
      x ^= x << 13; x ^= x >>> 17; x ^= x << 5;
      block[i] = x; block[i + 1] = x >>> 8; block[i + 2] = x >>> 16; block[i + 3] = x >>> 24;
    }
    writeSync(fd, block, 0, Math.min(MiB, size - p), p);
  }
  closeSync(fd);
}
