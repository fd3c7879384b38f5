// TOML text -> validated, frozen ServiceConfig, or every problem as "FILE:LINE: KEY: MESSAGE".
// Pure: Bun.TOML parses, toml-lines.ts finds the lines, and the only view of the file system is
// an injected probe (missing files, overlay directories). Spelling of keys is part of the contract.
import { dirname, isAbsolute, resolve } from "node:path";
import { keyLines, syntaxErrorLine, type KeyLines } from "./toml-lines.ts";
import { parseHostPort, parseListen } from "./values.ts";
import {
  DEFAULT_SETTINGS, MAX_THREADS, deepFreeze, type ConfigError, type ExportConfig, type ListenAddress, type OverlayMode,
  type PathProbe, type ServerSettings, type ServiceConfig,
} from "./types.ts";

export const SERVER_KEYS = [
  "listen", "read-only", "verbose", "quiet", "log-format", "metrics",
  "tls", "tls-certificates", "tls-verify-peer", "tls-psk", "allow", "max-connections", "max-connections-per-address",
  "handshake-timeout", "workers", "threads",
] as const;
export const EXPORT_KEYS = [
  "name", "file", "read-only", "overlay", "overlay-dir", "compat", "partitions", "description", "allow", "client-name",
] as const;

/** A per-client overlay's client part: NAME@CLIENT. */
export const CLIENT_NAME = /^[A-Za-z0-9._-]{1,64}$/;
const MAX_EXPORT_NAME = 4096;
/** Serving processes at most (server.workers, serve --workers). */
export const MAX_WORKERS = 64;

export interface ParseOptions {
  /** The file's name in messages; relative paths in the file are taken from its directory. */
  file: string;
  /** What paths are, for the checks that need the file system; without it those are skipped. */
  probe?: PathProbe;
  /** Why a CIDR rule (`allow`) is not one, or null (src/server/access.ts's cidrProblem); without it only types are checked. */
  checkCidr?: (rule: string) => string | null;
  /** Whether an export's file names a remote object (src/devices/remote's isRemote): kept as written, not probed. */
  isRemote?: (file: string) => boolean;
}

export type ParseResult = { ok: true; config: ServiceConfig } | { ok: false; errors: ConfigError[] };

export function parseConfig(text: string, o: ParseOptions): ParseResult {
  let doc: unknown;
  try {
    doc = Bun.TOML.parse(text);
  } catch (e) {
    const msg = (e as Error).message.replace(/^TOML Parse error:\s*/, "");
    const line = syntaxErrorLine(text, (t) => Bun.TOML.parse(t));
    return { ok: false, errors: [{ file: o.file, line, key: "", message: `syntax error: ${msg}` }] };
  }
  const c = new Checker(o, keyLines(text), dirname(resolve(o.file)));
  const root = doc as Record<string, unknown>;
  for (const k of Object.keys(root)) {
    if (k !== "server" && k !== "export") c.err(k, `unknown ${isTable(root[k]) ? "table" : "key"} "${k}"${hint(k, ["server", "export"])}`);
  }
  const server = c.server(root.server);
  const exports = c.exports(root.export);
  if (c.errors.length) return { ok: false, errors: c.errors.sort((a, b) => a.line - b.line) };
  return { ok: true, config: deepFreeze({ file: resolve(o.file), server, exports }) };
}

const isTable = (v: unknown): v is Record<string, unknown> => v !== null && typeof v === "object" && !Array.isArray(v);

class Checker {
  readonly errors: ConfigError[] = [];
  constructor(private readonly o: ParseOptions, private readonly lines: KeyLines, private readonly dir: string) {}

  /** Record a problem at key `path` ("server.listen", "export.0.file"); shown as "export[1].file". */
  err(path: string, message: string): void {
    let line = this.lines.get(path);
    for (let p = path; line === undefined && p.includes("."); p = p.slice(0, p.lastIndexOf("."))) line = this.lines.get(p);
    const key = path.replace(/^export\.(\d+)/, (_, n) => `export[${Number(n) + 1}]`);
    this.errors.push({ file: this.o.file, line: line ?? 1, key, message });
  }

  private path(p: string): string {
    return isAbsolute(p) ? p : resolve(this.dir, p);
  }

