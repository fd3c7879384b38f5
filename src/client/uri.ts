// Parsing NBD URIs (doc/uri.md of the NBD project) and the short forms the CLI accepts, with
// libnbd's TLS query parameters for nbds:// and nbds+unix://.
import { NbdUsageError } from "./errors.ts";

/**
 * TLS for a target (nbds:// and nbds+unix://), in libnbd's terms. X.509 unless `pskFile` is set.
 * Credentials are read when connecting (client/tls.ts).
 */
export interface TlsTarget {
  /** Directory with ca-cert.pem (to check the server) and optionally client-cert.pem + client-key.pem. Absent: the system's CAs. */
  certificates?: string;
  /** Check the server's certificate (default true). */
  verifyPeer: boolean;
  /** psktool-format key file: PSK instead of certificates. */
  pskFile?: string;
  /** PSK username (default: the login name). */
  username?: string;
  /** The name the server's certificate must carry (default: the URI's host, "localhost" on unix sockets). */
  hostname?: string;
}

/** Where and what to connect to; `tls` makes TLS mandatory. */
export type NbdTarget =
  | { transport: "tcp"; host: string; port: number; exportName: string; tls?: TlsTarget }
  | { transport: "unix"; path: string; exportName: string; tls?: TlsTarget };

/** The IANA port of NBD, used when a URI names none. */
export const NBD_DEFAULT_PORT = 10809;

/**
 * Parses an NBD URI or a short form:
 * - `nbd://host[:port][/export]` (IPv6 hosts in brackets; the export name is the percent-decoded
 *   path minus its leading `/`, so `nbd://h//disk` names `/disk`);
 * - `nbd+unix:///export?socket=PATH` (`socket` is required);
 * - `nbds://[user@]host[:port][/export]` and `nbds+unix://[user@]/export?socket=PATH`: the same
 *   with TLS required, and libnbd's parameters `tls-certificates=DIR`, `tls-verify-peer=false`,
 *   `tls-psk-file=FILE`, `tls-username=NAME` (or the user part), `tls-hostname=NAME`;
 * - a bare `host:port` or `[v6]:port` (default export);
 * - a unix socket path starting with `/` or `.` (default export).
 *
 * Other schemes throw an {@link NbdUsageError} with code "UNSUPPORTED_SCHEME"; malformed input
 * (or TLS parameters on a URI without TLS) throws code "BAD_URI".
 */
