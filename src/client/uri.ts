// Parsing NBD URIs (doc/uri.md of the NBD project) and the short forms the CLI accepts.
import { NbdUsageError } from "./errors.ts";

/** Where and what to connect to. */
export type NbdTarget =
  | { transport: "tcp"; host: string; port: number; exportName: string }
  | { transport: "unix"; path: string; exportName: string };

/** The IANA port of NBD, used when a URI names none. */
export const NBD_DEFAULT_PORT = 10809;

/**
 * Parses an NBD URI or a short form:
 * - `nbd://host[:port][/export]` (IPv6 hosts in brackets; the export name is the percent-decoded
 *   path minus its leading `/`, so `nbd://h//disk` names `/disk`);
 * - `nbd+unix:///export?socket=PATH` (`socket` is required);
 * - a bare `host:port` or `[v6]:port` (default export);
 * - a unix socket path starting with `/` or `.` (default export).
 *
 * `nbds://` and `nbds+unix://` (TLS) and other schemes throw an {@link NbdUsageError} with code
 * "UNSUPPORTED_SCHEME"; malformed input throws code "BAD_URI".
 */
export function parseNbdUri(input: string): NbdTarget {
  const scheme = /^([A-Za-z][A-Za-z0-9+.-]*):\/\//.exec(input);
  if (!scheme) return parseShort(input);
  const name = scheme[1]!.toLowerCase();
  if (name === "nbds" || name === "nbds+unix") {
    throw new NbdUsageError("UNSUPPORTED_SCHEME", `${name}:// needs TLS, which this client does not support yet: ${input}`);
  }
  if (name !== "nbd" && name !== "nbd+unix") {
    throw new NbdUsageError("UNSUPPORTED_SCHEME", `unsupported URI scheme "${name}://" (use nbd:// or nbd+unix://): ${input}`);
  }
  const rest = input.slice(scheme[0].length);
  const m = /^([^/?#]*)([^?#]*)(?:\?([^#]*))?(?:#.*)?$/.exec(rest);
  if (!m) throw new NbdUsageError("BAD_URI", `malformed NBD URI: ${input}`);
  const authority = m[1]!.replace(/^[^@]*@/, "");
  const path = m[2]!;
  const query = parseQuery(m[3] ?? "", input);
  const exportName = path === "" ? "" : decode(path.slice(1), input);
  for (const key of query.keys()) {
    if (key !== "socket" && !key.startsWith("tls-") && !key.startsWith("x-")) {
      throw new NbdUsageError("BAD_URI", `unknown query parameter "${key}" in ${input}`);
    }
  }
  if (query.has("tls-type") || query.get("tls-verify-peer") === "1") {
    throw new NbdUsageError("UNSUPPORTED_SCHEME", `TLS parameters need TLS, which this client does not support yet: ${input}`);
  }
  if (name === "nbd+unix") {
    const socket = query.get("socket");
    if (!socket) throw new NbdUsageError("BAD_URI", `nbd+unix:// needs ?socket=PATH: ${input}`);
    if (authority !== "" && authority !== "localhost") {
      throw new NbdUsageError("BAD_URI", `nbd+unix:// takes no host (write nbd+unix:///export?socket=PATH): ${input}`);
    }
    return { transport: "unix", path: socket, exportName };
  }
  if (query.has("socket")) throw new NbdUsageError("BAD_URI", `?socket= belongs in nbd+unix:// URIs: ${input}`);
  const { host, port } = parseHostPort(authority, input, true);
  return { transport: "tcp", host, port, exportName };
}

/** The canonical URI of a target, formatted as libnbd's nbd_get_uri does. */
export function formatNbdUri(t: NbdTarget): string {
  const name = encodeExportName(t.exportName);
  if (t.transport === "unix") return `nbd+unix:///${name}?socket=${encodeURI(t.path)}`;
  const host = t.host.includes(":") ? `[${t.host}]` : t.host;
  return `nbd://${host}:${t.port}/${name}`;
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