  private str(t: Record<string, unknown>, k: string, at: string): string | undefined {
    const v = t[k];
    if (v === undefined) return undefined;
    if (typeof v !== "string") { this.err(`${at}.${k}`, `must be a string, not ${typeName(v)}`); return undefined; }
    return v;
  }
  private bool(t: Record<string, unknown>, k: string, at: string, dflt: boolean): boolean {
    const v = t[k];
    if (v === undefined) return dflt;
    if (typeof v !== "boolean") { this.err(`${at}.${k}`, `must be true or false, not ${typeName(v)}`); return dflt; }
    return v;
  }
  private oneOf<T extends string>(t: Record<string, unknown>, k: string, at: string, allowed: readonly T[], dflt: T): T {
    const v = this.str(t, k, at);
    if (v === undefined) return dflt;
    if (!(allowed as readonly string[]).includes(v)) { this.err(`${at}.${k}`, `must be one of ${allowed.map((a) => `"${a}"`).join(", ")}, not "${v}"`); return dflt; }
    return v as T;
  }
  /** A string or an array of strings. */
  private strings(t: Record<string, unknown>, k: string, at: string): string[] | undefined {
    const v = t[k];
    if (v === undefined) return undefined;
    const list = typeof v === "string" ? [v] : v;
    if (!Array.isArray(list) || list.some((x) => typeof x !== "string")) {
      this.err(`${at}.${k}`, `must be a string or an array of strings, not ${typeName(v)}`);
      return undefined;
    }
    return list as string[];
  }
  private cidrs(t: Record<string, unknown>, k: string, at: string): string[] {
    const list = this.strings(t, k, at) ?? [];
    for (const s of list) {
      const problem = this.o.checkCidr?.(s) ?? null;
      if (problem !== null) this.err(`${at}.${k}`, problem);
    }
    return list;
  }
  private unknownKeys(t: Record<string, unknown>, at: string, known: readonly string[], what: string): void {
    for (const k of Object.keys(t)) if (!known.includes(k)) this.err(`${at}.${k}`, `unknown key "${k}" in ${what}${hint(k, known)}`);
  }
  private probe(path: string, at: string, want: "file" | "directory" | "parent", what: string): void {
    const probe = this.o.probe;
    if (!probe) return;
    const p = want === "parent" ? dirname(path) : path;
    const kind = probe(p);
    if (want === "file" && kind === "directory") this.err(at, `${what} ${path} is a directory`);
    else if (want !== "file" && kind !== "directory") this.err(at, kind === "missing" ? `directory ${p} does not exist` : `${p} is not a directory`);
    else if (kind === "missing") this.err(at, `no such file: ${path}`);
  }

