// Who may connect: CIDR allow-lists (--allow, and a config's per-export `allow`), parsed and
// matched by node:net (isIP, BlockList); the total and per-address connection caps counted at
// accept (Admission); the warning for listening beyond the loopback without TLS.
import { BlockList, isIP } from "node:net";
import type { ClientIdentity } from "./identity.ts";

/** Why `rule` is not "ADDRESS" or "ADDRESS/BITS" (IPv4 or IPv6), or null if it is. */
export function cidrProblem(rule: string): string | null {
  const parts = rule.split("/");
  const family = isIP(parts[0] ?? "");
  if (parts.length > 2 || family === 0) return `"${rule}" is not an IPv4 or IPv6 address or CIDR range (e.g. 192.0.2.0/24, 2001:db8::/32)`;
  const max = family === 4 ? 32 : 128;
  if (parts.length === 2 && !(/^\d{1,3}$/.test(parts[1]!) && Number(parts[1]) <= max)) return `"${rule}": prefix length must be 0-${max}`;
  return null;
}

export class AllowList {
  private readonly list: BlockList | null;

  /** Rules are "ADDR" or "ADDR/BITS"; a bad one throws (the config parser checks them first). */
  constructor(readonly rules: readonly string[]) {
    if (rules.length === 0) { this.list = null; return; }
    const b = new BlockList();
    for (const r of rules) {
      const problem = cidrProblem(r);
      if (problem !== null) throw new Error(`allow: ${problem}`);
      const [addr, bits] = r.split("/") as [string, string | undefined];
      const family = isIP(addr) === 4 ? "ipv4" : "ipv6";
      b.addSubnet(addr, bits === undefined ? (family === "ipv4" ? 32 : 128) : Number(bits), family);
    }
    this.list = b;
  }

  /** True when `client` may connect: a unix-socket peer, or a TCP peer inside a rule (any, if none). */
  allows(client: Pick<ClientIdentity, "transport" | "address">): boolean {
    const address = client.address;
    if (this.list === null || client.transport === "unix") return true;
    const family = address === null ? 0 : isIP(address);
    return family !== 0 && this.list.check(address!, family === 4 ? "ipv4" : "ipv6");
  }
}

export const ALLOW_ALL = new AllowList([]);

/** Whether a loopback address (127.0.0.0/8, ::1) or "localhost". */
export function isLoopback(host: string): boolean {
  return host === "localhost" || LOOPBACK.allows({ transport: "tcp", address: host.replace(/^\[|\]$/g, "") });
}
const LOOPBACK = new AllowList(["127.0.0.0/8", "::1"]);

/**
 * The warning for listening on `host` (a non-loopback address) without TLS required: null when
 * there is nothing to warn about. It names the risk and the fix.
 */
export function exposureWarning(host: string, port: number, tls: "off" | "on" | "require", allowList: boolean): string | null {
  if (isLoopback(host) || tls === "require") return null;
  const how = tls === "on" ? "with TLS optional" : "without TLS";
  return `serving ${host.includes(":") ? `[${host}]` : host}:${port} ${how}: anyone who can reach it ${allowList ? "from an allowed address " : ""}` +
    "can read and overwrite every export, and the traffic is in the clear. Use --tls=require with " +
    "--tls-certificates DIR (or --tls-psk FILE)" + (allowList ? "" : ", and --allow CIDR to name the hosts that may connect");
}

export interface AccessLimits {
  /** Allowed TCP peers (ALLOW_ALL: everyone). Unix-socket peers are not filtered (the file mode is their guard). */
  allow: AllowList;
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
    if (!allow.allows(c)) return `${c.address} is not in the allow-list`;
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
