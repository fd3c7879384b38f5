// serve --workers N: N processes serve one server's sockets, so connections use more than one core
// (nbdkit uses threads, nbd-server forks; Bun has one event loop per process).
//
// The process the user starts is worker 0, the supervisor: it checks the configuration, opens the
// exports, binds, prints the banner and serves like a single-process server. It then starts N-1
// more processes of the same command line, which open the same exports themselves and serve the
// same sockets: a TCP port through SO_REUSEPORT (the kernel spreads connections over the processes
// by address hash), a unix socket or a systemd socket by inheriting the listening descriptor (the
// process that is idle accepts). Every process writes to the one stderr with "wN" on its lines.
// SIGHUP is passed on (each process reloads the config file or credentials itself); SIGINT and
// SIGTERM stop them all; a worker that dies is replaced (not more than 5 times a minute); a worker
// whose supervisor dies (its IPC channel closes) shuts down.
//
// What stays true across processes decides what is served (workerProblems): reads of any local
// image, and writes to raw files, whose only state is the file (the page cache is shared and a
// FLUSH's fdatasync covers every process's writes, so CAN_MULTI_CONN still holds). Anything with a
// single writer's state in the process (qcow2 overlays, --snapshot, per-client overlays, a writable
// qcow2 or VHD, a remote image's local cache) is refused with the reason, as are connection limits,
// which would silently become per process. The metrics endpoint is the supervisor's: it asks every
// worker for its counters over the IPC channel and serves their sum.
import type { Subprocess } from "bun";
import type { ServiceConfig } from "../config/types.ts";
import { localKind } from "../devices/open.ts";
import { isRemote } from "../devices/remote/location.ts";
import type { Logger } from "./log.ts";
import { type MetricsSource, renderMetrics } from "./metrics.ts";

/** The environment variable that makes `serve` one of the supervisor's workers. */
export const WORKER_ENV = "BUN_NBD_WORKER";

/** Where a worker listens: a TCP address it binds with SO_REUSEPORT, or a descriptor it inherited. */
export type WorkerListen = { kind: "tcp"; host: string; port: number } | { kind: "fd"; fd: number };
export interface WorkerRole { index: number; listen: WorkerListen[] }

/** This process's part when it is a worker (started by a supervisor), else null. */
export function workerRole(env: Record<string, string | undefined> = process.env): WorkerRole | null {
  const v = env[WORKER_ENV];
  if (v === undefined) return null;
  let r: WorkerRole | null = null;
  try { r = JSON.parse(v) as WorkerRole; } catch { /* reported below */ }
  if (r === null || typeof r !== "object" || !Number.isInteger(r.index) || r.index < 1 || !Array.isArray(r.listen)) {
    throw new Error(`${WORKER_ENV} is set but is not a worker description (it is set by serve --workers for its own processes)`);
  }
  return r;
}

/** Why `cfg` cannot be served by several processes (empty: it can). */
export function workerProblems(cfg: ServiceConfig, kindOf: (file: string) => string = (f) => localKind(f).kind): string[] {
  const s = cfg.server;
  if (s.workers <= 1) return [];
  const out: string[] = [];
  if (s.maxConnections > 0 || s.maxConnectionsPerAddress > 0) {
    out.push("connection limits are counted per process, so N workers would let N times as many in: serve without --max-connections*");
  }
  for (const e of cfg.exports) {
    const what = `export "${e.name}" (${e.file})`;
    const ov = e.overlay;
    if (ov.kind !== "none") {
      const kind = ov.kind === "file" ? `its overlay ${ov.path}` : ov.kind === "snapshot" ? "its --snapshot overlay" : "its per-client overlays";
      out.push(`${what}: ${kind} must have one writer, and every worker would open its own`);
    } else if (isRemote(e.file)) {
      out.push(`${what}: a remote image's local cache has one writer`);
    } else if (!e.readOnly && !s.readOnly) {
      const kind = kindOf(e.file);
      if (kind === "qcow2" || kind === "vhd") out.push(`${what}: a writable ${kind} image's metadata must have one writer: serve it --read-only`);
    }
  }
  return out;
}

/** A worker's side of the metrics endpoint: answer the supervisor's requests with this process's counters. */
export function answerMetrics(src: MetricsSource): void {
  process.on("message", (m: unknown) => {
    const ask = (m as { metrics?: unknown } | null)?.metrics;
    if (typeof ask === "number") process.send?.({ metrics: ask, text: renderMetrics(src) });
  });
}

const RESPAWN_LIMIT = 5;
const RESPAWN_WINDOW_MS = 60_000;

/** The supervisor's side: starts, signals, replaces and stops workers 1..n-1. */
export class WorkerPool {
  private readonly procs: (Subprocess | null)[] = [];
  /** Metrics requests waiting for workers' answers, by request id. */
  private readonly asked = new Map<number, (index: number, text: string) => void>();
  private nextAsk = 1;
  private readonly deaths: number[] = [];
  private stopping = false;