  server(v: unknown): ServerSettings {
    if (v === undefined) return DEFAULT_SETTINGS;
    if (!isTable(v)) { this.err("server", "must be a table ([server])"); return DEFAULT_SETTINGS; }
    const at = "server";
    this.unknownKeys(v, at, SERVER_KEYS, "[server]");
    const d = DEFAULT_SETTINGS;
    let listen: readonly ListenAddress[] = d.listen;
    const ls = this.strings(v, "listen", at);
    if (ls !== undefined) {
      if (ls.length === 0) this.err(`${at}.listen`, "lists no address");
      listen = ls.flatMap((s) => {
        const r = parseListen(s, this.dir);
        if (!r.ok) { this.err(`${at}.listen`, r.message); return []; }
        if (r.value.kind === "unix") this.probe(r.value.path, `${at}.listen`, "parent", "socket");
        else if (r.value.host.includes(":") && this.o.checkCidr?.(r.value.host)) { this.err(`${at}.listen`, `"${s}": ${r.value.host} is not an IPv6 address`); return []; }
        return [r.value];
      });
    }
    let metrics: ServerSettings["metrics"] = null;
    const m = this.str(v, "metrics", at);
    if (m !== undefined) {
      const r = parseHostPort(m);
      if (r.ok) metrics = r.value;
      else this.err(`${at}.metrics`, r.message.replace(", [IPV6]:PORT or unix:PATH", " or [IPV6]:PORT"));
    }
    const verbose = this.bool(v, "verbose", at, false);
    const quiet = this.bool(v, "quiet", at, false);
    if (verbose && quiet) this.err(`${at}.quiet`, "verbose and quiet cannot both be true");
    const tlsCertificates = this.optPath(v, "tls-certificates", at, "directory");
    const tlsPsk = this.optPath(v, "tls-psk", at, "file");
    const count = (k: string): number => {
      const n = v[k];
      if (n === undefined) return 0;
      if (Number.isInteger(n) && (n as number) >= 0) return n as number;
      this.err(`${at}.${k}`, `must be a whole number >= 0 (0: no limit), not ${show(n)}`);
      return 0;
    };
    const timeout = v["handshake-timeout"];
    if (timeout !== undefined && !(typeof timeout === "number" && timeout >= 0 && Number.isFinite(timeout))) {
      this.err(`${at}.handshake-timeout`, `must be a number of seconds >= 0 (0: none), not ${show(timeout)}`);
    }
    const workers = v.workers ?? d.workers;
    if (!(Number.isInteger(workers) && (workers as number) >= 1 && (workers as number) <= MAX_WORKERS)) {
      this.err(`${at}.workers`, `must be a whole number from 1 to ${MAX_WORKERS}, not ${show(workers)}`);
    }
    const threads = v.threads ?? d.threads;
    const threadsOk = threads === "auto" || (Number.isInteger(threads) && (threads as number) >= 0 && (threads as number) <= MAX_THREADS);
    if (!threadsOk) this.err(`${at}.threads`, `must be "auto" (one per core) or a whole number from 0 to ${MAX_THREADS} (0: none), not ${show(threads)}`);
    return {
      listen, metrics, verbose, quiet, tlsCertificates, tlsPsk, threads: threadsOk ? threads as number | "auto" : d.threads,
      workers: Number.isInteger(workers) && (workers as number) >= 1 && (workers as number) <= MAX_WORKERS ? workers as number : d.workers,
      readOnly: this.bool(v, "read-only", at, false),
      logFormat: this.oneOf(v, "log-format", at, ["text", "json"] as const, "text"),
      tls: this.oneOf(v, "tls", at, ["off", "on", "require"] as const, "off"),
      tlsVerifyPeer: this.bool(v, "tls-verify-peer", at, false),
      allow: this.cidrs(v, "allow", at),
      maxConnections: count("max-connections"),
      maxConnectionsPerAddress: count("max-connections-per-address"),
      handshakeTimeout: typeof timeout === "number" && timeout >= 0 ? timeout : d.handshakeTimeout,
    };
  }

  private optPath(t: Record<string, unknown>, k: string, at: string, want: "file" | "directory"): string | null {
    const s = this.str(t, k, at);
    if (s === undefined) return null;
    const p = this.path(s);
    this.probe(p, `${at}.${k}`, want, k);
    return p;
  }

  exports(v: unknown): ExportConfig[] {
    if (v === undefined) { this.err("", "no [[export]] table: nothing to serve"); return []; }
    if (!Array.isArray(v)) { this.err("export", "must be an array of tables: write [[export]], not [export]"); return []; }
    if (v.length === 0) { this.err("export", "no exports: nothing to serve"); return []; }
    const out: ExportConfig[] = [];
    const seen = new Map<string, number>();
    v.forEach((t: unknown, i) => {
      const at = `export.${i}`;
      if (!isTable(t)) { this.err(at, "must be a table"); return; }
      const e = this.export(t, at);
      if (e === null) return;
      const first = seen.get(e.name);
      if (first !== undefined) this.err(`${at}.name`, `duplicate export name "${e.name}" (first defined at line ${this.lines.get(`export.${first}.name`) ?? "?"})`);
      else seen.set(e.name, i);
      out.push(e);
    });
    return out;
  }

