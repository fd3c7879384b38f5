// End-to-end copy benchmark: `bun-nbd copy URI null:` against `nbdcopy URI null:` on the same
// export, side by side, several rounds, printing MB/s per run and the ratio of medians. Run with:
//   bun bench/copy-e2e.ts [--rounds N] [--size-mib N] [--image PATH] [--sparse] [--tcp]
//                         [--baseline DIR] [--transport node]
// --baseline DIR adds a third tool, `bun DIR/src/cli.ts copy`, e.g. an export of an older commit
// (`mkdir /tmp/before && git archive HEAD src | tar -x -C /tmp/before`), for before/after ratios in
// the same run. --transport node also times this tree with BUN_NBD_TRANSPORT=node (node:net).
// The export is nbdkit's file plugin over a fully random image (page-cached), served on a unix
// socket, or with --tcp on 127.0.0.1:12040; --sparse uses a half-allocated image instead (holes are
// skipped by both tools, so that run measures block status and hole handling as much as reads).
// Both tools are timed as whole processes (start-up included), alternating, same export.
import { spawnSync } from "node:child_process";
import { closeSync, existsSync, mkdtempSync, openSync, rmSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { Negotiation } from "../src/client/index.ts";

const { values } = parseArgs({
  options: {
    rounds: { type: "string", default: "5" },
    "size-mib": { type: "string", default: "1024" },
    image: { type: "string" },
    sparse: { type: "boolean", default: false },
    tcp: { type: "boolean", default: false },
    baseline: { type: "string" },
    transport: { type: "string" },
  },
});
const rounds = Number(values.rounds);
const sizeMiB = Number(values["size-mib"]);
const PATH = `/usr/bin:/usr/sbin:/bin:${process.env.PATH ?? ""}`;
const ROOT = new URL("..", import.meta.url).pathname;
const dir = mkdtempSync(join(tmpdir(), "bun-nbd-copybench-"));
let server: ReturnType<typeof Bun.spawn> | null = null;
const cleanup = () => {
  server?.kill("SIGTERM");
  rmSync(dir, { recursive: true, force: true });
};
process.on("exit", cleanup);
process.on("SIGINT", () => process.exit(130));

function makeImage(path: string): void {
  const fd = openSync(path, "w");
  const chunk = Buffer.allocUnsafe(8 * 1024 * 1024);
  for (let off = 0; off < sizeMiB * 1024 * 1024; off += chunk.length) {
    crypto.getRandomValues(chunk.subarray(0, 65536));
    for (let i = 65536; i < chunk.length; i += 65536) chunk.copyWithin(i, 0, 65536);
    // Perturb each 64 KiB so no block repeats exactly.
    for (let i = 0; i < chunk.length; i += 65536) chunk.writeUInt32LE(off + i, i);
    if (values.sparse && (off / chunk.length) % 2 === 1) continue;
    writeSync(fd, chunk, 0, chunk.length, off);
  }
  closeSync(fd);
  spawnSync("truncate", ["-s", String(sizeMiB * 1024 * 1024), path]);
}

const image = values.image ?? join(dir, "bench.img");
if (!values.image) makeImage(image);
else if (!existsSync(image)) throw new Error(`no such image: ${image}`);
spawnSync("cat", [image], { stdio: ["ignore", "ignore", "ignore"] }); // warm the page cache

const sock = join(dir, "nbdkit.sock");
const port = 12040;
// nbdkit listens on one of the two (it refuses -U together with -p).
server = Bun.spawn(["nbdkit", "-f", ...(values.tcp ? ["-i", "127.0.0.1", "-p", String(port)] : ["-U", sock]), "file", image], {
  stdout: "ignore", stderr: "inherit", env: { ...process.env, PATH },
});
for (let i = 0; ; i++) {
  try {
    const target = values.tcp ? { transport: "tcp" as const, host: "127.0.0.1", port, exportName: "" } : { transport: "unix" as const, path: sock, exportName: "" };
    await (await Negotiation.open(target, { connectTimeoutMs: 500 })).abort();
    break;
  } catch (e) {
    if (i > 200) throw e;
    await Bun.sleep(25);
  }
}
const uri = values.tcp ? `nbd://127.0.0.1:${port}/` : `nbd+unix:///?socket=${sock}`;
const bytes = sizeMiB * 1024 * 1024;

function timed(cmd: string[], env: Record<string, string> = {}): number {
  const t0 = performance.now();
  const r = spawnSync(cmd[0]!, cmd.slice(1), { env: { ...process.env, PATH, ...env }, stdio: ["ignore", "ignore", "inherit"] });
  const ms = performance.now() - t0;
  if (r.status !== 0) throw new Error(`${cmd.join(" ")} exited ${r.status}`);
  return bytes / 1e6 / (ms / 1000);
}

const tools: Record<string, string[]> = {
  nbdcopy: ["nbdcopy", uri, "null:"],
  "bun-nbd copy": [process.execPath, join(ROOT, "src/cli.ts"), "copy", "-q", uri, "null:"],
};
const envs: Record<string, Record<string, string>> = {};
if (values.baseline) tools["baseline copy"] = [process.execPath, join(values.baseline, "src/cli.ts"), "copy", "-q", uri, "null:"];
if (values.transport) {
  const name = `bun-nbd copy (${values.transport})`;
  tools[name] = tools["bun-nbd copy"]!;
  envs[name] = { BUN_NBD_TRANSPORT: values.transport };
}
const results: Record<string, number[]> = Object.fromEntries(Object.keys(tools).map((k) => [k, []]));
console.log(`${sizeMiB} MiB ${values.sparse ? "half-sparse" : "random"} image, nbdkit file plugin, ${uri.startsWith("nbd://") ? "TCP" : "unix socket"}, ${rounds} rounds`);
for (let r = 0; r < rounds; r++) {
  const order = r % 2 === 0 ? Object.keys(tools) : Object.keys(tools).reverse();
  for (const name of order) results[name]!.push(timed(tools[name]!, envs[name]));
  console.log(`round ${r + 1}: ${Object.entries(results).map(([n, v]) => `${n} ${v[r]!.toFixed(0)} MB/s`).join(", ")}`);
}
const median = (v: number[]) => [...v].sort((a, b) => a - b)[Math.floor(v.length / 2)]!;
const theirs = median(results.nbdcopy!);
for (const name of Object.keys(tools)) {
  if (name === "nbdcopy") continue;
  const ours = median(results[name]!);
  console.log(`median: ${name} ${ours.toFixed(0)} MB/s, nbdcopy ${theirs.toFixed(0)} MB/s, ratio ${(ours / theirs).toFixed(2)}x`);
}
server.kill("SIGTERM");
await server.exited;
server = null;
process.exit(0);
