// Checksum lists as people publish them: GNU coreutils (`hash  name`, `hash *name`, with the
// backslash-escaped form for odd names) and BSD/`--tag` (`SHA256 (name) = hash`), plus a sidecar
// holding a bare hash. Pure parsing; the algorithm comes from the tag, the file's name, or the
// hash's length.

export type Algo = "md5" | "sha1" | "sha256" | "sha512";
export const ALGOS: readonly Algo[] = ["sha256", "sha512", "sha1", "md5"];
const HEX_LEN: Record<number, Algo> = { 32: "md5", 40: "sha1", 64: "sha256", 128: "sha512" };
export const hexLength = (a: Algo): number => ({ md5: 32, sha1: 40, sha256: 64, sha512: 128 })[a];

export interface SumEntry {
  algo: Algo;
  /** Lowercase hex. */
  hash: string;
  /** The file name as listed ("" for a sidecar holding a bare hash). */
  name: string;
  line: number;
}

/** The algorithm a sums file's name implies (SHA256SUMS, disk.img.sha1, MD5SUMS.txt), if any. */
export function algoFromName(file: string): Algo | undefined {
  const f = file.toLowerCase().replace(/^.*\//, "");
  for (const a of ALGOS) if (f.startsWith(`${a}sum`) || f.endsWith(`.${a}`) || f.endsWith(`.${a}sum`) || f.endsWith(`.${a}sums`)) return a;
  return undefined;
}

function unescape(name: string): string {
  return name.replace(/\\(\\|n|r)/g, (_, c: string) => (c === "n" ? "\n" : c === "r" ? "\r" : "\\"));
}

/**
 * Parse a sums file. `hint` is the algorithm the file name implies; lines that are neither format
 * (comments, PGP armour of a signed SHA256SUMS) are skipped.
 */
export function parseSums(text: string, hint?: Algo): SumEntry[] {
  const out: SumEntry[] = [];
  text.split(/\r?\n/).forEach((raw, i) => {
    const line = raw.trim();
    if (!line || line.startsWith("#")) return;
    const bsd = /^(MD5|SHA1|SHA256|SHA512)\s*\((.*)\)\s*=\s*([0-9a-fA-F]+)$/.exec(line);
    if (bsd) {
      const algo = bsd[1]!.toLowerCase() as Algo;
      if (bsd[3]!.length === hexLength(algo)) out.push({ algo, hash: bsd[3]!.toLowerCase(), name: bsd[2]!, line: i + 1 });
      return;
    }
    // "hash  name" (text mode), "hash *name" (binary mode), "hash name" (what some sites publish)
    const gnu = /^(\\?)([0-9a-fA-F]{32,128}) [ *]?(.+)$/.exec(raw.replace(/[\r\n]+$/, ""));
    if (gnu) {
      const algo = HEX_LEN[gnu[2]!.length];
      if (!algo || (hint && hint !== algo)) return;
      let name = gnu[3]!;
      if (gnu[1]) name = unescape(name);
      out.push({ algo, hash: gnu[2]!.toLowerCase(), name, line: i + 1 });
      return;
    }
    const bare = /^([0-9a-fA-F]{32,128})$/.exec(line);
    if (bare && HEX_LEN[bare[1]!.length]) out.push({ algo: HEX_LEN[bare[1]!.length]!, hash: bare[1]!.toLowerCase(), name: "", line: i + 1 });
  });
  return out;
}

/** The entry for a file called `base` (matching "./base", "dir/base" and case-insensitive names last). */
export function findEntry(entries: SumEntry[], base: string): SumEntry | undefined {
  const strip = (n: string) => n.replace(/^\.\//, "");
  const tail = (n: string) => strip(n).split("/").pop()!;
  return entries.find((e) => strip(e.name) === base)
    ?? entries.find((e) => tail(e.name) === base)
    ?? entries.find((e) => tail(e.name).toLowerCase() === base.toLowerCase());
}