  private export(t: Record<string, unknown>, at: string): ExportConfig | null {
    this.unknownKeys(t, at, EXPORT_KEYS, "[[export]]");
    const name = this.str(t, "name", at);
    const fileText = this.str(t, "file", at);
    if (name === undefined && t.name === undefined) this.err(at, `missing key "name"`);
    if (fileText === undefined && t.file === undefined) this.err(at, `missing key "file"`);
    if (name !== undefined) {
      if (name === "") this.err(`${at}.name`, "must not be empty (the first export is the default one)");
      else if (new TextEncoder().encode(name).length > MAX_EXPORT_NAME) this.err(`${at}.name`, `is longer than ${MAX_EXPORT_NAME} bytes`);
    }
    // a remote base (http(s)://, s3://) is kept as written: the opener checks it when it starts
    const remote = fileText !== undefined && (this.o.isRemote?.(fileText) ?? false);
    const file = fileText === undefined ? undefined : remote ? fileText : this.path(fileText);
    if (file !== undefined && !remote) this.probe(file, `${at}.file`, "file", "file");
    const readOnly = this.bool(t, "read-only", at, false);
    const compat = this.bool(t, "compat", at, false);
    const partitions = this.bool(t, "partitions", at, true);
    const description = this.str(t, "description", at) ?? null;
    const allow = this.cidrs(t, "allow", at);
    const overlay = this.overlay(t, at, name, readOnly);
    if (t["client-name"] !== undefined && overlay.kind !== "per-client") this.err(`${at}.client-name`, `is only used with overlay = "per-client"`);
    const clientName = this.oneOf(t, "client-name", at, ["tls-identity", "any"] as const, "tls-identity");
    if (name === undefined || file === undefined) return null;
    const line = this.lines.get(at) ?? 1;
    return { name, file, readOnly, overlay, compat, partitions, description, allow, clientName, source: `${this.o.file}:${line}` };
  }

  private overlay(t: Record<string, unknown>, at: string, name: string | undefined, readOnly: boolean): OverlayMode {
    const ov = this.str(t, "overlay", at);
    const dirText = this.str(t, "overlay-dir", at);
    if (ov !== "per-client" && dirText !== undefined) this.err(`${at}.overlay-dir`, `is only used with overlay = "per-client"`);
    if (ov === undefined) return { kind: "none" };
    if (ov === "") { this.err(`${at}.overlay`, `must be "snapshot", "per-client" or the path of a qcow2 overlay`); return { kind: "none" }; }
    if (readOnly && (ov === "snapshot" || ov === "per-client")) {
      this.err(`${at}.read-only`, `read-only = true with overlay = "${ov}" leaves nothing to write to the overlay (the base is never written anyway)`);
    }
    if (ov === "snapshot") return { kind: "snapshot" };
    if (ov === "per-client") {
      if (name?.includes("@")) this.err(`${at}.name`, `a per-client export's name cannot contain "@" (clients connect to NAME@CLIENT)`);
      else if (name !== undefined && (name.includes("/") || /^\.*$/.test(name))) this.err(`${at}.name`, `a per-client export's name names its overlay files (NAME@CLIENT.qcow2): no "/", not "." or ".."`);
      if (dirText === undefined) { this.err(`${at}.overlay`, `overlay = "per-client" needs overlay-dir (where DIR/NAME@CLIENT.qcow2 live)`); return { kind: "none" }; }
      const dir = this.path(dirText);
      this.probe(dir, `${at}.overlay-dir`, "directory", "overlay-dir");
      return { kind: "per-client", dir };
    }
    const path = this.path(ov);
    this.probe(path, `${at}.overlay`, "parent", "overlay");
    if (this.o.probe?.(path) === "directory") this.err(`${at}.overlay`, `${path} is a directory (did you mean overlay = "per-client" with overlay-dir?)`);
    return { kind: "file", path };
  }
}

function typeName(v: unknown): string {
  if (Array.isArray(v)) return "an array";
  if (v instanceof Date) return "a date";
  if (v === null) return "null";
  if (typeof v === "object") return "a table";
  if (typeof v === "number") return Number.isInteger(v) ? `the number ${v}` : `the number ${v}`;
  return typeof v === "string" ? `the string "${v}"` : `${typeof v} ${String(v)}`;
}
const show = (v: unknown) => typeName(v);

/** ` (did you mean "x"?)` for a key a few edits away from a known one (one per three letters). */
function hint(k: string, known: readonly string[]): string {
  let best: string | null = null;
  let bestD = Math.max(1, Math.floor(k.length / 3)) + 1;
  for (const c of known) {
    const d = editDistance(k.toLowerCase(), c);
    if (d < bestD) { bestD = d; best = c; }
  }
  return best !== null ? ` (did you mean "${best}"?)` : "";
}

function editDistance(a: string, b: string): number {
  const row = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    let prev = row[0]!;
    row[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const cur = row[j]!;
      row[j] = Math.min(row[j]! + 1, row[j - 1]! + 1, prev + (a[i - 1] === b[j - 1] ? 0 : 1));
      prev = cur;
    }
  }
  return row[b.length]!;
}
