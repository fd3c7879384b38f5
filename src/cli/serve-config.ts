// `serve`'s settings: from a config file (--config) or from FILE arguments, with the command-line
// flags laid over either, giving the same ServiceConfig. Wiring only: the rules live in src/config.
import { readFileSync, statSync } from "node:fs";
import { resolve } from "node:path";
import { MAX_WORKERS, parseConfig } from "../config/parse.ts";
import { DEFAULT_PORT, DEFAULT_SETTINGS, MAX_THREADS, deepFreeze, formatConfigError, type ExportConfig, type ListenAddress, type PathKind, type ServerSettings, type ServiceConfig } from "../config/types.ts";
import { parseHostPort } from "../config/values.ts";
import { cidrProblem } from "../server/access.ts";
import { exportNameFor } from "../devices/open.ts";
import { isRemote, remoteExportName } from "../devices/remote/location.ts";

/** The default export name of FILE (a malformed URL is named as a path; opening it reports why). */
function nameFor(file: string): string {
  try { return isRemote(file) ? remoteExportName(file) : exportNameFor(file); } catch { return exportNameFor(file); }
}

export interface ServeFlags {
  config?: string;
  port?: string;
  bind?: string[];
  socket?: string;
  "read-only"?: boolean;
  name?: string;
  overlay?: string;
  snapshot?: boolean;
  compat?: boolean;
  "no-partitions"?: boolean;
  "per-client-overlay"?: string;
  metrics?: string;
  "log-format"?: string;
  verbose?: boolean;
  quiet?: boolean;
  tls?: string;
  "tls-certificates"?: string;
  "tls-verify-peer"?: boolean;
  "tls-psk"?: string;
  allow?: string[];
  "max-connections"?: string;
  "max-connections-per-address"?: string;
  "handshake-timeout"?: string;
  workers?: string;
  threads?: string;
}

/** A usable configuration, or the lines to print before exiting with `code`. */
export type Loaded = { ok: true; config: ServiceConfig } | { ok: false; code: number; errors: string[] };
const fail = (code: number, ...errors: string[]): Loaded => ({ ok: false, code, errors });

/** What a path is, for the config checks. */
export function probePath(p: string): PathKind {
  try {
    const st = statSync(p);
    return st.isFile() ? "file" : st.isDirectory() ? "directory" : "other";
  } catch {
    return "missing";
  }
}