  /**
   * `listen`: what each worker serves, "fd" entries naming the supervisor's descriptors (handed to
   * the worker as its fds 3, 4, ...). `argv`: the command that runs `serve` (this process's own).
   */
  constructor(private readonly n: number, private readonly listen: WorkerListen[],
    private readonly argv: string[], private readonly log: Logger) {}

  /** Start every worker and wait until each serves; throws (after stopping the others) if one cannot. */
  async start(timeoutMs = 60_000): Promise<void> {
    try {
      await Promise.all(Array.from({ length: this.n - 1 }, (_, i) => this.spawn(i + 1, timeoutMs)));
    } catch (e) {
      await this.stop();
      throw e;
    }
  }

  /** Pass a signal on to every worker (SIGHUP: reload). */
  signal(sig: NodeJS.Signals): void {
    for (const p of this.procs) p?.kill(sig);
  }

  /** SIGTERM every worker and wait for them (SIGKILL after `graceMs`). */
  async stop(graceMs = 10_000): Promise<void> {
    this.stopping = true;
    const live = this.procs.filter((p): p is Subprocess => p !== null && p.exitCode === null && p.signalCode === null);
    for (const p of live) p.kill("SIGTERM");
    const timer = setTimeout(() => { for (const p of live) p.kill("SIGKILL"); }, graceMs);
    await Promise.all(live.map((p) => p.exited));
    clearTimeout(timer);
  }

  /** Every live worker's metrics rendering; a worker that does not answer within `timeoutMs` is left out. */
  collectMetrics(timeoutMs = 2000): Promise<string[]> {
    const live = this.procs.flatMap((p, i) => (p !== null && p.exitCode === null && p.signalCode === null ? [[i, p] as const] : []));
    if (live.length === 0) return Promise.resolve([]);
    const id = this.nextAsk++;
    return new Promise((resolve) => {
      const got = new Map<number, string>();
      const finish = () => { clearTimeout(timer); this.asked.delete(id); resolve([...got.values()]); };
      const timer = setTimeout(finish, timeoutMs);
      this.asked.set(id, (index, text) => { got.set(index, text); if (got.size === live.length) finish(); });
      for (const [, p] of live) {
        try { p.send({ metrics: id }); } catch { /* exiting: left out */ }
      }
    });
  }

  /** The workers' process ids (tests, logs). */
  get pids(): number[] {
    return this.procs.flatMap((p) => (p ? [p.pid] : []));
  }

  private spawn(index: number, timeoutMs: number): Promise<void> {
    const fds = this.listen.flatMap((l) => (l.kind === "fd" ? [l.fd] : []));
    let next = 3;
    const role: WorkerRole = { index, listen: this.listen.map((l) => (l.kind === "fd" ? { kind: "fd", fd: next++ } : l)) };
    const env: Record<string, string | undefined> = { ...process.env, [WORKER_ENV]: JSON.stringify(role) };
    for (const k of ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"]) delete env[k];
    return new Promise<void>((resolve, reject) => {
      let ready = false;
      const timer = setTimeout(() => { if (!ready) { p.kill("SIGKILL"); reject(new Error(`worker ${index} did not start within ${timeoutMs / 1000} s`)); } }, timeoutMs);
      const p = Bun.spawn(this.argv, {
        env,
        stdio: ["ignore", "inherit", "inherit", ...fds] as unknown as ["ignore", "inherit", "inherit"],
        ipc: (m: unknown) => {
          const answer = m as { metrics?: number; text?: string };
          if (typeof answer.metrics === "number" && typeof answer.text === "string") {
            this.asked.get(answer.metrics)?.(index, answer.text);
            return;
          }
          if ((m as { ready?: boolean }).ready && !ready) {
            ready = true;
            clearTimeout(timer);
            resolve();
          }
        },
      });
      this.procs[index] = p;
      void p.exited.then((code) => {
        clearTimeout(timer);
        const how = p.signalCode ? `signal ${p.signalCode}` : `code ${code}`;
        if (!ready) { reject(new Error(`worker ${index} exited (${how}) before it served`)); return; }
        if (this.stopping) return;
        this.procs[index] = null;
        this.replace(index, p.pid, how);
      });
    });
  }

  private replace(index: number, pid: number, how: string): void {
    const now = Date.now();
    this.deaths.push(now);
    while (this.deaths.length > 0 && this.deaths[0]! < now - RESPAWN_WINDOW_MS) this.deaths.shift();
    if (this.deaths.length > RESPAWN_LIMIT) {
      this.log.error(`worker ${index} (pid ${pid}) exited (${how}); ${this.deaths.length} workers died within a minute, not starting another`);
      return;
    }
    this.log.error(`worker ${index} (pid ${pid}) exited (${how}); its connections are lost, starting another`);
    setTimeout(() => {
      if (this.stopping) return;
      this.spawn(index, 60_000).then(
        () => this.log.info(`worker ${index} serving again (pid ${this.procs[index]?.pid})`),
        (e: Error) => this.log.error(e.message),
      );
    }, 1000);
  }
}
