// One boot of the kernel-client guest: Debian's kernel + nbd.ko + nbd-client in QEMU (TCG), the
// host's NBD servers reachable only through slirp (restrict=on) guestfwd `cmd:` connectors
// (10.0.2.100 + i → busybox nc 127.0.0.1 PORT_i, one connector process per guest connection, so
// `nbd-client -C 2` gets two). The guest runs the steps given as shell (calls of the t_*
// functions in guest/init) and prints machine-readable lines, parsed here per step.
import { writeFileSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { guestFiles, overlayArchive } from "./initramfs.ts";
import { runQemu, tail, type QemuResult } from "./qemu.ts";
import type { E2EServer } from "./server.ts";

export interface StepResult {
  name: string;
  rc: number | null;
  secs: number;
  /** Payloads of "NBDTEST <name> ..." lines. */
  lines: string[];
  fails: string[];
}

export interface GuestRun {
  qemu: QemuResult;
  steps: Map<string, StepResult>;
  done: { fails: number; secs: number } | null;
  /** Host-side seconds at which each NBDTEST-KILL was acted on. */
  kills: { server: number; t: number }[];
  warnings: string[];
  cacheTimings: Record<string, number>;
  /** A readable summary for failure messages. */
  describe(): string;
}

export interface GuestOptions {
  servers: E2EServer[];
  /** Shell run by the guest's init, e.g. `step netlink t_rw 0 disk /dev/nbd0 134217728`. */
  steps: string;
  smp?: number;
  timeoutMs?: number;
  logDir: string;
}

export async function runGuest(opts: GuestOptions): Promise<GuestRun> {
  const g = await guestFiles();
  mkdirSync(opts.logDir, { recursive: true });
  // per-boot initrd: the cached initramfs plus a second gzip'd cpio with /steps.sh
  const initrd = join(opts.logDir, "initrd.gz");
  const base = await Bun.file(g.initramfs).bytes();
  const timeoutMs = opts.timeoutMs ?? Number(process.env.BUN_NBD_E2E_KERNEL_TIMEOUT_MS || 240_000);
  // the guest's own watchdog fires well before the host's timeout, so a hang still gets diagnosed
  const stepsSh = `watchdog ${Math.max(20, Math.floor(timeoutMs / 1000) - 40)}\n${opts.steps}\n`;
  const extra = overlayArchive({ "steps.sh": { data: stepsSh, mode: 0o644 } });
  writeFileSync(initrd, Buffer.concat([base, extra]));
  writeFileSync(join(opts.logDir, "steps.sh"), stepsSh);

  const fwds = opts.servers.map((s, i) => `guestfwd=tcp:10.0.2.${100 + i}:10809-cmd:${g.busybox} nc 127.0.0.1 ${s.port}`);
  const args = [
    "-m", "256", "-smp", String(opts.smp ?? 1), "-nodefaults", "-no-reboot", "-display", "none", "-serial", "stdio",
    "-kernel", g.kernel, "-initrd", initrd, "-append", "console=ttyS0 panic=-1 quiet",
    "-netdev", ["user", "id=n0", "restrict=on", ...fwds].join(","),
    "-device", "e1000,netdev=n0,romfile=,autonegotiation=off",
  ];
  const steps = new Map<string, StepResult>();
  const kills: GuestRun["kills"] = [];
  const warnings: string[] = [];
  let done: GuestRun["done"] = null;
  const get = (name: string) => {
    let s = steps.get(name);
    if (!s) { s = { name, rc: null, secs: 0, lines: [], fails: [] }; steps.set(name, s); }
    return s;
  };
  const onLine = (line: string, t: number) => {
    let m: RegExpExecArray | null;
    if ((m = /^NBDTEST-KILL (\d+)/.exec(line))) {
      const i = Number(m[1]);
      opts.servers[i]?.kill9();
      kills.push({ server: i, t });
    } else if ((m = /^NBDTEST-STEP (\S+) end rc=(\d+) secs=([\d.]+)/.exec(line))) {
      const s = get(m[1]!); s.rc = Number(m[2]); s.secs = Number(m[3]);
    } else if ((m = /^NBDTEST-STEP (\S+) begin/.exec(line))) {
      get(m[1]!);
    } else if ((m = /^NBDTEST-FAIL (\S+): (.*)$/.exec(line))) {
      get(m[1]!).fails.push(m[2]!);
    } else if ((m = /^NBDTEST-DONE fails=(\d+) secs=([\d.]+)/.exec(line))) {
      done = { fails: Number(m[1]), secs: Number(m[2]) };
    } else if ((m = /^NBDTEST (\S+) (.*)$/.exec(line))) {
      get(m[1]!).lines.push(m[2]!);
    }
    if (/Connection timed out/.test(line)) warnings.push(`t=${t.toFixed(1)}s: ${line.trim()}`);
  };
  const qemu = await runQemu(args, { timeoutMs, onLine, logDir: opts.logDir });
  return {
    qemu, steps, done, kills, warnings, cacheTimings: g.timings,
    describe: () => {
      const st = [...steps.values()].map((s) => `${s.name}: rc=${s.rc} ${s.secs}s${s.fails.length ? " FAIL " + s.fails.join("; ") : ""}`).join("\n  ");
      return `qemu exit ${qemu.code}${qemu.timedOut ? " (timed out)" : ""} after ${qemu.seconds.toFixed(1)}s, done=${JSON.stringify(done)}\n  ${st}\n${tail(qemu, 25)}\n  logs: ${opts.logDir}`;
    },
  };
}

/** key=value pairs from a step's lines that start with `prefix` (the first such line). */
export function fields(step: StepResult | undefined, prefix: string): Record<string, string> | undefined {
  const line = step?.lines.find((l) => l === prefix || l.startsWith(prefix + " ") || l.startsWith(prefix + "="));
  if (line === undefined) return undefined;
  const out: Record<string, string> = {};
  for (const m of line.matchAll(/([\w./-]+)=(\S*)/g)) out[m[1]!] = m[2]!;
  return out;
}

/** Every `read KEY off=.. len=.. md5=..` line of a step. */
export function reads(step: StepResult | undefined): { key: string; off: number; len: number; md5: string }[] {
  const out = [];
  for (const l of step?.lines ?? []) {
    const m = /^read (\S+) off=(\d+) len=(\d+) md5=([0-9a-f]+)/.exec(l);
    if (m) out.push({ key: m[1]!, off: Number(m[2]), len: Number(m[3]), md5: m[4]! });
  }
  return out;
}

/** The bytes the guest writes: `yes NBD-KERNEL-CLIENT-WRITE-PATTERN | head -c n`. */
export function guestPattern(n: number): Uint8Array {
  const unit = Buffer.from("NBD-KERNEL-CLIENT-WRITE-PATTERN\n");
  const out = new Uint8Array(n);
  for (let o = 0; o < n; o += unit.length) out.set(unit.subarray(0, Math.min(unit.length, n - o)), o);
  return out;
}
