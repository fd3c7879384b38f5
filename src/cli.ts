#!/usr/bin/env bun
// bun-nbd command-line entry point: dispatches `bun-nbd <command> ...` to src/cli/<command>.ts.
// Argument parsing and wiring only; no protocol logic lives here.
import { VERSION } from "./version.ts";

const commands: Record<string, { summary: string; load: () => Promise<{ main(argv: string[]): Promise<number> }> }> = {
  serve: { summary: "serve image files over NBD", load: () => import("./cli/serve.ts") },
  info: { summary: "show an export's size, flags and block sizes (like nbdinfo)", load: () => import("./cli/info.ts") },
  list: { summary: "list a server's exports", load: () => import("./cli/list.ts") },
  map: { summary: "show an export's allocation map (base:allocation)", load: () => import("./cli/map.ts") },
  copy: { summary: "copy between files and NBD exports (sparse-aware)", load: () => import("./cli/copy.ts") },
  overlay: { summary: "create, inspect, commit or reset copy-on-write overlays", load: () => import("./cli/overlay.ts") },
  config: { summary: "check a config file (bun-nbd config check FILE)", load: () => import("./cli/config.ts") },
  publish: { summary: "upload an overlay merged with its base as a new S3 object", load: () => import("./cli/publish.ts") },
  cd: { summary: "inspect, verify and make BIN/CUE CD images", load: () => import("./cli/cd.ts") },
  verify: { summary: "check an image against its published checksum (sidecars, SHA256SUMS, --sha256)", load: () => import("./cli/verify.ts") },
  inspect: { summary: "what an image or export holds: partitions, file systems, how it boots", load: () => import("./cli/inspect.ts") },
};


function usage(): string {
  const width = Math.max(...Object.keys(commands).map((c) => c.length));
  return [
    `bun-nbd ${VERSION}: a Network Block Device server and client`,
    "",
    "usage: bun-nbd <command> [options]",
    "",
    ...Object.entries(commands).map(([c, d]) => `  ${c.padEnd(width)}  ${d.summary}`),
    "",
    "Run `bun-nbd <command> --help` for a command's options.",
  ].join("\n");
}

async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  if (!cmd || cmd === "-h" || cmd === "--help" || cmd === "help") {
    console.log(usage());
    return cmd ? 0 : 2;
  }
  if (cmd === "--version" || cmd === "-V") {
    console.log(VERSION);
    return 0;
  }
  const c = commands[cmd];
  if (!c) {
    console.error(`bun-nbd: unknown command "${cmd}"\n\n${usage()}`);
    return 2;
  }
  let mod;
  try {
    mod = await c.load();
  } catch (e) {
    console.error(`bun-nbd: the ${cmd} command is not available in this build: ${(e as Error).message}`);
    return 1;
  }
  return mod.main(rest);
}

if (import.meta.main) {
  // Exit explicitly: a command is done when main() resolves, whatever handles are still open.
  process.exit(await main(process.argv.slice(2)));
}
