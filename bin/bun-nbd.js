#!/usr/bin/env node
// The installed `bun-nbd` command: bun-nbd is TypeScript run by Bun, and `npm install -g bun-nbd`
// must work where only Node and npm are, so this launcher (plain Node) runs src/cli.ts with the Bun
// binary of the `bun` npm package installed as a dependency. It passes signals (SIGHUP reloads) and
// systemd's socket-activation fds through, and exits with bun-nbd's status.
import { spawn } from "node:child_process";
import { existsSync, statSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const cli = join(here, "..", "src", "cli.ts");

/** The Bun binary: $BUN_NBD_BUN, else the `bun` package's (its postinstall puts it in bin/bun.exe), else its platform package's. */
function findBun() {
  if (process.env.BUN_NBD_BUN) return process.env.BUN_NBD_BUN;
  const require = createRequire(import.meta.url);
  let bunDir;
  try {
    bunDir = dirname(require.resolve("bun/package.json"));
  } catch {
    return null;
  }
  const placed = join(bunDir, "bin", process.platform === "win32" ? "bun.exe" : "bun.exe");
  // Without the postinstall (npm --ignore-scripts), bun.exe is a small placeholder: use the platform package.
  if (existsSync(placed) && statSync(placed).size > 1 << 20) return placed;
  const fromBun = createRequire(join(bunDir, "package.json"));
  const arch = process.arch === "arm64" ? "aarch64" : process.arch;
  for (const suffix of ["", "-musl", "-baseline", "-musl-baseline"]) {
    try {
      const pkg = dirname(fromBun.resolve(`@oven/bun-${process.platform}-${arch}${suffix}/package.json`));
      const bin = join(pkg, "bin", process.platform === "win32" ? "bun.exe" : "bun");
      if (existsSync(bin)) return bin;
    } catch { /* not installed for this platform */ }
  }
  return null;
}

const bun = findBun();
if (bun === null) {
  console.error("bun-nbd: cannot find the Bun runtime (the `bun` npm package). Reinstall bun-nbd without --ignore-scripts, or set BUN_NBD_BUN to a bun binary.");
  process.exit(1);
}

// Socket activation: systemd passed LISTEN_FDS sockets from fd 3 to this process; hand them on and
// tell bun-nbd that LISTEN_PID (this process) is its launcher.
const env = { ...process.env, BUN_NBD_LAUNCHER_PID: String(process.pid) };
const stdio = ["inherit", "inherit", "inherit"];
const nfds = Number(process.env.LISTEN_FDS);
if (Number(process.env.LISTEN_PID) === process.pid && Number.isInteger(nfds) && nfds > 0) {
  for (let i = 0; i < nfds; i++) stdio.push(3 + i);
}

const child = spawn(bun, [cli, ...process.argv.slice(2)], { stdio, env });
for (const sig of ["SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2"]) {
  process.on(sig, () => { if (child.exitCode === null) child.kill(sig); });
}
child.on("error", (e) => {
  console.error(`bun-nbd: cannot start ${bun}: ${e.message}`);
  process.exit(1);
});
child.on("exit", (code, signal) => {
  if (signal) {
    process.removeAllListeners(signal);
    process.kill(process.pid, signal);
  } else {
    process.exit(code ?? 1);
  }
});
