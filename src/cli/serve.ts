// `bun-nbd serve [options] FILE...` and `serve --config FILE`: settle the configuration, open the
// exports, listen (or take systemd's sockets), print how to connect, reload on SIGHUP, and shut
// down cleanly on SIGINT/SIGTERM. Wiring only.
import { statSync } from "node:fs";
import { commandArgs } from "./args.ts";
import { REMOTE_FLAGS, REMOTE_HELP, remoteSettings } from "./remote-args.ts";
import { serveConfig, type ServeFlags } from "./serve-config.ts";
import { formatConfig } from "../config/print.ts";
import { availableParallelism } from "node:os";
import type { ServiceConfig } from "../config/types.ts";
import { describeListen } from "../config/values.ts";
import { activationSockets } from "../server/activation.ts";
import { createLogger, type Logger } from "../server/log.ts";
import { type MetricsSource, serveMetrics } from "../server/metrics.ts";
import { remoteMetrics } from "../devices/remote/metrics.ts";
import { NbdServer } from "../server/server.ts";
import { ExportService, type OpenPerClient } from "../server/service.ts";
import { answerMetrics, type WorkerListen, WorkerPool, workerProblems, workerRole, type WorkerRole } from "../server/workers.ts";
import { formatSize } from "./format.ts";
import { progressBar } from "./progress.ts";
import { describe } from "../devices/partition-exports.ts";
import { qemuLine } from "../inspect/index.ts";
import { verifyImage } from "../verify/verify.ts";
import { VERSION } from "../version.ts";

const HELP = `usage: bun-nbd serve [options] FILE...
       bun-nbd serve --config FILE [options]

Serve disk images over NBD. Each FILE becomes an export named after the file without its
extension (disk.img -> "disk"); the first one is also the default export "".
What FILE is comes from its content: raw images (.img, .ima, .vfd, .flp, .raw, anything else) are
served byte for byte; CD images (.cue, .ccd, or lone raw sectors) as cooked and raw track views;
ISO 9660 images like a CD (read-only, 2048-byte blocks); .xz/.gz/.zip/.imz images as their
uncompressed bytes (read-only; archive.zip/MEMBER picks a member); VHDs (fixed: read-write;
dynamic: read-only); qcow2 overlays as themselves. Each partition of an MBR or GPT disk is also
offered as NAME/p1, NAME/p2, ... (logical partitions from p5).
A FILE may be remote: https://host/path/disk.img or s3://BUCKET/KEY (raw, ISO, fixed VHD, or a
CUE sheet whose BINs sit next to it), read through a local cache (see below).
On start, serve says what each export holds and prints a QEMU command line that fits it.

options:
  -c, --config FILE    read settings and exports from a TOML file (see examples/bun-nbd.toml);
                       the options below override its [server] settings; SIGHUP reloads it
      --print-config   print the effective configuration (file and options) as TOML and exit
  -p, --port PORT      TCP port (default 10809; 0 picks a free one)
  -b, --bind ADDR      address to listen on (default 127.0.0.1; repeatable, e.g. -b ::1).
                       Only loopback is served by default: to serve other hosts, bind their
                       interface address (or 0.0.0.0 / ::), with TLS and --allow (below).
  -k, --socket PATH    listen on a unix socket (TCP is then off unless -p or -b is given too)
                       Started by systemd with socket activation (LISTEN_FDS), bun-nbd serves
                       the sockets it is given instead.
  -r, --read-only      export read-only (files are opened read-only)
  -n, --name NAME      export name (one FILE only)
  -o, --overlay FILE   send every write to this qcow2 overlay (created if missing); FILE is the
                       base and is never modified. A CD image is then one export: the cooked
                       view of its first data track
  -s, --snapshot       like --overlay with a temporary overlay that is deleted at exit
      --per-client-overlay DIR
                       one overlay per client: clients connect to NAME@CLIENT and get
                       DIR/NAME@CLIENT.qcow2 (kept across reconnects and restarts); NAME alone
                       gets a throw-away overlay discarded at disconnect
      --compat         create overlays with standard L2 entries (for QEMU older than 5.2)
      --no-partitions  do not offer partition exports (NAME/pN)
      --verify         check each FILE against its checksum first (FILE.sha256, SHA256SUMS, ...
                       beside it; see bun-nbd verify) and refuse to serve on a mismatch
      --metrics HOST:PORT
                       serve Prometheus metrics at http://HOST:PORT/metrics (and /healthz)
      --log-format text|json
                       json: one object per line (time, level, message, peer, export...)
  -v, --verbose        log every request (debug)
TLS and access control:
      --tls MODE               off (default), on (STARTTLS offered) or require (nothing but
                               STARTTLS before TLS)
      --tls-certificates DIR   X.509: ca-cert.pem, server-cert.pem, server-key.pem (and an
                               optional ca-crl.pem) in DIR, as nbdkit and qemu-nbd read them
      --tls-verify-peer        require client certificates signed by DIR/ca-cert.pem
      --tls-psk FILE           pre-shared keys instead: psktool's username:hexkey lines
      --allow CIDR             accept TCP clients from CIDR only (repeatable; IPv4 or IPv6,
                               e.g. 192.0.2.0/24, 2001:db8::/32, ::1)
      --max-connections N      at most N connections at once (default: no limit)
      --max-connections-per-address N   at most N at once from one IP address
      --handshake-timeout S    drop a client that has not chosen an export within S seconds
                               (default 10; 0: never)
Processes:
      --workers N      serve with N processes (default 1), so connections use N cores: raw
                       images (read-write), and any local image read-only; not with overlays,
                       remote images or connection limits
      --threads N      serve up to N connections to raw images (and their partitions, and
                       ISOs) each on a thread of its own (default auto: one per core; 0: all
                       on the event loop); TLS connections stay on the event loop
  -q, --quiet          log only warnings and errors
  -h, --help           this help
  -V, --version        print the version

${REMOTE_HELP}

Connect with, for example:
  qemu-system-x86_64 -drive file=nbd://127.0.0.1:10809/NAME,format=raw
  nbdinfo nbd://127.0.0.1:10809/NAME
  nbd-client 127.0.0.1 10809 /dev/nbd0 -N NAME`;

