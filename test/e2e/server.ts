// The server under test, behind one function. BUN_NBD_E2E_SERVER=nbdkit runs the same tests
// against nbdkit's file plugin (how this harness was proven before bun-nbd's serve existed, and a
// quick way to tell a harness fault from a server fault); the default is bun-nbd's real CLI.
import { dirname, basename } from "node:path";
import type { Subprocess } from "bun";
import { serve } from "../helpers/server.ts";
import { SYSTEM_PATH } from "../helpers/env.ts";

export const BACKEND = (process.env.BUN_NBD_E2E_SERVER || "bun-nbd") as "bun-nbd" | "nbdkit";

export interface E2EServer {
  port: number;
  /** nbd://127.0.0.1:PORT/NAME */
  uri(name?: string): string;
  output(): string;
  /** Graceful stop (SIGTERM); returns the exit code. */
  stop(): Promise<number>;
  /** kill -9 now (no chance to flush anything). */
  kill9(): void;
  exited(): boolean;
}

export interface ServerOptions { readOnly?: boolean; verbose?: boolean; extra?: string[] }

/**
 * Serve `files` (export name = file name without extension). With nbdkit the files must share
 * a directory and have no extension (nbdkit's dir= mode names exports by the full file name).
 */
export async function startServer(files: string[], opts: ServerOptions = {}): Promise<E2EServer> {
  if (BACKEND === "nbdkit") return startNbdkit(files, opts);
  const args = [...(opts.readOnly ? ["-r"] : []), ...(opts.verbose ? ["-v"] : []), ...(opts.extra ?? []), ...files];
  const s = await serve(args);
  return {
    port: s.port, uri: s.uri, output: s.output, stop: () => s.stop(),
    kill9: () => { if (s.proc.exitCode === null) s.proc.kill("SIGKILL"); },
    exited: () => s.proc.exitCode !== null || s.proc.signalCode !== null,
  };
}

let nextPort = 12340 + (process.pid % 40);

async function startNbdkit(files: string[], opts: ServerOptions): Promise<E2EServer> {
  const dirs = new Set(files.map((f) => dirname(f)));
  if (files.length > 1 && (dirs.size > 1 || files.some((f) => basename(f).includes(".")))) {
    throw new Error("nbdkit backend: several exports need one directory and extension-less names");
  }
  for (let attempt = 0; attempt < 20; attempt++) {
    const port = nextPort++;
    if (nextPort > 12399) nextPort = 12340;
    const plugin = files.length > 1 ? ["file", `dir=${[...dirs][0]}`] : ["file", files[0]!];
    const proc: Subprocess<"ignore", "pipe", "pipe"> = Bun.spawn(
      ["nbdkit", "-f", "-i", "127.0.0.1", "-p", String(port), ...(opts.readOnly ? ["-r"] : []), ...(opts.verbose ? ["-v"] : []), ...plugin],
      { stdin: "ignore", stdout: "pipe", stderr: "pipe", env: { ...process.env, PATH: SYSTEM_PATH } });
    let out = "";
    const pump = async (s: ReadableStream<Uint8Array>) => { const d = new TextDecoder(); for await (const c of s) out += d.decode(c, { stream: true }); };
    void pump(proc.stdout); void pump(proc.stderr);
    // ready when the port accepts connections
    let ready = false;
    for (let i = 0; i < 100 && proc.exitCode === null; i++) {
      try { const c = await Bun.connect({ hostname: "127.0.0.1", port, socket: { data() {} } }); c.end(); ready = true; break; } catch { await Bun.sleep(50); }
    }
    if (!ready) { proc.kill("SIGKILL"); await proc.exited; if (/bind|in use/i.test(out)) continue; throw new Error(`nbdkit did not start:\n${out}`); }
    return {
      port,
      uri: (name = "") => `nbd://127.0.0.1:${port}/${encodeURIComponent(name)}`,
      output: () => out,
      stop: async () => { if (proc.exitCode === null) proc.kill("SIGTERM"); const t = setTimeout(() => proc.kill("SIGKILL"), 10_000); const c = await proc.exited; clearTimeout(t); return c; },
      kill9: () => { if (proc.exitCode === null) proc.kill("SIGKILL"); },
      exited: () => proc.exitCode !== null || proc.signalCode !== null,
    };
  }
  throw new Error("nbdkit: no free port in 12340-12399");
}
