// The shapes a configuration becomes: server settings and an export table, plain frozen data (so a
// worker or a reload can rebuild device stacks from them), and the error a bad file is reported as.
// The CLI's flags produce the same shapes, so a config file and a command line are one thing.

export type ListenAddress =
  | { readonly kind: "tcp"; readonly host: string; readonly port: number }
  | { readonly kind: "unix"; readonly path: string };

export type TlsMode = "off" | "on" | "require";
export type LogFormat = "text" | "json";

/** The [server] table, in the CLI's option names (read-only -> readOnly). */
export interface ServerSettings {
  readonly listen: readonly ListenAddress[];
  readonly readOnly: boolean;
  readonly verbose: boolean;
  readonly quiet: boolean;
  readonly logFormat: LogFormat;
  /** Where /metrics and /healthz are served (Bun.serve), or null. */
  readonly metrics: { readonly host: string; readonly port: number } | null;
  // TLS and access control (issue 13): names and meanings as nbdkit's options.
  readonly tls: TlsMode;
  readonly tlsCertificates: string | null;
  readonly tlsVerifyPeer: boolean;
  readonly tlsPsk: string | null;
  /** CIDR rules for every connection (empty: everyone). */
  readonly allow: readonly string[];
  /** Open connections at once, in all and from one IP address; 0: no limit. */
  readonly maxConnections: number;
  readonly maxConnectionsPerAddress: number;
  /** Seconds a client has to finish negotiating; 0: no deadline. */
  readonly handshakeTimeout: number;
  /** Processes serving connections (issue 15): 1 is one event loop; N > 1 is src/server/workers.ts. */
  readonly workers: number;
  /**
   * Connections to raw images (their partitions, ISOs) served on threads of their own, at most
   * (src/server/thread-pool.ts); 0: none; "auto": one per core (the CLI resolves it).
   */
  readonly threads: number | "auto";
}

export type OverlayMode =
  | { readonly kind: "none" }
  /** One throw-away overlay for the export, discarded at exit (serve --snapshot). */
  | { readonly kind: "snapshot" }
  /** One persistent qcow2 overlay (serve --overlay FILE). */
  | { readonly kind: "file"; readonly path: string }
  /** One overlay per client, DIR/NAME@CLIENT.qcow2 (throw-away without @CLIENT). */
  | { readonly kind: "per-client"; readonly dir: string };

/** Who may name a per-client overlay: with TLS on, by default only the client whose TLS identity it is. */
export type ClientNamePolicy = "tls-identity" | "any";

/** One [[export]] table. Paths are absolute (relative ones are resolved against the config's directory). */
export interface ExportConfig {
  readonly name: string;
  readonly file: string;
  readonly readOnly: boolean;
  readonly overlay: OverlayMode;
  /** Create overlays with standard L2 entries (QEMU older than 5.2). */
  readonly compat: boolean;
  /** Offer each partition of an MBR or GPT disk as NAME/pN too (serve --no-partitions turns it off). */
  readonly partitions: boolean;
  readonly description: string | null;
  /** CIDR rules for this export, on top of the server's (empty: everyone the server lets in). */
  readonly allow: readonly string[];
  readonly clientName: ClientNamePolicy;
  /** Where it was defined ("/etc/bun-nbd.toml:12", or "command line"), for messages at open time. */
  readonly source: string;
}

export interface ServiceConfig {
  /** The file it was read from, or null for a command line. */
  readonly file: string | null;
  readonly server: ServerSettings;
  readonly exports: readonly ExportConfig[];
}

/** One problem in a config file: "FILE:LINE: KEY: MESSAGE". */
export interface ConfigError {
  readonly file: string;
  readonly line: number;
  readonly key: string;
  readonly message: string;
}

export function formatConfigError(e: ConfigError): string {
  return `${e.file}:${e.line}: ${e.key ? `${e.key}: ` : ""}${e.message}`;
}

export const DEFAULT_PORT = 10809;
/** Connections on threads of their own at most, unless configured (threads; serve --threads): one per core. */
export const DEFAULT_THREADS = "auto";
/** The most threads one may ask for. */
export const MAX_THREADS = 1024;

export const DEFAULT_SETTINGS: ServerSettings = Object.freeze({
  listen: Object.freeze([Object.freeze({ kind: "tcp" as const, host: "127.0.0.1", port: DEFAULT_PORT })]),
  readOnly: false, verbose: false, quiet: false, logFormat: "text" as const, metrics: null,
  tls: "off" as const, tlsCertificates: null, tlsVerifyPeer: false, tlsPsk: null,
  allow: Object.freeze([]), maxConnections: 0, maxConnectionsPerAddress: 0, handshakeTimeout: 10, workers: 1, threads: DEFAULT_THREADS,
});

/** What a path is, for the checks that need the file system (injected: parsing stays pure). */
export type PathKind = "file" | "directory" | "other" | "missing";
export type PathProbe = (path: string) => PathKind;

/** Freeze a value and everything in it. */
export function deepFreeze<T>(v: T): T {
  if (v !== null && typeof v === "object" && !Object.isFrozen(v)) {
    Object.freeze(v);
    for (const x of Object.values(v as object)) deepFreeze(x);
  }
  return v;
}