export async function main(argv: string[]): Promise<number> {
  const args = commandArgs("serve", HELP, argv, {
    config: { type: "string", short: "c" },
    "print-config": { type: "boolean" },
    port: { type: "string", short: "p" },
    bind: { type: "string", short: "b", multiple: true },
    socket: { type: "string", short: "k" },
    "read-only": { type: "boolean", short: "r" },
    name: { type: "string", short: "n" },
    overlay: { type: "string", short: "o" },
    snapshot: { type: "boolean", short: "s" },
    "per-client-overlay": { type: "string" },
    compat: { type: "boolean" },
    "no-partitions": { type: "boolean" },
    verify: { type: "boolean" },
    metrics: { type: "string" },
    "log-format": { type: "string" },
    verbose: { type: "boolean", short: "v" },
    tls: { type: "string" },
    "tls-certificates": { type: "string" },
    "tls-verify-peer": { type: "boolean" },
    "tls-psk": { type: "string" },
    allow: { type: "string", multiple: true },
    "max-connections": { type: "string" },
    "max-connections-per-address": { type: "string" },
    "handshake-timeout": { type: "string" },
    workers: { type: "string" },
    threads: { type: "string" },
    quiet: { type: "boolean", short: "q" },
    version: { type: "boolean", short: "V" },
    ...REMOTE_FLAGS,
  }, { min: 0, max: Infinity, what: "FILE..." });
  if (typeof args === "number") return args;
  const o = args.values;
  if (o.version) { console.log(VERSION); return 0; }
  const flags = o as ServeFlags;
  const loaded = serveConfig(flags, args.positionals);
  if (!loaded.ok) {
    for (const e of loaded.errors) console.error(`bun-nbd serve: ${e}`);
    return loaded.code;
  }
  const cfg = loaded.config;
  if (o["print-config"]) {
    process.stdout.write(formatConfig(cfg, "with command-line options applied"));
    return 0;
  }
  const s = cfg.server;
  let role: WorkerRole | null;
  try {
    role = workerRole();
  } catch (e) {
    console.error(`bun-nbd serve: ${(e as Error).message}`);
    return 2;
  }
  const log = createLogger(s.verbose ? "debug" : s.quiet ? "warn" : "info", undefined, s.logFormat, role?.index ?? (s.workers > 1 ? 0 : undefined));
  const say = s.logFormat === "json" ? (l: string) => log.info(l) : (l: string) => console.log(l);
  const refused = role === null ? workerProblems(cfg) : [];
  if (refused.length > 0) {
    for (const p of refused) console.error(`bun-nbd serve: --workers ${s.workers}: ${p}`);
    return 2;
  }
  if (o.verify && role === null && !(await verifyAll(cfg, log, !!s.quiet))) return 1;

  let remote;
  try {
    remote = remoteSettings(o);
  } catch (e) {
    console.error(`bun-nbd serve: ${(e as Error).message}`);
    return 2;
  }
  const service = new ExportService({ readOnly: s.readOnly, tls: s.tls, log, metrics: s.metrics !== null, openPerClient, remote });
  let server: NbdServer;
  try {
    const registry = await service.start(cfg.exports);
    server = new NbdServer(registry, {
      log, tls: s.tls, tlsCertificates: s.tlsCertificates, tlsVerifyPeer: s.tlsVerifyPeer, tlsPsk: s.tlsPsk,
      allow: s.allow, maxConnections: s.maxConnections, maxConnectionsPerAddress: s.maxConnectionsPerAddress,
      handshakeTimeout: s.handshakeTimeout, threads: s.threads === "auto" ? availableParallelism() : s.threads,
    });
  } catch (e) {
    console.error(`bun-nbd serve: ${(e as Error).message}`);
    return 1;
  }

  let where: string[], shared: WorkerListen[];
  try {
    ({ where, shared } = role ? listenAsWorker(server, role) : listen(server, cfg));
  } catch (e) {
    const port = s.listen.find((l) => l.kind === "tcp")?.port;
    const code = (e as NodeJS.ErrnoException).code;
    const msg = code === "EADDRINUSE" ? `port ${port} is already in use (choose another with -p)`
      : code === "EADDRNOTAVAIL" ? `cannot bind ${s.listen.map(describeListen).join(", ")}: no such local address`
      : code === "EACCES" ? `permission denied listening on port ${port}` : (e as Error).message;
    console.error(`bun-nbd serve: ${msg}`);
    await server.close(0);
    return 1;
  }

  server.prestartThreads();
  let metricsUrl = "";
  let stopMetrics = () => {};
  let pool: WorkerPool | null = null;
  const source: MetricsSource = {
    stats: () => service.allStats(), connections: () => server.connections, overlays: () => server.registry.overlays(diskBytes),
    families: remoteMetrics,
  };
  // a worker's counters go to the supervisor's endpoint, which sums every process's
  if (s.metrics !== null && role !== null) answerMetrics(source);
  if (s.metrics !== null && role === null) {
    try {
      const m = serveMetrics(s.metrics.host, s.metrics.port, source, log, () => pool?.collectMetrics() ?? Promise.resolve([]));
      stopMetrics = m.stop;
      const h = s.metrics.host.includes(":") ? `[${s.metrics.host}]` : s.metrics.host;
      metricsUrl = `http://${h}:${m.port}/metrics`;
    } catch (e) {
      console.error(`bun-nbd serve: --metrics ${describeListen({ kind: "tcp", ...s.metrics })}: ${(e as Error).message}`);
      await server.close(0);
      return 1;
    }
  }

  // The signal handlers are in place before anyone is told the server is ready: a SIGHUP sent
  // on seeing "Ready" found none (and killed the process) in a few runs of ten.
  const done = new Promise<number>((resolve) => {
    let stopping = false;
    const stop = (sig: string) => {
      if (stopping) return;
      stopping = true;
      log.info(`${sig}: finishing in-flight requests and closing`);
      stopMetrics();
      Promise.all([server.close(), pool?.stop()]).then(() => resolve(0), (e: Error) => { log.error(e.message); resolve(1); });
    };
    process.on("SIGINT", () => stop("SIGINT"));
    process.on("SIGTERM", () => stop("SIGTERM"));
    // a worker whose supervisor is gone (even by kill -9) stops serving
    if (role !== null) process.on("disconnect", () => stop("supervisor gone"));
    process.on("SIGHUP", () => {
      if (stopping) return;
      pool?.signal("SIGHUP");
      if (server.tlsSummary) {
        // renewed certificates or keys: new connections use them, open ones keep theirs
        try {
          server.reloadTls();
          log.info(`SIGHUP: credentials read again; new connections use them (${server.tlsSummary})`);
        } catch (e) {
          log.error(`SIGHUP: keeping the old credentials: ${(e as Error).message}`);
        }
        if (cfg.file === null) return;
      }
      void reload(cfg, flags, service, log);
    });
  });

  if (role !== null) {
    process.send?.({ ready: true });
  } else {
    if (s.workers > 1) {
      pool = new WorkerPool(s.workers, shared, [process.execPath, ...process.argv.slice(1)], log);
      try {
        await pool.start();
      } catch (e) {
        console.error(`bun-nbd serve: --workers ${s.workers}: ${(e as Error).message}`);
        await server.close(0);
        return 1;
      }
    }
    printBanner(server, where, say);
    if (server.tlsSummary) say(server.tlsSummary);
    if (metricsUrl) say(`Metrics at ${metricsUrl}`);
    if (pool) say(`${s.workers} processes serve these sockets (pids ${[process.pid, ...pool.pids].join(", ")}).`);
    say("Ready. Press Ctrl-C to stop.");
  }

  return await done;
}

