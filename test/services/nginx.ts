// A real nginx (Debian nginx-light) for the remote-image tests: started on 127.0.0.1 with a
// generated config (static files with Range support, an access log of every request with its
// Range header), stopped and started again on the same port for fault tests. Every location
// serves the same root; /private/ asks for basic auth, /denied/ answers 403, /noranges/ ignores
// Range (200 with the whole file), /slow/ sends 128 KiB/s per connection, /medium/ 4 MiB/s,
// /stall/ sends its first 2 KiB and then next to nothing (1 byte/s: a transfer that stalls).
// fail(503) makes every request answer that status until fail(null) (a flag file the config
// tests on each request: nginx itself answers, no restart). The log has each request's
// connection number, end time and duration, to show which GETs overlapped.
// One process, no daemon, everything under a scratch directory.
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { join } from "node:path";
import type { Subprocess } from "bun";
import { need, scratch, SYSTEM_PATH } from "../helpers/env.ts";

/** Credentials of the /private/ location (HTTP basic auth). */
export const BASIC_USER = "reader";
export const BASIC_PASSWORD = "pw-Zq81-secret";

export interface Nginx {
  readonly port: number;
  /** The directory served at /. */
  readonly root: string;
  url(path: string): string;
  /** Access-log lines so far: "STATUS METHOD URI RANGE BYTES CONNECTION END_MSEC REQUEST_TIME". */
  log(): string[];
  /** Requests for `uri` so far, parsed from the log (start = end - duration, in seconds). */
  requests(uri: string): LoggedRequest[];
  /** Answer every request with `status` (500, 502, 503 or 504) from now on; null: serve again. */
  fail(status: FailStatus | null): void;
  /** GETs with status 206 for `uri` so far, not counting probes of the first byte (bytes=0-0). */
  rangeGets(uri: string): number;
  /** Stop (SIGKILL with `hard`), leaving the port free; start() brings it back on the same port. */
  stop(hard?: boolean): Promise<void>;
  start(): Promise<void>;
  running(): boolean;
}

export type FailStatus = 500 | 502 | 503 | 504;
const FAIL_STATUSES: FailStatus[] = [500, 502, 503, 504];

export interface LoggedRequest {
  status: number;
  method: string;
  range: string;
  bytes: number;
  connection: number;
  /** Seconds (epoch, ms resolution): when nginx read the request and when it logged the answer. */
  start: number;
  end: number;
}

/** A free TCP port on 127.0.0.1 (closed again at once; the caller binds it soon after). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

export async function startNginx(root?: string): Promise<Nginx> {
  need("nginx");
  const dir = scratch("bun-nbd-nginx-");
  const www = root ?? join(dir, "www");
  mkdirSync(www, { recursive: true });
  mkdirSync(join(dir, "tmp"), { recursive: true });
  let port = 0;
  let proc: Subprocess | null = null;
  const conf = join(dir, "nginx.conf");
  const logFile = join(dir, "access.log");

  writeFileSync(join(dir, "htpasswd"), `${BASIC_USER}:{PLAIN}${BASIC_PASSWORD}\n`);
  const writeConf = () => writeFileSync(conf, `daemon off;
master_process off;
worker_processes 1;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log warn;
events { worker_connections 1024; }
http {
  log_format ranges '$status $request_method $uri "$http_range" $body_bytes_sent $connection $msec $request_time';
  access_log ${logFile} ranges;
  client_body_temp_path ${dir}/tmp; proxy_temp_path ${dir}/tmp; fastcgi_temp_path ${dir}/tmp;
  uwsgi_temp_path ${dir}/tmp; scgi_temp_path ${dir}/tmp;
  sendfile on;
  keepalive_requests 100000;
  server {
    listen 127.0.0.1:${port};
    root ${www};
    default_type application/octet-stream;
${FAIL_STATUSES.map((st) => `    if (-f ${dir}/fail-${st}) { return ${st}; }\n`).join("")}    location /private/ { auth_basic "images"; auth_basic_user_file ${dir}/htpasswd; }
    location /denied/ { deny all; }
    location /noranges/ { max_ranges 0; }
    location /slow/ { limit_rate 128k; }
    location /medium/ { limit_rate 4m; }
    location /stall/ { limit_rate_after 2k; limit_rate 1; }
  }
}
`);

  const launch = async (): Promise<boolean> => {
    writeConf();
    proc = Bun.spawn(["nginx", "-c", conf, "-p", dir, "-e", join(dir, "error.log")], {
      stdin: "ignore", stdout: "ignore", stderr: "ignore", env: { ...process.env, PATH: SYSTEM_PATH },
    });
    proc.unref(); // a running nginx must not keep the test process alive (it is killed at exit)
    for (let i = 0; i < 200; i++) {
      if (proc.exitCode !== null) return false;
      try {
        const r = await fetch(`http://127.0.0.1:${port}/`, { method: "HEAD" });
        await r.arrayBuffer();
        return true;
      } catch { await Bun.sleep(25); }
    }
    return false;
  };

  let ok = false;
  for (let attempt = 0; attempt < 10 && !ok; attempt++) {
    port = await freePort();
    ok = await launch();
    if (!ok) { (proc as Subprocess | null)?.kill("SIGKILL"); await (proc as Subprocess | null)?.exited; }
  }
  if (!ok) throw new Error(`nginx did not start: ${readFileSync(join(dir, "error.log"), "utf8").slice(-2000)}`);
  process.on("exit", () => { (proc as Subprocess | null)?.kill("SIGKILL"); });

  const lines = () => { try { return readFileSync(logFile, "utf8").split("\n").filter(Boolean); } catch { return []; } };
  return {
    port, root: www,
    url: (p) => `http://127.0.0.1:${port}/${p.replace(/^\//, "")}`,
    log: lines,
    requests: (uri) => lines().map((l) => l.split(" ")).filter((f) => f[2] === uri).map((f) => {
      const end = Number(f[6]), took = Number(f[7]);
      return { status: Number(f[0]), method: f[1]!, range: f[3]!.replace(/"/g, ""), bytes: Number(f[4]), connection: Number(f[5]), start: end - took, end };
    }),
    fail(status) {
      for (const st of FAIL_STATUSES) rmSync(join(dir, `fail-${st}`), { force: true });
      if (status !== null) writeFileSync(join(dir, `fail-${status}`), "");
    },
    rangeGets: (uri) => lines().filter((l) => l.startsWith(`206 GET ${uri} `) && !l.includes('"bytes=0-0"')).length,
    async stop(hard = false) {
      const p = proc as Subprocess | null;
      if (p === null) return;
      proc = null;
      p.ref(); // keep the loop alive while waiting for it
      p.kill(hard ? "SIGKILL" : "SIGTERM");
      await p.exited;
    },
    async start() {
      for (let i = 0; i < 40; i++) {
        if (await launch()) return;
        await Bun.sleep(100);
      }
      throw new Error(`nginx did not come back on port ${port}: ${readFileSync(join(dir, "error.log"), "utf8").slice(-2000)}`);
    },
    running: () => { const p = proc as Subprocess | null; return p !== null && p.exitCode === null && p.signalCode === null; },
  };
}
