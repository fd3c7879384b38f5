// Text and JSON reports of what a server says, in the formats of libnbd's nbdinfo (so scripts
// written for `nbdinfo`, `nbdinfo --json`, `nbdinfo --list` and `nbdinfo --map` can read ours).
// Pure formatting: no I/O.
import type { Extent } from "./client.ts";
import type { ListedExport, ServerListing } from "./connect.ts";
import { formatNbdUri, type NbdTarget } from "./uri.ts";

/** libnbd's human_size: 8388608 -> "8M" (only exact multiples of a power of 1024 get a suffix). */
export function humanSize(bytes: number): { text: string; human: boolean } {
  const ext = ["", "K", "M", "G", "T", "P", "E"];
  let i = 0;
  let v = bytes;
  if (v !== 0) {
    while (v % 1024 === 0 && i < ext.length - 1) {
      v /= 1024;
      i++;
    }
  }
  return { text: `${v}${ext[i]}`, human: i > 0 };
}

function flagLines(e: ListedExport): [string, boolean | number][] {
  const out: [string, boolean | number][] = [
    ["is_rotational", e.rotational],
    ["is_read_only", e.readOnly],
    ["can_cache", e.canCache],
    ["can_df", e.canDf],
    ["can_fast_zero", e.canFastZero],
    ["can_flush", e.canFlush],
    ["can_fua", e.canFua],
    ["can_multi_conn", e.canMultiConn],
    ["can_trim", e.canTrim],
    ["can_zero", e.canZero],
  ];
  if (e.blockSize) {
    out.push(["block_size_minimum", e.blockSize.minimum]);
    out.push(["block_size_preferred", e.blockSize.preferred]);
    out.push(["block_size_maximum", e.blockSize.maximum]);
  }
  return out;
}

function description(e: ListedExport): string | undefined {
  return e.description ?? (e.listDescription !== "" ? e.listDescription : undefined);
}

/** The text `nbdinfo` (or `nbdinfo --list`) prints, minus its "content:" line (which needs file(1)). */
export function formatListingText(l: ServerListing, target: NbdTarget): string {
  const lines = [`protocol: ${l.style} ${l.tls ? "with" : "without"} TLS, using ${l.structured ? "structured" : "simple"} packets`];
  for (const e of l.exports) {
    lines.push(`export="${e.name}":`);
    const d = description(e);
    if (d !== undefined) lines.push(`\tdescription: ${d}`);
    const hs = humanSize(e.size);
    lines.push(`\texport-size: ${e.size}${hs.human ? ` (${hs.text})` : ""}`);
    lines.push(`\turi: ${formatNbdUri({ ...target, exportName: e.name })}`);
    if (e.contexts.length) {
      lines.push("\tcontexts:");
      for (const c of e.contexts) lines.push(`\t\t${c}`);
    }
    for (const [k, v] of flagLines(e)) lines.push(`\t${k}: ${v}`);
  }
  return lines.join("\n") + "\n";
}

/** The JSON `nbdinfo --json` (or `--list --json`) prints, minus "content". */
export function formatListingJson(l: ServerListing, target: NbdTarget): string {
  const doc = {
    protocol: l.style,
    TLS: l.tls,
    structured: l.structured,
    exports: l.exports.map((e) => {
      const o: Record<string, unknown> = { "export-name": e.name };
      const d = description(e);
      if (d !== undefined) o.description = d;
      o.uri = formatNbdUri({ ...target, exportName: e.name });
      if (e.contexts.length) o.contexts = e.contexts;
      for (const [k, v] of flagLines(e)) o[k] = v;
      o["export-size"] = e.size;
      o["export-size-str"] = humanSize(e.size).text;
      return o;
    }),
  };
  return JSON.stringify(doc, null, 2) + "\n";
}

/** nbdinfo's description of one extent's status for a meta context. */
export function extentDescription(context: string, flags: number): string | undefined {
  if (context === "base:allocation") {
    const parts: string[] = [];
    if (flags & 1) parts.push("hole");
    if (flags & 2) parts.push("zero");
    if (flags & ~3) parts.push(`unknown (0x${(flags & ~3).toString(16)})`);
    return parts.length ? parts.join(",") : "data";
  }
  if (context === "qemu:allocation-depth") {
    return flags === 0 ? "unallocated" : flags === 1 ? "local" : `backing depth ${flags}`;
  }
  if (context.startsWith("qemu:dirty-bitmap:")) {
    const d = flags & 1 ? "dirty" : "clean";
    return flags & ~1 ? `${d},unknown (0x${(flags & ~1).toString(16)})` : d;
  }
  return undefined;
}

/** The text `nbdinfo --map` prints: offset, length, type, description. */
export function formatMapText(extents: readonly Extent[], context: string): string {
  return extents.map((e) => {
    const d = extentDescription(context, e.flags);
    return `${String(e.offset).padStart(10)}  ${String(e.length).padStart(10)}  ${String(e.flags).padStart(3)}${d !== undefined ? `  ${d}` : ""}\n`;
  }).join("");
}

/** The JSON `nbdinfo --map --json` prints. */
export function formatMapJson(extents: readonly Extent[], context: string): string {
  const rows = extents.map((e) => {
    const d = extentDescription(context, e.flags);
    return `{ "offset": ${e.offset}, "length": ${e.length}, "type": ${e.flags}${d !== undefined ? `, "description": ${JSON.stringify(d)}` : ""}}`;
  });
  return `[\n${rows.join(",\n")}\n]\n`;
}

function totals(extents: readonly Extent[]): [number, number][] {
  const t = new Map<number, number>();
  for (const e of extents) t.set(e.flags, (t.get(e.flags) ?? 0) + e.length);
  return [...t.entries()].sort((a, b) => a[0] - b[0]);
}

/** `nbdinfo --map --totals`: bytes and percentage per status value. */
export function formatMapTotals(extents: readonly Extent[], context: string, size: number): string {
  return totals(extents).map(([flags, bytes]) => {
    const pct = size ? (100 * bytes) / size : 0;
    const d = extentDescription(context, flags);
    return `${String(bytes).padStart(10)} ${pct.toFixed(1).padStart(5)}% ${String(flags).padStart(3)}${d !== undefined ? ` ${d}` : ""}\n`;
  }).join("");
}

/** `nbdinfo --map --totals --json`. */
export function formatMapTotalsJson(extents: readonly Extent[], context: string, size: number): string {
  const rows = totals(extents).map(([flags, bytes]) => {
    const d = extentDescription(context, flags);
    const pct = size ? Number(((100 * bytes) / size).toPrecision(6)) : 0;
    return `{ "size": ${bytes}, "percent": ${pct}, "type": ${flags}${d !== undefined ? `, "description": ${JSON.stringify(d)}` : ""} }`;
  });
  return `[\n${rows.join(",\n")}\n]\n`;
}