/** Per-client overlays: the qcow2 code is loaded only when an export uses them. */
const openPerClient: OpenPerClient = async (e, log, remote) => (await import("../devices/per-client.ts")).openClientOverlays(e, log, remote);

interface Listening { where: string[]; shared: WorkerListen[] }

/**
 * Listen where the configuration says, or on systemd's sockets; returns how to reach each, and
 * what --workers' other processes serve: the same TCP addresses (SO_REUSEPORT) and descriptors.
 */
function listen(server: NbdServer, cfg: ServiceConfig): Listening {
  const shared: Listening["shared"] = [];
  const passed = activationSockets();
  if (passed !== null) {
    const where = passed.map((p) => {
      server.listenFd(p.fd);
      shared.push({ kind: "fd", fd: p.fd });
      return p.address === null ? `fd:${p.fd}` : describeListen(p.address);
    });
    return { where, shared };
  }
  const mode = cfg.server.workers > 1 ? "reuse-port" : "exclusive";
  let port0: number | null = null;
  const where = cfg.server.listen.map((l) => {
    if (l.kind === "unix") {
      const fd = server.listenUnix(l.path);
      shared.push({ kind: "fd", fd });
      return describeListen(l);
    }
    // with port 0 on several addresses, every address gets the port the first one got
    const { port } = server.listenTcp(l.host, port0 ?? l.port, mode);
    if (l.port === 0) port0 ??= port;
    shared.push({ kind: "tcp", host: l.host, port });
    return describeListen({ ...l, port });
  });
  return { where, shared };
}