export function parseNbdUri(input: string): NbdTarget {
  const scheme = /^([A-Za-z][A-Za-z0-9+.-]*):\/\//.exec(input);
  if (!scheme) return parseShort(input);
  const name = scheme[1]!.toLowerCase();
  if (!["nbd", "nbd+unix", "nbds", "nbds+unix"].includes(name)) {
    throw new NbdUsageError("UNSUPPORTED_SCHEME", `unsupported URI scheme "${name}://" (use nbd://, nbd+unix://, nbds:// or nbds+unix://): ${input}`);
  }
  const secure = name.startsWith("nbds");
  const rest = input.slice(scheme[0].length);
  const m = /^([^/?#]*)([^?#]*)(?:\?([^#]*))?(?:#.*)?$/.exec(rest);
  if (!m) throw new NbdUsageError("BAD_URI", `malformed NBD URI: ${input}`);
  const user = /^([^@]*)@/.exec(m[1]!)?.[1];
  const authority = m[1]!.replace(/^[^@]*@/, "");
  const path = m[2]!;
  const query = parseQuery(m[3] ?? "", input);
  const exportName = path === "" ? "" : decode(path.slice(1), input);
  for (const key of query.keys()) {
    if (key !== "socket" && !key.startsWith("tls-") && !key.startsWith("x-")) {
      throw new NbdUsageError("BAD_URI", `unknown query parameter "${key}" in ${input}`);
    }
  }
  const tls = secure ? tlsTarget(query, user === undefined ? undefined : decode(user, input), input) : undefined;
  if (!secure && (query.has("tls-type") || query.has("tls-certificates") || query.has("tls-psk-file") || query.get("tls-verify-peer") === "1")) {
    throw new NbdUsageError("BAD_URI", `TLS parameters need an nbds:// or nbds+unix:// URI: ${input}`);
  }
  if (name.endsWith("+unix")) {
    const socket = query.get("socket");
    if (!socket) throw new NbdUsageError("BAD_URI", `nbd+unix:// needs ?socket=PATH: ${input}`);
    if (authority !== "" && authority !== "localhost") {
      throw new NbdUsageError("BAD_URI", `nbd+unix:// takes no host (write nbd+unix:///export?socket=PATH): ${input}`);
    }
    return { transport: "unix", path: socket, exportName, ...(tls ? { tls } : {}) };
  }
  if (query.has("socket")) throw new NbdUsageError("BAD_URI", `?socket= belongs in nbd+unix:// URIs: ${input}`);
  const { host, port } = parseHostPort(authority, input, true);
  return { transport: "tcp", host, port, exportName, ...(tls ? { tls } : {}) };
}

function tlsTarget(q: Map<string, string>, user: string | undefined, input: string): TlsTarget {
  const type = q.get("tls-type");
  if (type !== undefined && !["x509", "psk"].includes(type)) {
    throw new NbdUsageError("UNSUPPORTED_SCHEME", `tls-type=${type} is not supported (x509 or psk): ${input}`);
  }
  const verify = q.get("tls-verify-peer");
  if (verify !== undefined && !["0", "1", "false", "true"].includes(verify)) {
    throw new NbdUsageError("BAD_URI", `tls-verify-peer must be true or false: ${input}`);
  }
  const t: TlsTarget = { verifyPeer: verify !== "0" && verify !== "false" };
  const certificates = q.get("tls-certificates");
  const pskFile = q.get("tls-psk-file");
  if (certificates !== undefined) t.certificates = certificates;
  if (pskFile !== undefined) t.pskFile = pskFile;
  if (type === "psk" && pskFile === undefined) throw new NbdUsageError("BAD_URI", `tls-type=psk needs tls-psk-file=FILE: ${input}`);
  if (pskFile !== undefined && certificates !== undefined) throw new NbdUsageError("BAD_URI", `tls-certificates and tls-psk-file exclude each other: ${input}`);
  const username = q.get("tls-username") ?? user;
  if (username !== undefined && username !== "") t.username = username;
  const hostname = q.get("tls-hostname");
  if (hostname !== undefined && hostname !== "") t.hostname = hostname;
  return t;
}

/** The canonical URI of a target, formatted as libnbd's nbd_get_uri does (TLS parameters included). */
export function formatNbdUri(t: NbdTarget): string {
  const name = encodeExportName(t.exportName);
  const s = t.tls ? "nbds" : "nbd";
  const params: string[] = [];
  if (t.tls?.certificates !== undefined) params.push(`tls-certificates=${encodeURI(t.tls.certificates)}`);
  if (t.tls?.pskFile !== undefined) params.push(`tls-psk-file=${encodeURI(t.tls.pskFile)}`);
  if (t.tls?.hostname !== undefined) params.push(`tls-hostname=${encodeURIComponent(t.tls.hostname)}`);
  if (t.tls && !t.tls.verifyPeer) params.push("tls-verify-peer=false");
  const user = t.tls?.username !== undefined ? `${encodeURIComponent(t.tls.username)}@` : "";
  if (t.transport === "unix") return `${s}+unix://${user}/${name}?${[`socket=${encodeURI(t.path)}`, ...params].join("&")}`;
  const host = t.host.includes(":") ? `[${t.host}]` : t.host;
  return `${s}://${user}${host}:${t.port}/${name}${params.length ? `?${params.join("&")}` : ""}`;
}

function encodeExportName(name: string): string {
  return encodeURIComponent(name).replace(/%2F/gi, "/");
}

function parseShort(input: string): NbdTarget {
  if (input.startsWith("/") || input.startsWith(".")) return { transport: "unix", path: input, exportName: "" };
  if (input.includes("/")) throw new NbdUsageError("BAD_URI", `not an NBD URI, host:port or socket path: ${input}`);
  const { host, port } = parseHostPort(input, input, false);
  return { transport: "tcp", host, port, exportName: "" };
}

function parseHostPort(authority: string, input: string, portOptional: boolean): { host: string; port: number } {
  let host: string;
  let portText: string | undefined;
  const v6 = /^\[([^\]]+)\](?::(.*))?$/.exec(authority);
  if (v6) {
    host = v6[1]!;
    portText = v6[2];
  } else {
    const i = authority.lastIndexOf(":");
    if (i >= 0 && authority.indexOf(":") !== i) throw new NbdUsageError("BAD_URI", `IPv6 addresses go in brackets: ${input}`);
    host = i >= 0 ? authority.slice(0, i) : authority;
    portText = i >= 0 ? authority.slice(i + 1) : undefined;
  }
  if (host === "") host = "localhost";
  if (portText === undefined || portText === "") {
    if (!portOptional) throw new NbdUsageError("BAD_URI", `missing port in ${input} (write host:port or an nbd:// URI)`);
    return { host, port: NBD_DEFAULT_PORT };
  }
  if (!/^\d{1,5}$/.test(portText) || Number(portText) > 65535 || Number(portText) === 0) {
    throw new NbdUsageError("BAD_URI", `bad port "${portText}" in ${input}`);
  }
  return { host, port: Number(portText) };
}

function parseQuery(q: string, input: string): Map<string, string> {
  const out = new Map<string, string>();
  if (q === "") return out;
  for (const part of q.split(/[&;]/)) {
    if (part === "") continue;
    const eq = part.indexOf("=");
    const key = decode(eq < 0 ? part : part.slice(0, eq), input);
    const value = eq < 0 ? "" : decode(part.slice(eq + 1), input);
    out.set(key, value);
  }
  return out;
}

function decode(s: string, input: string): string {
  try {
    return decodeURIComponent(s);
  } catch {
    throw new NbdUsageError("BAD_URI", `bad percent-encoding in ${input}`);
  }
}
