// `bun-nbd overlay list [--json] DIR`: the per-client overlays (NAME@CLIENT.qcow2) in a server's
// overlay directory, with their sizes, last use and whether something has them open. Wiring only.
import { listClientOverlays } from "../devices/per-client.ts";
import { formatSize } from "./format.ts";

export function list(pos: string[], o: { json?: string | boolean }): number {
  if (pos.length !== 1) {
    console.error("bun-nbd overlay list: expected one DIR (a per-client overlay directory)");
    return 2;
  }
  const rows = listClientOverlays(pos[0]!);
  if (o.json) {
    console.log(JSON.stringify(rows.map((r) => ({ ...r, lastUse: r.lastUse.toISOString() })), null, 2));
    return 0;
  }
  if (rows.length === 0) {
    console.log(`no per-client overlays (NAME@CLIENT.qcow2) in ${pos[0]}`);
    return 0;
  }
  const table = [["EXPORT", "CLIENT", "SIZE", "ON DISK", "LAST USE", "STATE"], ...rows.map((r) => [
    r.export, r.client, r.size === null ? "?" : formatSize(r.size), formatSize(r.allocated),
    r.lastUse.toISOString().replace("T", " ").slice(0, 19), r.inUse ? "in use" : "idle",
  ])];
  const w = table[0]!.map((_, c) => Math.max(...table.map((row) => row[c]!.length)));
  for (const row of table) console.log(row.map((x, c) => (c >= 2 && c <= 3 ? x.padStart(w[c]!) : x.padEnd(w[c]!))).join("  ").trimEnd());
  return 0;
}
