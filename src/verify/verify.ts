// Verifying an image against its published checksum: from a digest given on the command line, a
// sums file, or sidecars found beside the image (IMAGE.sha256/.sha1/.md5, SHA256SUMS, SHA1SUMS,
// MD5SUMS). A CUE/CCD sheet stands for every file it names. When the sums name a compressed
// image's uncompressed form (disk.img for disk.img.xz), the uncompressed bytes are hashed.
import { existsSync, readFileSync, statSync } from "node:fs";
import { basename, dirname, extname, join } from "node:path";
import { loadDisc } from "../devices/cd/index.ts";
import { openExports } from "../devices/open.ts";
import { hashDevice, hashFile, type Progress } from "./hash.ts";
import { algoFromName, ALGOS, findEntry, hexLength, parseSums, type Algo, type SumEntry } from "./sums.ts";

/** exit status 2 (usage, a missing file, no checksum to compare with) as opposed to a mismatch. */
export class VerifyUsageError extends Error {}

export interface Check {
  file: string;
  algo: Algo;
  expected: string;
  actual: string;
  ok: boolean;
  /** Where the expected digest came from ("--sha256", "SHA256SUMS line 3", "disk.img.md5"). */
  source: string;
  /** "stored" bytes of the file, or the "uncompressed" contents of a compressed image. */
  bytes: "stored" | "uncompressed";
}

export interface VerifyOptions {
  digest?: { algo: Algo; hash: string };
  sums?: string;
  progress?: (file: string) => Progress | undefined;
}

const COMPRESSED = [".xz", ".gz", ".zip", ".imz", ".bz2", ".zst"];

interface Expected { entry: SumEntry; source: string; bytes: Check["bytes"] }

/** The files an image consists of: the BIN files of a CUE/CCD sheet, or the image itself. */
export function imageFiles(image: string): string[] {
  const ext = extname(image).toLowerCase();
  if (ext !== ".cue" && ext !== ".ccd") return [image];
  const disc = loadDisc(image);
  try { return [...new Set(disc.files.map((f) => f.path))]; } finally { disc.close(); }
}

function readSums(path: string): SumEntry[] {
  let text: string;
  try { text = readFileSync(path, "utf8"); } catch (e) { throw new VerifyUsageError(`cannot read ${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`); }
  return parseSums(text, algoFromName(path));
}

/** The entry of `sums` for `file`: its own name, or (for a compressed file) its uncompressed name. */
function lookup(entries: SumEntry[], file: string, sidecarOf?: string): { entry: SumEntry; bytes: Check["bytes"] } | undefined {
  const base = basename(file);
  const own = findEntry(entries, base) ?? (sidecarOf === file ? entries.find((e) => e.name === "") : undefined);
  if (own) return { entry: own, bytes: "stored" };
  const ext = COMPRESSED.find((c) => base.toLowerCase().endsWith(c));
  if (ext) {
    const inner = findEntry(entries, base.slice(0, -ext.length));
    if (inner) return { entry: inner, bytes: "uncompressed" };
  }
  return undefined;
}

function discover(file: string, image: string): Expected | { looked: string[] } {
  const looked: string[] = [];
  const sidecars = [...new Set([file, image])].flatMap((f) => ALGOS.map((a) => ({ path: `${f}.${a}`, of: f })));
  const lists = ["SHA256SUMS", "SHA512SUMS", "SHA1SUMS", "MD5SUMS"].map((n) => ({ path: join(dirname(file), n), of: "" }));
  for (const c of [...sidecars, ...lists]) {
    looked.push(basename(c.path));
    if (!existsSync(c.path)) continue;
    const hit = lookup(readSums(c.path), file, c.of);
    if (hit) return { entry: hit.entry, bytes: hit.bytes, source: hit.entry.name === "" ? basename(c.path) : `${basename(c.path)} line ${hit.entry.line}` };
  }
  return { looked };
}

async function digest(file: string, algo: Algo, bytes: Check["bytes"], progress?: Progress): Promise<string> {
  if (bytes === "stored") return hashFile(file, algo, progress);
  const specs = await openExports([file], { readOnly: true, log: () => {} });
  try {
    const dev = specs[0]!.device;
    if (dev.size() === statSync(file).size) throw new VerifyUsageError(`${file}: the sums name its uncompressed form, but this build cannot decompress ${extname(file)} files`);
    return await hashDevice(dev, algo, progress);
  } finally {
    for (const s of specs) await s.device.close?.();
  }
}

/** Check every file of `image`; throws VerifyUsageError when there is nothing to compare with. */
export async function verifyImage(image: string, opts: VerifyOptions = {}): Promise<Check[]> {
  if (!existsSync(image)) throw new VerifyUsageError(`${image}: no such file`);
  let files: string[];
  try { files = imageFiles(image); } catch (e) { throw new VerifyUsageError((e as Error).message); }
  const plan: { file: string; exp: Expected }[] = [];
  if (opts.digest) {
    const { algo, hash } = opts.digest;
    if (!new RegExp(`^[0-9a-fA-F]{${hexLength(algo)}}$`).test(hash)) throw new VerifyUsageError(`--${algo} wants ${hexLength(algo)} hex digits, got "${hash}"`);
    if (files.length !== 1) throw new VerifyUsageError(`${image} names ${files.length} files: give their digests in a sums file (--sums)`);
    plan.push({ file: files[0]!, exp: { entry: { algo, hash: hash.toLowerCase(), name: "", line: 0 }, source: `--${algo}`, bytes: "stored" } });
  } else if (opts.sums) {
    const entries = readSums(opts.sums);
    for (const file of files) {
      const hit = lookup(entries, file);
      if (!hit) throw new VerifyUsageError(`${opts.sums} lists no checksum for ${basename(file)}`);
      plan.push({ file, exp: { ...hit, source: `${basename(opts.sums)} line ${hit.entry.line}` } });
    }
  } else {
    for (const file of files) {
      const found = discover(file, image);
      if ("looked" in found) throw new VerifyUsageError(`no checksum found for ${basename(file)} (looked for ${found.looked.join(", ")} beside it)`);
      plan.push({ file, exp: found });
    }
  }
  const out: Check[] = [];
  for (const { file, exp } of plan) {
    const actual = await digest(file, exp.entry.algo, exp.bytes, opts.progress?.(file));
    out.push({ file, algo: exp.entry.algo, expected: exp.entry.hash, actual, ok: actual === exp.entry.hash, source: exp.source, bytes: exp.bytes });
  }
  return out;
}
