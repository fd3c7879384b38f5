// Access rules on client addresses: CIDR allow-lists (a config's per-export `allow`), parsed and
// matched by node:net (isIP, BlockList), built once and asked at resolution. Unix-socket peers are
// local and pass every rule (file permissions guard the socket).
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
