// Per-connection request counts from the server's verbose (-v) log, e.g.
//   12:00:01.234 debug [3] READ flags=0x0 offset=0 length=4096
export type ConnCounts = Map<number, Record<string, number>>;

export function requestsPerConnection(log: string): ConnCounts {
  const out: ConnCounts = new Map();
  for (const m of log.matchAll(/debug \[(\d+)\] ([A-Z_0-9]+) flags=/g)) {
    const id = Number(m[1]);
    const c = out.get(id) ?? {};
    c[m[2]!] = (c[m[2]!] ?? 0) + 1;
    out.set(id, c);
  }
  return out;
}

export function describeCounts(c: ConnCounts): string {
  return [...c].map(([id, n]) => `conn ${id}: ${Object.entries(n).map(([k, v]) => `${k} ${v}`).join(", ")}`).join("; ") || "no requests logged";
}
