// Access rules on client addresses: CIDR allow-lists (a config's per-export `allow`, and the
// server-wide --allow of issue 13), built once into node:net BlockLists and asked at resolution.
// Unix-socket peers are local and pass every rule (file permissions guard the socket).
import { BlockList } from "node:net";
import { parseCidr } from "../config/values.ts";

export class AllowList {
  private readonly list: BlockList | null;
  readonly rules: readonly string[];

  /** Rules are "ADDR" or "ADDR/BITS" (validated by the config parser; a bad one throws here). */
  constructor(rules: readonly string[]) {
    this.rules = rules;
    if (rules.length === 0) { this.list = null; return; }
    const b = new BlockList();
    for (const r of rules) {
      const c = parseCidr(r);
      if (!c.ok) throw new Error(`allow: ${c.message}`);
      b.addSubnet(c.value.address, c.value.bits, c.value.family === 4 ? "ipv4" : "ipv6");
    }
    this.list = b;
  }

  /** True when `address` (an IP, or "unix") may connect. An empty list allows everyone. */
  allows(address: string): boolean {
    if (this.list === null || address === "unix") return true;
    const family = address.includes(":") ? "ipv6" : "ipv4";
    try {
      return this.list.check(address, family);
    } catch {
      return false;
    }
  }
}

export const ALLOW_ALL = new AllowList([]);
