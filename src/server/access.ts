// Who may connect, checked at accept: the allow-list (CIDR ranges, IPv4 and IPv6), the total and
// per-address connection caps, and the deadline for finishing the handshake. Pure bookkeeping: the
// server asks admit() at accept and calls release() at close.
import type { ClientIdentity, TlsMode } from "./types.ts";

/** One parsed CIDR range: 4 or 16 address bytes and a prefix length. */
export interface Cidr {
  text: string;
  bytes: Uint8Array;
  prefix: number;
}

function parseV4(s: string): Uint8Array | null {
  const parts = s.split(".");
  if (parts.length !== 4) return null;
  const b = new Uint8Array(4);
  for (let i = 0; i < 4; i++) {
    const p = parts[i]!;
    if (!/^\d{1,3}$/.test(p) || Number(p) > 255) return null;
    b[i] = Number(p);
  }
  return b;
}

function parseV6(s: string): Uint8Array | null {
  const zone = s.indexOf("%");
  if (zone >= 0) s = s.slice(0, zone);
  let tail: Uint8Array | null = null;
  const lastColon = s.lastIndexOf(":");
  if (s.includes(".")) {
    // An embedded IPv4 address in the last 32 bits (::ffff:192.0.2.1).
    tail = parseV4(s.slice(lastColon + 1));
    if (!tail) return null;
    s = `${s.slice(0, lastColon + 1)}0:0`;
  }
  const halves = s.split("::");
  if (halves.length > 2) return null;
  const groups = (h: string) => (h === "" ? [] : h.split(":"));
  const head = groups(halves[0]!);
  const rest = halves.length === 2 ? groups(halves[1]!) : [];
  const fill = 8 - head.length - rest.length;
  if (halves.length === 2 ? fill < 1 : fill !== 0) return null;
  const all = [...head, ...Array<string>(halves.length === 2 ? fill : 0).fill("0"), ...rest];
  const b = new Uint8Array(16);
  for (let i = 0; i < 8; i++) {
    const g = all[i]!;
    if (!/^[0-9a-fA-F]{1,4}$/.test(g)) return null;
    const v = parseInt(g, 16);
    b[2 * i] = v >> 8;
    b[2 * i + 1] = v & 0xff;
  }
  if (tail) b.set(tail, 12);
  return b;
}

/** An IP address as bytes: 4 for IPv4 (IPv4-mapped IPv6 addresses included), 16 for IPv6; null if not an address. */
export function parseAddress(s: string): Uint8Array | null {
  if (!s.includes(":")) return parseV4(s);
  const b = parseV6(s.replace(/^\[|\]$/g, ""));
  if (b && b.subarray(0, 10).every((x) => x === 0) && b[10] === 0xff && b[11] === 0xff) return b.slice(12);
  return b;
}

/** "192.0.2.0/24", "2001:db8::/32" or a lone address (a /32 or /128). Throws with a message naming the text. */
export function parseCidr(text: string): Cidr {
  const slash = text.indexOf("/");
  const addr = slash < 0 ? text : text.slice(0, slash);
  const bytes = addr.includes(":") ? parseV6(addr.replace(/^\[|\]$/g, "")) : parseV4(addr);
  const max = bytes ? bytes.length * 8 : 0;
  const prefixText = slash < 0 ? String(max) : text.slice(slash + 1);
  const prefix = Number(prefixText);
  if (!bytes || !/^\d{1,3}$/.test(prefixText) || prefix > max) {
    throw new Error(`"${text}" is not an IPv4 or IPv6 address or CIDR range (e.g. 192.0.2.0/24, 2001:db8::/32)`);
  }
  return { text, bytes, prefix };
}

/** Whether `addr` (bytes from parseAddress) is inside `c`. IPv4 ranges match IPv4 addresses only. */
export function cidrContains(c: Cidr, addr: Uint8Array): boolean {
  if (c.bytes.length !== addr.length) return false;
  let bits = c.prefix;
  for (let i = 0; bits > 0; i++, bits -= 8) {
    const mask = bits >= 8 ? 0xff : (0xff << (8 - bits)) & 0xff;
    if ((c.bytes[i]! & mask) !== (addr[i]! & mask)) return false;
  }
  return true;
}

/** Whether a loopback address (127.0.0.0/8, ::1) or "localhost". */
export function isLoopback(host: string): boolean {
  if (host === "localhost") return true;
  const b = parseAddress(host);
  if (!b) return false;
  return b.length === 4 ? b[0] === 127 : b.every((x, i) => x === (i === 15 ? 1 : 0));
}

/**
 * The warning for listening on `host` (a non-loopback address) without TLS required: null when
 * there is nothing to warn about. It names the risk and the fix.
 */
export function exposureWarning(host: string, port: number, tls: TlsMode, allowList: boolean): string | null {
  if (isLoopback(host) || tls === "require") return null;
  const how = tls === "on" ? "with TLS optional" : "without TLS";
  return `serving ${host.includes(":") ? `[${host}]` : host}:${port} ${how}: anyone who can reach it ${allowList ? "from an allowed address " : ""}` +
    "can read and overwrite every export, and the traffic is in the clear. Use --tls=require with " +
    "--tls-certificates DIR (or --tls-psk FILE)" + (allowList ? "" : ", and --allow CIDR to name the hosts that may connect");
}

export interface AccessLimits {
  /** Allowed TCP peers; empty: everyone. Unix-socket peers are not filtered (the file mode is their guard). */
  allow: readonly Cidr[];
  /** Open connections at once (0: no limit). */
  maxConnections: number;
  /** Open connections at once from one IP address (0: no limit). */
  maxConnectionsPerAddress: number;
}

/** Counts connections and decides at accept. */
export class Admission {
  private total = 0;
  private readonly perAddress = new Map<string, number>();

  constructor(private readonly limits: AccessLimits) {}

  /** Admits and counts the client, or returns why not (then nothing is counted). */
  admit(c: ClientIdentity): string | null {
    const { allow, maxConnections, maxConnectionsPerAddress } = this.limits;
    if (c.address !== null && allow.length > 0) {
      const b = parseAddress(c.address);
      if (!b || !allow.some((r) => cidrContains(r, b))) return `${c.address} is not in the allow-list`;
    }
    if (maxConnections > 0 && this.total >= maxConnections) return `already ${this.total} connections (max-connections)`;
    const n = c.address !== null ? this.perAddress.get(c.address) ?? 0 : 0;
    if (c.address !== null && maxConnectionsPerAddress > 0 && n >= maxConnectionsPerAddress) {
      return `already ${n} connections from ${c.address} (max-connections-per-address)`;
    }
    this.total++;
    if (c.address !== null) this.perAddress.set(c.address, n + 1);
    return null;
  }

  /** A client admitted earlier has gone. */
  release(c: ClientIdentity): void {
    this.total--;
    if (c.address === null) return;
    const n = (this.perAddress.get(c.address) ?? 1) - 1;
    if (n > 0) this.perAddress.set(c.address, n);
    else this.perAddress.delete(c.address);
  }
}
