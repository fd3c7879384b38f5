// The syntax of the values a config names in strings: listen addresses ("HOST:PORT", "[V6]:PORT",
// "unix:/path"). Pure: each returns the value or a message saying what is wrong. Whether an
// address or CIDR rule is a real IP address is for node:net to say (src/server/access.ts), which
// the config parser is handed as a checker.
import { isAbsolute, resolve } from "node:path";
import type { ListenAddress } from "./types.ts";

export type Parsed<T> = { ok: true; value: T } | { ok: false; message: string };
const ok = <T>(value: T): Parsed<T> => ({ ok: true, value });
const bad = <T>(message: string): Parsed<T> => ({ ok: false, message });

/** "HOST:PORT", "[V6]:PORT" or "unix:PATH" (a relative PATH is taken from `baseDir`). */
export function parseListen(s: string, baseDir: string): Parsed<ListenAddress> {
  if (s.startsWith("unix:")) {
    const p = s.slice(5);
    if (p === "") return bad(`"${s}": no socket path after "unix:"`);
    return ok({ kind: "unix", path: isAbsolute(p) ? p : resolve(baseDir, p) });
  }
  const hp = parseHostPort(s);
  return hp.ok ? ok({ kind: "tcp", host: hp.value.host, port: hp.value.port }) : hp;
}

/** "HOST:PORT" or "[V6]:PORT"; the host comes back without brackets. */
export function parseHostPort(s: string): Parsed<{ host: string; port: number }> {
  const m = /^\[([0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*)\]:(\d+)$/.exec(s) ?? /^([^:\[\]\s]+):(\d+)$/.exec(s);
  if (!m) return bad(`"${s}" is not HOST:PORT, [IPV6]:PORT or unix:PATH`);
  const host = m[1]!;
  const port = Number(m[2]);
  if (port > 65535) return bad(`"${s}": port ${port} is out of range (0-65535)`);
  if (/^[\d.]+$/.test(host) && !/^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.test(host)) return bad(`"${s}": ${host} is not an IPv4 address`);
  if (/^[\d.]+$/.test(host) && host.split(".").some((x) => Number(x) > 255)) return bad(`"${s}": ${host} is not an IPv4 address`);
  return ok({ host, port });
}

/** How a listen address is written in a config file. */
export function describeListen(a: ListenAddress): string {
  if (a.kind === "unix") return `unix:${a.path}`;
  return a.host.includes(":") ? `[${a.host}]:${a.port}` : `${a.host}:${a.port}`;
}
