// `bun-nbd config check FILE`: validate a config file as `serve --config` would before listening
// (syntax, keys, types, duplicate names, missing files and directories), without serving anything.
import { commandArgs } from "./args.ts";
import { readConfigFile } from "./serve-config.ts";
import { formatConfig } from "../config/print.ts";

const HELP = `usage: bun-nbd config check [--print] FILE

Validate a bun-nbd config file without serving: TOML syntax, unknown keys, wrong types, duplicate
export names, missing files and overlay directories. Each problem is one line FILE:LINE: KEY: MESSAGE.

  --print    on success, print the configuration with every default spelled out
Exit status: 0 valid, 1 problems found, 2 usage error.`;

export async function main(argv: string[]): Promise<number> {
  const [sub, ...rest] = argv;
  if (sub !== "check") {
    if (sub === "-h" || sub === "--help" || sub === "help") { console.log(HELP); return 0; }
    console.error(`bun-nbd config: ${sub ? `unknown subcommand "${sub}"` : "missing subcommand"}\n\n${HELP}`);
    return 2;
  }
  const args = commandArgs("config check", HELP, rest, { print: { type: "boolean" } }, { min: 1, max: 1, what: "one FILE" });
  if (typeof args === "number") return args;
  const file = args.positionals[0]!;
  const r = readConfigFile(file);
  if (!r.ok) {
    for (const e of r.errors) console.error(e);
    console.error(`${file}: ${r.errors.length} problem${r.errors.length > 1 ? "s" : ""}`);
    return 1;
  }
  const names = r.config.exports.map((e) => e.overlay.kind === "per-client" ? `${e.name}@CLIENT` : e.name);
  if (args.values.print) process.stdout.write(formatConfig(r.config));
  else console.log(`${file}: ok (${names.length} export${names.length > 1 ? "s" : ""}: ${names.join(", ")})`);
  return 0;
}
