// Start the real CLI (`bun src/cli.ts serve ...`) as a child process on an ephemeral loopback port
// or a unix socket, wait until it prints its URIs, and stop it afterwards.
import type { Subprocess } from "bun";
import { BUN, CLI } from "./env.ts";

export interface Served {
  proc: Subprocess<"ignore", "pipe", "pipe">;
  port: number;
  /** nbd://127.0.0.1:PORT/NAME (or nbd+unix:///NAME?socket=PATH when started with a socket). */
  uri(name?: string): string;
  /** Everything the server printed so far (stdout + stderr). */
  output(): string;
  /** SIGTERM and wait; returns the exit code. */
  stop(signal?: NodeJS.Signals): Promise<number>;
}

export async function serve(args: string[], opts: { socket?: string; timeoutMs?: number; env?: Record<string, string> } = {}): Promise<Served> {
  const listen = opts.socket ? ["-k", opts.socket] : ["-p", "0"];
  const proc = Bun.spawn([BUN, CLI, "serve", ...listen, ...args], {
    stdout: "pipe", stderr: "pipe", stdin: "ignore", env: opts.env ? { ...process.env, ...opts.env } : undefined,
  });
  let out = "";
  const pump = async (s: ReadableStream<Uint8Array>) => {
    const dec = new TextDecoder();
    for await (const chunk of s) out += dec.decode(chunk, { stream: true });
  };
  void pump(proc.stdout);
  void pump(proc.stderr);
  const limit = Date.now() + (opts.timeoutMs ?? 15_000);
  let port = 0;
  for (;;) {
    const m = /nbds?:\/\/127\.0\.0\.1:(\d+)\//.exec(out) ?? /nbds?:\/\/\[::1\]:(\d+)\//.exec(out);
    if (m) { port = Number(m[1]); }
    // (with --log-format json the banner comes as JSON lines: "message":"Ready. ...")
    if ((m || (opts.socket && /nbds?\+unix:\/\//.test(out))) && /^ready|"message":"Ready\./im.test(out)) break;
    if (proc.exitCode !== null) throw new Error(`server exited ${proc.exitCode} before it was ready:\n${out}`);
    if (Date.now() > limit) { proc.kill("SIGKILL"); throw new Error(`server not ready in time:\n${out}`); }
    await Bun.sleep(20);
  }
  return {
    proc, port,
    uri: (name = "") => opts.socket
      ? `nbd+unix:///${encodeURIComponent(name)}?socket=${opts.socket}`
      : `nbd://127.0.0.1:${port}/${encodeURIComponent(name)}`,
    output: () => out,
    stop: async (signal = "SIGTERM") => {
      if (proc.exitCode === null) proc.kill(signal);
      const t = setTimeout(() => proc.kill("SIGKILL"), 10_000);
      const code = await proc.exited;
      clearTimeout(t);
      return code;
    },
  };
}

/** Waits up to 5 s for `re` to show up in what the server printed (its log is written asynchronously). */
export async function waitForOutput(s: Served, re: RegExp, ms = 5000): Promise<void> {
  const limit = Date.now() + ms;
  while (!re.test(s.output())) {
    if (Date.now() > limit) throw new Error(`server output lacks ${re}:\n${s.output().split("\n").slice(-12).join("\n")}`);
    await Bun.sleep(20);
  }
}
