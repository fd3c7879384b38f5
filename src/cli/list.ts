// `bun-nbd list URI [--json]`: every export of a server with its size, description and flags,
// as `nbdinfo --list` prints them. Wiring only.
import { commandArgs } from "./args.ts";
import { listExports, parseNbdUri } from "../client/index.ts";
import { formatListingJson, formatListingText } from "../client/report.ts";

const HELP = `usage: bun-nbd list [--json] URI

List every export of an NBD server with its size, description and flags,
as nbdinfo --list does. The export name in URI is ignored.

options:
  --json        JSON output (the same keys as nbdinfo --list --json)
  --timeout MS  deadline for the connection and each reply (default 10000)`;

export async function main(argv: string[]): Promise<number> {
  const args = commandArgs("list", HELP, argv, { json: { type: "boolean" }, timeout: { type: "string" } }, { min: 1, max: 1, what: "one URI" });
  if (typeof args === "number") return args;
  try {
    const target = parseNbdUri(args.positionals[0]!);
    const timeout = args.values.timeout ? Number(args.values.timeout) : 10_000;
    const listing = await listExports(target, { connectTimeoutMs: timeout });
    process.stdout.write(args.values.json ? formatListingJson(listing, target) : formatListingText(listing, target));
    return 0;
  } catch (e) {
    const err = e as Error & { code?: string };
    console.error(`bun-nbd list: ${err.message}${err.code && !err.message.includes(err.code) ? ` (${err.code})` : ""}`);
    return 1;
  }
}
