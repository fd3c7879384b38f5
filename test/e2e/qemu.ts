// Run qemu-system-x86_64 (TCG by default) with the serial port on stdout, timestamping every serial
// line as it arrives so tests can react to a line while the guest runs (e.g. kill a server) and
// report where the time went. Bounded twice: `timeout -s KILL` around QEMU (so a crashed test
// process leaves nothing behind for long) and a timer here.
import { appendFileSync, mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { SYSTEM_PATH } from "../helpers/env.ts";

export const ACCEL = process.env.BUN_NBD_E2E_ACCEL || "tcg";

export interface SerialLine { t: number; text: string }
export interface QemuResult {
  /** QEMU's exit status (null when killed by the timeout). */
  code: number | null;
  timedOut: boolean;
  lines: SerialLine[];
  serial: string;
  stderr: string;
  seconds: number;
}

export interface QemuOptions {
  timeoutMs: number;
  /** Called for every complete serial line (\r stripped), with seconds since QEMU started. */
  onLine?: (line: string, t: number) => void;
  /** Write serial.txt (host-timestamped) and qemu.err here. */
  logDir?: string;
}

export async function runQemu(args: string[], opts: QemuOptions): Promise<QemuResult> {
  const secs = Math.ceil(opts.timeoutMs / 1000) + 5;
  const t0 = performance.now();
  const proc = Bun.spawn(["timeout", "-s", "KILL", String(secs), "qemu-system-x86_64", "-accel", ACCEL, ...args], {
    stdin: "ignore", stdout: "pipe", stderr: "pipe", env: { ...process.env, PATH: SYSTEM_PATH },
  });
  let timedOut = false;
  // SIGTERM to `timeout` is forwarded to QEMU; SIGKILL would orphan QEMU, so only as a last resort
  let hard: ReturnType<typeof setTimeout> | undefined;
  const timer = setTimeout(() => {
    timedOut = true;
    proc.kill("SIGTERM");
    hard = setTimeout(() => proc.kill("SIGKILL"), 5_000);
  }, opts.timeoutMs);
  let log: string | undefined;
  if (opts.logDir) {
    mkdirSync(opts.logDir, { recursive: true });
    log = join(opts.logDir, "serial.txt");
    writeFileSync(log, "");
  }
  const lines: SerialLine[] = [];
  let serial = "";
  let partial = "";
  const pump = async () => {
    const dec = new TextDecoder();
    for await (const chunk of proc.stdout) {
      const s = dec.decode(chunk, { stream: true });
      serial += s;
      partial += s;
      let i: number;
      while ((i = partial.indexOf("\n")) >= 0) {
        const text = partial.slice(0, i).replace(/\r/g, "");
        partial = partial.slice(i + 1);
        const t = (performance.now() - t0) / 1000;
        lines.push({ t, text });
        if (log) appendFileSync(log, `${t.toFixed(2).padStart(7)} ${text}\n`);
        try { opts.onLine?.(text, t); } catch (e) { console.error("onLine:", e); }
      }
    }
    if (partial) lines.push({ t: (performance.now() - t0) / 1000, text: partial.replace(/\r/g, "") });
  };
  const [stderr, , code] = await Promise.all([new Response(proc.stderr).text(), pump(), proc.exited]);
  clearTimeout(timer);
  clearTimeout(hard);
  const seconds = (performance.now() - t0) / 1000;
  if (code === 137 || code === 124) timedOut = true;
  if (opts.logDir) {
    writeFileSync(join(opts.logDir, "qemu.err"), stderr);
  }
  return { code: timedOut ? null : code, timedOut, lines, serial, stderr, seconds };
}

/** A short tail of the serial output for failure messages. */
export function tail(r: QemuResult, n = 15): string {
  return r.lines.slice(-n).map((l) => `  ${l.t.toFixed(2)} | ${l.text}`).join("\n") + (r.stderr ? `\n  qemu stderr: ${r.stderr.trim().slice(0, 500)}` : "");
}
