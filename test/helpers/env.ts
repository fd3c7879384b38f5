// Test environment: scratch directories, external tools, running commands with a timeout.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export const ROOT = new URL("../..", import.meta.url).pathname.replace(/\/$/, "");
export const CLI = join(ROOT, "src/cli.ts");
/** The bun binary running the tests (so child processes use the same one). */
export const BUN = process.execPath;

/** PATH with /usr/bin first: nbdsh and the libnbd python module need the system python3. */
export const SYSTEM_PATH = `/usr/bin:/usr/sbin:/bin:/sbin:${process.env.PATH ?? ""}`;

const made: string[] = [];
export function scratch(prefix = "bun-nbd-test-"): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  made.push(dir);
  return dir;
}
process.on("exit", () => {
  if (process.env.KEEP_SCRATCH) return;
  for (const d of made) rmSync(d, { recursive: true, force: true });
});

const which = new Map<string, boolean>();
export function have(tool: string): boolean {
  let v = which.get(tool);
  if (v === undefined) {
    v = Bun.spawnSync(["sh", "-c", `command -v ${tool}`], { env: { ...process.env, PATH: SYSTEM_PATH } }).exitCode === 0;
    which.set(tool, v);
  }
  return v;
}

/** Fail loudly (not skip) when a tool the suite needs is missing: CI installs them all. */
export function need(...tools: string[]): void {
  const missing = tools.filter((t) => !have(t));
  if (missing.length) throw new Error(`missing tools: ${missing.join(", ")} (run: npm run setup)`);
}

export interface RunResult { code: number; stdout: string; stderr: string }

/** Run a command with a timeout (default 120 s), PATH with /usr/bin first. Never throws on exit code. */
export async function run(cmd: string[], opts: { timeoutMs?: number; env?: Record<string, string>; cwd?: string; stdin?: Uint8Array } = {}): Promise<RunResult> {
  const proc = Bun.spawn(cmd, {
    stdout: "pipe", stderr: "pipe", stdin: opts.stdin ? "pipe" : "ignore", cwd: opts.cwd,
    env: { ...process.env, PATH: SYSTEM_PATH, ...opts.env },
  });
  if (opts.stdin) { proc.stdin!.write(opts.stdin); proc.stdin!.end(); }
  const timer = setTimeout(() => proc.kill("SIGKILL"), opts.timeoutMs ?? 120_000);
  const [stdout, stderr, code] = await Promise.all([
    new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited,
  ]);
  clearTimeout(timer);
  return { code, stdout, stderr };
}

/** Like run() but throws with the output when the exit code is not 0. */
export async function runOk(cmd: string[], opts: Parameters<typeof run>[1] = {}): Promise<RunResult> {
  const r = await run(cmd, opts);
  if (r.code !== 0) throw new Error(`${cmd.join(" ")} exited ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  return r;
}
