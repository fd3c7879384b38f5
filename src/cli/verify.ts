// `bun-nbd verify IMAGE [--sha256 HEX | --sha1 HEX | --md5 HEX | --sums FILE]`: hash an image (every
// BIN of a CUE sheet) and compare with its published checksum. Wiring and output only.
import { basename } from "node:path";
import { commandArgs } from "./args.ts";
import { progressBar } from "./progress.ts";
import { verifyImage, VerifyUsageError, type Check } from "../verify/verify.ts";
import type { Algo } from "../verify/sums.ts";

const HELP = `usage: bun-nbd verify IMAGE [--sha256 HEX | --sha512 HEX | --sha1 HEX | --md5 HEX | --sums FILE]

Hash IMAGE and compare it with its published checksum. Without an option the checksum is found
beside the image: IMAGE.sha256, IMAGE.sha512, IMAGE.sha1, IMAGE.md5, then SHA256SUMS, SHA512SUMS,
SHA1SUMS or MD5SUMS in its directory, in GNU ("HASH  NAME", "HASH *NAME") or BSD
("SHA256 (NAME) = HASH") format. A .cue or .ccd sheet is verified file by file (every BIN it
names). When the sums list the uncompressed name of a compressed image (disk.img for
disk.img.xz), its uncompressed bytes are hashed.

options:
  --sha256 HEX, --sha512 HEX, --sha1 HEX, --md5 HEX   the expected digest
  --sums FILE   a sums file listing the image
  -q, --quiet   no progress bar (it is only drawn on a terminal anyway)

Exit status: 0 every file matches, 1 a mismatch, 2 usage error, missing file or no checksum.`;

export async function main(argv: string[]): Promise<number> {
  const args = commandArgs("verify", HELP, argv, {
    sha256: { type: "string" }, sha512: { type: "string" }, sha1: { type: "string" }, md5: { type: "string" },
    sums: { type: "string" }, quiet: { type: "boolean", short: "q" },
  }, { min: 1, max: 1, what: "one IMAGE" });
  if (typeof args === "number") return args;
  const o = args.values;
  const given = (["sha256", "sha512", "sha1", "md5"] as const).filter((a) => o[a] !== undefined);
  if (given.length + (o.sums ? 1 : 0) > 1) {
    console.error(`bun-nbd verify: give one of --sha256, --sha512, --sha1, --md5 or --sums\n\n${HELP}`);
    return 2;
  }
  const algo = given[0] as Algo | undefined;
  try {
    const checks = await verifyImage(args.positionals[0]!, {
      digest: algo ? { algo, hash: o[algo]! } : undefined,
      sums: o.sums,
      progress: (file) => (o.quiet ? undefined : progressBar(`${basename(file)}`)),
    });
    for (const c of checks) console.log(checkLine(c));
    return checks.every((c) => c.ok) ? 0 : 1;
  } catch (e) {
    console.error(`bun-nbd verify: ${(e as Error).message}`);
    return e instanceof VerifyUsageError ? 2 : 1;
  }
}

/** "disk.img: OK (sha256 from SHA256SUMS line 3)" or "disk.img: FAILED sha256 expected X, got Y (...)" */
export function checkLine(c: Check): string {
  const what = c.bytes === "uncompressed" ? `${c.algo} of the uncompressed contents` : c.algo;
  return c.ok
    ? `${c.file}: OK (${what} from ${c.source})`
    : `${c.file}: FAILED ${what} expected ${c.expected}, got ${c.actual} (from ${c.source})`;
}