/** A worker serves what its supervisor bound: the same TCP ports, and the descriptors it was handed. */
function listenAsWorker(server: NbdServer, role: WorkerRole): Listening {
  for (const l of role.listen) {
    if (l.kind === "fd") server.listenFd(l.fd);
    else server.listenTcp(l.host, l.port, "join");
  }
  return { where: [], shared: [] };
}

/** serve --verify: each export's file against the checksum beside it; false after printing a mismatch. */
async function verifyAll(cfg: ServiceConfig, log: Logger, quiet: boolean): Promise<boolean> {
  for (const file of new Set(cfg.exports.map((e) => e.file))) {
    try {
      for (const c of await verifyImage(file, { progress: (f) => (quiet ? undefined : progressBar(`verifying ${f}`)) })) {
        if (!c.ok) {
          console.error(`bun-nbd serve: ${c.file}: ${c.algo} mismatch: expected ${c.expected}, got ${c.actual} (from ${c.source})`);
          return false;
        }
        log.info(`${c.file}: ${c.algo} matches ${c.source}`);
      }
    } catch (e) {
      console.error(`bun-nbd serve: --verify: ${(e as Error).message}`);
      return false;
    }
  }
  return true;
}

function uriFor(where: string, name: string, scheme: "nbd" | "nbds"): string {
  // percent-encoded, except "/" (partition exports read disk/p1)
  const n = encodeURIComponent(name).replace(/%2F/g, "/");
  if (where.startsWith("unix:")) return `${scheme}+unix:///${n}?socket=${where.slice(5)}`;
  if (where.startsWith("fd:")) return `(systemd socket ${where.slice(3)})`;
  return `${scheme}://${where}/${n}`;
}

