// `bun-nbd map URI [--json] [--totals] [--context NAME]`: an export's extents for one meta
// context (base:allocation by default), merged, as `nbdinfo --map` prints them. Wiring only.
import { commandArgs } from "./args.ts";
import { BASE_ALLOCATION } from "../protocol/constants.ts";
import { connect } from "../client/index.ts";
import { formatMapJson, formatMapText, formatMapTotals, formatMapTotalsJson } from "../client/report.ts";

const HELP = `usage: bun-nbd map [--json] [--totals] [--context NAME] URI

Print the export's allocation map as nbdinfo --map does: offset, length,
type and description per run of equal status.

options:
  --json            JSON output (as nbdinfo --map --json)
  --totals          bytes and percentage per type instead of the extents
  --context NAME    meta context to map (default base:allocation; e.g. qemu:allocation-depth)
  --timeout MS      deadline of every request (default 60000)`;

export async function main(argv: string[]): Promise<number> {
  const args = commandArgs("map", HELP, argv, {
    json: { type: "boolean" }, totals: { type: "boolean" }, context: { type: "string" }, timeout: { type: "string" },
  }, { min: 1, max: 1, what: "one URI" });
  if (typeof args === "number") return args;
  const o = args.values;
  const context = o.context ?? BASE_ALLOCATION;
  const timeout = o.timeout ? Number(o.timeout) : 60_000;
  let client;
  try {
    client = await connect(args.positionals[0]!, { metaContexts: [context], requestTimeoutMs: timeout });
    if (!client.metaContexts.has(context)) throw new Error(`the server does not support meta context "${context}"`);
    const extents = await client.extents(0, client.size, context);
    const out = o.totals
      ? (o.json ? formatMapTotalsJson : formatMapTotals)(extents, context, client.size)
      : (o.json ? formatMapJson : formatMapText)(extents, context);
    process.stdout.write(out);
    return 0;
  } catch (e) {
    const err = e as Error & { code?: string };
    console.error(`bun-nbd map: ${err.message}${err.code && !err.message.includes(err.code) ? ` (${err.code})` : ""}`);
    return 1;
  } finally {
    await client?.close();
  }
}
