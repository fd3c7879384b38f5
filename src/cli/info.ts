// `bun-nbd info URI [--json]`: what nbdinfo prints about one export (size, flags, block sizes,
// description, meta contexts). Wiring only: src/client does the talking and the formatting.
import { commandArgs } from "./args.ts";
import { inspectExport, parseNbdUri } from "../client/index.ts";
import { formatListingJson, formatListingText } from "../client/report.ts";

const HELP = `usage: bun-nbd info [--json] [--size] URI

Show an export's size, flags, block sizes, description and meta contexts,
as nbdinfo does. URI: nbd://host[:port]/export, nbd+unix:///export?socket=PATH,
host:port or a unix socket path.

options:
  --json      JSON output (the same keys as nbdinfo --json)
  --size      print only the size in bytes
  --timeout MS  deadline for the connection and each reply (default 10000)`;

export async function main(argv: string[]): Promise<number> {
  const args = commandArgs("info", HELP, argv, { json: { type: "boolean" }, size: { type: "boolean" }, timeout: { type: "string" } }, { min: 1, max: 1, what: "one URI" });
  if (typeof args === "number") return args;
  try {
    const target = parseNbdUri(args.positionals[0]!);
    const timeout = args.values.timeout ? Number(args.values.timeout) : 10_000;
    const listing = await inspectExport(target, { connectTimeoutMs: timeout, requestTimeoutMs: timeout });
    if (args.values.size) process.stdout.write(`${listing.exports[0]!.size}\n`);
    else process.stdout.write(args.values.json ? formatListingJson(listing, target) : formatListingText(listing, target));
    return 0;
  } catch (e) {
    const err = e as Error & { code?: string };
    console.error(`bun-nbd info: ${err.message}${err.code && !err.message.includes(err.code) ? ` (${err.code})` : ""}`);
    return 1;
  }
}
