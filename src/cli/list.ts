// `bun-nbd list URI [--json]`: every export of a server with its size, description and flags,
// as `nbdinfo --list` prints them. Wiring only.
import { parseArgs } from "node:util";
import { listExports, parseNbdUri } from "../client/index.ts";
import { formatListingJson, formatListingText } from "../client/report.ts";

const HELP = `usage: bun-nbd list [--json] URI

List every export of an NBD server with its size, description and flags,
as nbdinfo --list does. The export name in URI is ignored.

options:
  --json        JSON output (the same keys as nbdinfo --list --json)
  --timeout MS  deadline for the connection and each reply (default 10000)`;

export async function main(argv: string[]): Promise<number> {
  let args;
  try {
    args = parseArgs({
      args: argv,
      allowPositionals: true,
      options: { json: { type: "boolean" }, timeout: { type: "string" }, help: { type: "boolean", short: "h" } },
    });
  } catch (e) {
    console.error(`bun-nbd list: ${(e as Error).message}\n\n${HELP}`);
    return 2;
  }
  if (args.values.help) {
    console.log(HELP);
    return 0;
  }
  if (args.positionals.length !== 1) {
    console.error(`bun-nbd list: expected one URI\n\n${HELP}`);
    return 2;
  }
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