function printBanner(server: NbdServer, where: string[], say: (l: string) => void): void {
  const rows = server.registry.current.rows;
  const w = Math.max(...rows.map((r) => r.name.length + (r.kind === "per-client" ? 7 : 0)));
  say(`bun-nbd ${VERSION}: serving ${rows.length} export${rows.length > 1 ? "s" : ""}`);
  rows.forEach((r, i) => {
    const name = r.kind === "per-client" ? `${r.name}@CLIENT` : r.name;
    const size = r.kind === "per-client" ? r.manager.size : r.exp.size;
    const mode = r.kind === "per-client" ? "per-client" : r.exp.caps.canWrite ? "read-write" : "read-only";
    const uris = where.map((x) => uriFor(x, r.name, server.settings.tls === "require" ? "nbds" : "nbd"));
    say(`  ${name.padEnd(w)}  ${formatSize(size).padStart(9)}  ${mode.padEnd(10)}  ${uris.join("  ")}${i === 0 ? "  (default export)" : ""}`);
    const report = r.kind === "static" ? r.stack.reports.get(r.name) : undefined;
    if (!report) return;
    say(`      ${describe(report)}`);
    if (!r.name.includes("/") && r.kind === "static") say(`      ${qemuLine(report, uris[0]!, !r.exp.caps.canWrite)}`);
  });
}

function diskBytes(path: string): number {
  try { return statSync(path).blocks * 512; } catch { return 0; }
}

/** SIGHUP: re-read the file and swap the export table; on any error keep the running one. */
async function reload(cfg: ServiceConfig, flags: ServeFlags, service: ExportService, log: Logger): Promise<void> {
  if (cfg.file === null) { log.warn("SIGHUP: no config file to reload (started without --config)"); return; }
  const next = serveConfig(flags, []);
  if (!next.ok) {
    log.error(`reload of ${cfg.file} failed, keeping the running configuration: ${next.errors.join("; ")}`);
    return;
  }
  const refused = workerProblems({ ...next.config, server: cfg.server });
  if (refused.length > 0) {
    log.error(`reload of ${cfg.file} refused, keeping the running configuration: ${refused.join("; ")}`);
    return;
  }
  if (JSON.stringify(next.config.server) !== JSON.stringify(cfg.server)) {
    log.warn(`reload of ${cfg.file}: [server] settings changed; they take effect at the next restart`);
  }
  try {
    const d = await service.reload(next.config.exports);
    const part = (what: string, xs: string[]) => (xs.length ? `${xs.length} ${what} (${xs.join(", ")})` : `0 ${what}`);
    log.info(`reloaded ${cfg.file}: ${part("added", d.added)}, ${part("removed", d.removed)}, ${part("changed", d.changed)}, ${d.unchanged.length} unchanged`);
  } catch (e) {
    log.error(`reload of ${cfg.file} failed, keeping the running configuration: ${(e as Error).message}`);
  }
}