/** Read and validate a config file (errors are "FILE:LINE: KEY: MESSAGE"). */
export function readConfigFile(path: string): Loaded {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (e) {
    return fail(1, `cannot read config file ${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
  const r = parseConfig(text, { file: path, probe: probePath, checkCidr: cidrProblem, isRemote });
  return r.ok ? r : fail(1, ...r.errors.map(formatConfigError));
}

/** The configuration `serve` runs with: the file's or the FILE arguments', flags laid over it. */
export function serveConfig(flags: ServeFlags, files: string[]): Loaded {
  const exportFlags = (["name", "overlay", "snapshot", "compat", "no-partitions", "per-client-overlay"] as const).filter((k) => flags[k] !== undefined);
  let base: ServiceConfig;
  if (flags.config !== undefined) {
    if (files.length) return fail(2, "give exports either as FILE arguments or in the config file, not both");
    if (exportFlags.length) return fail(2, `--${exportFlags[0]} applies to FILE arguments; with --config, set it in the file's [[export]] tables`);
    const r = readConfigFile(flags.config);
    if (!r.ok) return r;
    base = r.config;
  } else {
    if (files.length === 0) return fail(2, "no FILE given (see bun-nbd serve --help)");
    const r = exportsFromFiles(flags, files);
    if (typeof r === "string") return fail(2, r);
    base = { file: null, server: DEFAULT_SETTINGS, exports: r };
  }
  const server = overrideSettings(base.server, flags);
  if (typeof server === "string") return fail(2, server);
  return { ok: true, config: deepFreeze({ ...base, server }) };
}

function exportsFromFiles(f: ServeFlags, files: string[]): ExportConfig[] | string {
  const modes = [f.overlay !== undefined && "--overlay", f.snapshot && "--snapshot", f["per-client-overlay"] !== undefined && "--per-client-overlay"].filter(Boolean);
  if (modes.length > 1) return `${modes.join(" and ")} cannot be used together`;
  if (f.name !== undefined && files.length > 1) return "--name needs exactly one FILE";
  if ((f.overlay !== undefined || f.snapshot) && files.length > 1) return "--overlay and --snapshot need exactly one FILE (the base image)";
  const dir = f["per-client-overlay"];
  return files.map((file) => ({
    name: f.name ?? nameFor(file),
    file: isRemote(file) ? file : resolve(file),
    readOnly: !!f["read-only"],
    overlay: f.overlay !== undefined ? { kind: "file" as const, path: resolve(f.overlay) }
      : f.snapshot ? { kind: "snapshot" as const }
      : dir !== undefined ? { kind: "per-client" as const, dir: resolve(dir) } : { kind: "none" as const },
    compat: !!f.compat,
    partitions: !f["no-partitions"],
    description: null,
    allow: [],
    clientName: "tls-identity" as const,
    source: "command line",
  }));
}

/** Lay the flags over `s`: -p/-b/-k replace `listen`; switches turn settings on. */
function overrideSettings(s: ServerSettings, f: ServeFlags): ServerSettings | string {
  let listen: readonly ListenAddress[] = s.listen;
  if (f.port !== undefined || f.bind !== undefined || f.socket !== undefined) {
    let port = DEFAULT_PORT;
    if (f.port !== undefined) {
      port = Number(f.port);
      if (!/^\d+$/.test(f.port) || port > 65535) return `invalid port "${f.port}"`;
    }
    const useTcp = f.socket === undefined || f.port !== undefined || f.bind !== undefined;
    const tcp = useTcp ? (f.bind ?? ["127.0.0.1"]).map((host) => ({ kind: "tcp" as const, host: host.replace(/^\[(.*)\]$/, "$1"), port })) : [];
    listen = [...tcp, ...(f.socket !== undefined ? [{ kind: "unix" as const, path: resolve(f.socket) }] : [])];
  }
  let metrics = s.metrics;
  if (f.metrics !== undefined) {
    const r = parseHostPort(f.metrics);
    if (!r.ok) return `--metrics: ${r.message.replace(", [IPV6]:PORT or unix:PATH", " or [IPV6]:PORT")}`;
    metrics = r.value;
  }
  let logFormat = s.logFormat;
  if (f["log-format"] !== undefined) {
    if (f["log-format"] !== "text" && f["log-format"] !== "json") return `--log-format must be text or json, not "${f["log-format"]}"`;
    logFormat = f["log-format"];
  }
  const security = securityFlags(s, f);
  if (typeof security === "string") return security;
  const verbose = f.verbose || (s.verbose && !f.quiet);
  const quiet = f.quiet || (s.quiet && !f.verbose);
  if (verbose && quiet) return "--verbose and --quiet cannot be used together";
  let workers = s.workers;
  if (f.workers !== undefined) {
    workers = Number(f.workers);
    if (!/^\d+$/.test(f.workers) || workers < 1 || workers > MAX_WORKERS) return `invalid --workers "${f.workers}" (1 to ${MAX_WORKERS})`;
  }
  let threads = s.threads;
  if (f.threads !== undefined) {
    threads = f.threads === "auto" ? "auto" : Number(f.threads);
    if (threads !== "auto" && (!/^\d+$/.test(f.threads) || threads > MAX_THREADS)) return `invalid --threads "${f.threads}" (auto, or 0 to ${MAX_THREADS})`;
  }
  return { ...s, ...security, listen, metrics, logFormat, verbose: !!verbose, quiet: !!quiet, readOnly: s.readOnly || !!f["read-only"], workers, threads };
}

/**
 * The TLS and access-control flags over the file's keys of the same names (a string is a usage
 * error). Whether they fit together (credentials for a TLS mode...) is the server's check.
 */
function securityFlags(s: ServerSettings, f: ServeFlags): Partial<ServerSettings> | string {
  const num = (key: "max-connections" | "max-connections-per-address" | "handshake-timeout", whole: boolean, dflt: number): number | string => {
    const v = f[key];
    if (v === undefined) return dflt;
    const n = Number(v);
    if (v.trim() === "" || !Number.isFinite(n) || n < 0 || (whole && !Number.isInteger(n))) return `invalid --${key} "${v}"`;
    return n;
  };
  if (f.tls !== undefined && !["off", "on", "require"].includes(f.tls)) return `invalid --tls "${f.tls}" (off, on or require)`;
  const maxConnections = num("max-connections", true, s.maxConnections);
  const maxConnectionsPerAddress = num("max-connections-per-address", true, s.maxConnectionsPerAddress);
  const handshakeTimeout = num("handshake-timeout", false, s.handshakeTimeout);
  for (const v of [maxConnections, maxConnectionsPerAddress, handshakeTimeout]) if (typeof v === "string") return v;
  return {
    tls: (f.tls as ServerSettings["tls"] | undefined) ?? s.tls,
    tlsCertificates: f["tls-certificates"] !== undefined ? resolve(f["tls-certificates"]) : s.tlsCertificates,
    tlsVerifyPeer: f["tls-verify-peer"] || s.tlsVerifyPeer,
    tlsPsk: f["tls-psk"] !== undefined ? resolve(f["tls-psk"]) : s.tlsPsk,
    allow: f.allow ?? s.allow,
    maxConnections: maxConnections as number, maxConnectionsPerAddress: maxConnectionsPerAddress as number,
    handshakeTimeout: handshakeTimeout as number,
  };
}
