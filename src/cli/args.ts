// The argument handling every command shares: parse with node:util, answer --help, and turn a bad
// flag or a wrong number of positionals into "bun-nbd CMD: problem" plus the help text, exit 2.
import { parseArgs, type ParseArgsOptionsConfig } from "node:util";

export interface Positionals { min: number; max: number; what: string }

/**
 * Parse `argv` for command `cmd`. Returns the parsed values and positionals, or an exit code
 * (0 after printing --help, 2 after a usage error) that the command returns as is.
 */
export function commandArgs<const O extends ParseArgsOptionsConfig>(cmd: string, help: string, argv: string[], options: O, positionals: Positionals) {
  const all = { ...options, help: { type: "boolean", short: "h" } } as const;
  let args;
  try {
    args = parseArgs({ args: argv, allowPositionals: true, options: all });
  } catch (e) {
    console.error(`bun-nbd ${cmd}: ${(e as Error).message}\n\n${help}`);
    return 2;
  }
  if ((args.values as { help?: boolean }).help) {
    console.log(help);
    return 0;
  }
  const n = args.positionals.length;
  if (n < positionals.min || n > positionals.max) {
    console.error(`bun-nbd ${cmd}: expected ${positionals.what}\n\n${help}`);
    return 2;
  }
  return args;
}
