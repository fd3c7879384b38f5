// The syntax of the values a config names in strings: listen addresses ("HOST:PORT", "[V6]:PORT",
// "unix:/path"), CIDR rules and durations. Pure: each returns the value or a message saying what
// is wrong; matching addresses against rules happens in src/server/access.ts.
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
  const m = /^\[([0-9A-Fa-f:.]+)\]:(\d+)$/.exec(s) ?? /^([^:\[\]\s]+):(\d+)$/.exec(s);
  if (!m) return bad(`"${s}" is not HOST:PORT, [IPV6]:PORT or unix:PATH`);
  const host = m[1]!;
  const port = Number(m[2]);
  if (port > 65535) return bad(`"${s}": port ${port} is out of range (0-65535)`);
  if (s.startsWith("[") && ipv6Bytes(host) === null) return bad(`"${s}": ${host} is not an IPv6 address`);
  if (!s.startsWith("[") && /^[\d.]+$/.test(host) && ipv4Bytes(host) === null) return bad(`"${s}": ${host} is not an IPv4 address`);
  return ok({ host, port });
}

/** "ADDR" or "ADDR/BITS", IPv4 or IPv6. */
export function parseCidr(s: string): Parsed<{ address: string; bits: number; family: 4 | 6 }> {
  const [addr, bitsText, extra] = s.split("/");
  if (extra !== undefined || addr === undefined) return bad(`"${s}" is not ADDRESS or ADDRESS/BITS`);
  const family = ipv4Bytes(addr) !== null ? 4 : ipv6Bytes(addr) !== null ? 6 : 0;
  if (family === 0) return bad(`"${s}": ${addr} is not an IPv4 or IPv6 address`);
  const max = family === 4 ? 32 : 128;
  if (bitsText === undefined) return ok({ address: addr, bits: max, family });
  if (!/^\d{1,3}$/.test(bitsText) || Number(bitsText) > max) return bad(`"${s}": prefix length must be 0-${max}`);
  return ok({ address: addr, bits: Number(bitsText), family });
}

export function ipv4Bytes(s: string): number[] | null {
  const parts = s.split(".");
  if (parts.length !== 4) return null;
  const out: number[] = [];
  for (const p of parts) {
    if (!/^\d{1,3}$/.test(p) || Number(p) > 255) return null;
    out.push(Number(p));
  }
  return out;
}

/** 16 bytes of an IPv6 address ("::" compression and a trailing dotted IPv4 allowed), or null. */
export function ipv6Bytes(s: string): number[] | null {
  if (!/^[0-9A-Fa-f:.]+$/.test(s)) return null;
  let tail: number[] = [];
  let text = s;
  if (s.includes(".")) {
    const i = s.lastIndexOf(":");
    const v4 = i < 0 ? null : ipv4Bytes(s.slice(i + 1));
    if (v4 === null) return null;
    tail = v4;
    text = s.slice(0, i + 1);
    if (!text.endsWith("::")) text = text.slice(0, -1);
  }
  const want = 8 - tail.length / 2;
  const halves = text.split("::");
  if (halves.length > 2) return null;
  const groups = (t: string) => (t === "" ? [] : t.split(":"));
  let words: string[];
  if (halves.length === 1) {
    words = groups(halves[0]!);
    if (words.length !== want) return null;
  } else {
    const h = groups(halves[0]!);
    const r = groups(halves[1]!);
    if (h.length + r.length > want - 1) return null;
    words = [...h, ...Array<string>(want - h.length - r.length).fill("0"), ...r];
  }
  const out: number[] = [];
  for (const w of words) {
    if (!/^[0-9A-Fa-f]{1,4}$/.test(w)) return null;
    const n = parseInt(w, 16);
    out.push(n >> 8, n & 255);
  }
  return [...out, ...tail];
}

/** An NBD URI or "unix:" form for a listen address, to print. */
export function describeListen(a: ListenAddress): string {
  if (a.kind === "unix") return `unix:${a.path}`;
  return a.host.includes(":") ? `[${a.host}]:${a.port}` : `${a.host}:${a.port}`;
}
