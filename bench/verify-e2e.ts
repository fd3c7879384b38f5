// End-to-end checksum benchmark: `bun-nbd verify IMAGE --sha256 HEX` against `sha256sum IMAGE`
// (and md5sum / sha1sum for the other algorithms) on the same page-cached file, whole processes
// timed alternately, several rounds, printing MB/s per tool and the ratio of medians. Run with:
//   bun bench/verify-e2e.ts [--rounds N] [--size-mib N] [--algo sha256,md5,sha1] [--dir DIR]
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { PATH, ROOT, writeRandomImage } from "./lib/harness.ts";

const { values } = parseArgs({
  options: {
    rounds: { type: "string", default: "5" },
    "size-mib": { type: "string", default: "1024" },
    algo: { type: "string", default: "sha256,md5,sha1" },
    dir: { type: "string", default: "/var/tmp" },
  },
});
const rounds = Number(values.rounds);
const size = Number(values["size-mib"]) * 1024 * 1024;
const dir = mkdtempSync(join(values.dir!, "bun-nbd-verifybench-"));
process.on("exit", () => rmSync(dir, { recursive: true, force: true }));
const image = join(dir, "disk.img");
writeRandomImage(image, size, 0x5eed);
spawnSync("cat", [image], { stdio: "ignore" }); // into the page cache

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
function timed(cmd: string[]): { secs: number; out: string } {
  const t0 = performance.now();
  const r = spawnSync(cmd[0]!, cmd.slice(1), { env: { ...process.env, PATH }, encoding: "utf8" });
  const secs = (performance.now() - t0) / 1000;
  if (r.status !== 0) throw new Error(`${cmd.join(" ")} exited ${r.status}: ${r.stderr}`);
  return { secs, out: r.stdout };
}

console.log(`image: ${size / 2 ** 20} MiB of random data in ${dir} (page-cached); ${rounds} rounds, whole processes, alternating`);
console.log(`Bun ${Bun.version}; ${spawnSync("sha256sum", ["--version"], { encoding: "utf8" }).stdout.split("\n")[0]}`);
console.log("");
console.log("| algorithm | coreutils MB/s | bun-nbd verify MB/s | bun-nbd / coreutils |");
console.log("|---|---:|---:|---:|");
for (const algo of values.algo!.split(",")) {
  const tool = `${algo}sum`;
  const hex = timed([tool, image]).out.split(" ")[0]!;
  const ours: number[] = [], theirs: number[] = [];
  for (let i = 0; i < rounds; i++) {
    theirs.push(size / timed([tool, image]).secs / 1e6);
    ours.push(size / timed([process.execPath, join(ROOT, "src/cli.ts"), "verify", image, `--${algo}`, hex]).secs / 1e6);
  }
  const a = median(theirs), b = median(ours);
  console.log(`| ${algo} | ${a.toFixed(0)} | ${b.toFixed(0)} | ${(b / a).toFixed(2)}x |`);
}
