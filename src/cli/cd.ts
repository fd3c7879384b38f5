// `bun-nbd cd info|verify|make`: inspect a CD image's track table, check every data sector's
// EDC/ECC, or wrap a 2048-byte image into a BIN/CUE. Argument parsing and output only.
import { parseArgs } from "node:util";
import { loadDisc } from "../devices/cd/index.ts";
import { type BadSector, discInfo, verifyDisc, type DiscInfo } from "../devices/cd/inspect.ts";
import { makeBinCue, type MakeMode } from "../devices/cd/make.ts";
import { msf } from "../devices/cd/disc.ts";

const HELP = `usage: bun-nbd cd <command> ...

  cd info IMAGE [--json]        track table (mode, file, INDEX 00/01 LBAs, length, pregap,
                                postgap), sessions, warnings, and a header check of the first
                                and last raw sector of each data track
  cd verify IMAGE               recompute EDC (and ECC for Mode 1 and XA Form 1) of every
                                stored data sector; lists the first bad sectors by LBA, then
                                a summary by problem and track (exit 1 if any)
  cd make IN.iso OUT.cue [--mode MODE1|MODE2] [--force]
                                wrap a 2048-byte-sector image into raw 2352-byte sectors
                                (OUT.bin) with a one-track CUE sheet (default MODE1); an
                                existing OUT.cue or OUT.bin is only replaced with --force

IMAGE is a .cue sheet, a CloneCD .ccd, or a lone raw-sector .bin/.img.
Exit status: 0 ok, 1 bad sectors or a broken image, 2 usage error.`;

export async function main(argv: string[]): Promise<number> {
  let args;
  try {
    args = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        json: { type: "boolean" },
        mode: { type: "string" },
        force: { type: "boolean", short: "f" },
        help: { type: "boolean", short: "h" },
      },
    });
  } catch (e) {
    console.error(`bun-nbd cd: ${(e as Error).message}\n(see bun-nbd cd --help)`);
    return 2;
  }
  const [sub, ...rest] = args.positionals;
  if (args.values.help || sub === "help") { console.log(HELP); return 0; }
  const usage = (msg: string) => { console.error(`bun-nbd cd: ${msg}\n\n${HELP}`); return 2; };
  if (!sub) return usage("no command given");
  try {
    switch (sub) {
      case "info":
        if (rest.length !== 1) return usage("cd info takes one IMAGE");
        return info(rest[0]!, args.values.json === true);
      case "verify":
        if (rest.length !== 1) return usage("cd verify takes one IMAGE");
        return verify(rest[0]!);
      case "make": {
        if (rest.length !== 2) return usage("cd make takes IN.iso OUT.cue");
        const m = (args.values.mode ?? "MODE1").toUpperCase();
        if (m !== "MODE1" && m !== "MODE2") return usage(`unknown --mode "${args.values.mode}" (MODE1 or MODE2)`);
        const r = makeBinCue(rest[0]!, rest[1]!, m as MakeMode, { force: args.values.force === true });
        console.log(`wrote ${r.bin} (${r.sectors} ${m}/2352 sectors) and ${rest[1]}`);
        return 0;
      }
      default:
        return usage(`unknown cd command "${sub}"`);
    }
  } catch (e) {
    console.error(`bun-nbd cd ${sub}: ${(e as Error).message}`);
    return 1;
  }
}

function info(path: string, json: boolean): number {
  const disc = loadDisc(path);
  try {
    const d = discInfo(disc);
    if (json) console.log(JSON.stringify(d, null, 2));
    else console.log(formatInfo(d));
    const badHeaders = d.tracks.some((t) => (t.headers.first !== "ok" && t.headers.first !== "n/a") || (t.headers.last !== "ok" && t.headers.last !== "n/a"));
    return badHeaders ? 1 : 0;
  } finally {
    disc.close();
  }
}

function formatInfo(d: DiscInfo): string {
  const lines: string[] = [];
  lines.push(`${d.source} (${d.format}): ${d.tracks.length} track(s), ${d.sessions.length} session(s), lead-out LBA ${d.leadout} (${msf(d.leadout)})`);
  for (const f of d.files) lines.push(`  file ${f.name}: ${f.size} bytes (${f.path})`);
  const head = ["track", "session", "mode", "index00", "index01", "length", "pregap", "in-file", "postgap", "headers", "file"];
  const rows = d.tracks.map((t) => [
    String(t.number).padStart(2, "0"), String(t.session), t.mode + (t.fileType === "MOTOROLA" ? " (MOTOROLA)" : ""),
    t.index00 === null ? "-" : String(t.index00), String(t.index01), String(t.length), String(t.pregap),
    String(t.storedPregap), String(t.postgap),
    t.headers.first === "n/a" ? "n/a" : t.headers.first === "ok" && t.headers.last === "ok" ? "ok" : `first: ${t.headers.first}; last: ${t.headers.last}`,
    t.file,
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const fmt = (r: string[]) => "  " + r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join("  ");
  lines.push(fmt(head));
  for (const r of rows) lines.push(fmt(r));
  for (const s of d.sessions) lines.push(`  session ${s.number}: tracks ${s.firstTrack}-${s.lastTrack}, LBA ${s.start}-${s.end - 1}`);
  for (const w of d.warnings) lines.push(`warning: ${w}`);
  return lines.join("\n");
}

/** Bad sectors listed one per line; the rest are summarized. */
const SHOW_BAD = 10;

/** `... 881 more bad sectors, LBA 10-890: 881 mode (track 1)` */
function summarizeBad(rest: BadSector[]): string {
  const kinds = new Map<string, number>();
  const tracks = new Map<number, number>();
  for (const b of rest) {
    const k = b.problem.split(/[ :(]/)[0]!;
    kinds.set(k, (kinds.get(k) ?? 0) + 1);
    tracks.set(b.track, (tracks.get(b.track) ?? 0) + 1);
  }
  const byKind = [...kinds].map(([k, n]) => `${n} ${k}`).join(", ");
  const byTrack = [...tracks].map(([t, n]) => `track ${t}: ${n}`).join(", ");
  return `... ${rest.length} more bad sectors, LBA ${rest[0]!.lba}-${rest[rest.length - 1]!.lba}: ${byKind} (${byTrack})`;
}

function verify(path: string): number {
  const disc = loadDisc(path);
  try {
    for (const w of disc.warnings) console.error(`warning: ${w}`);
    let shown = 0;
    const r = verifyDisc(disc, (b) => {
      if (++shown <= SHOW_BAD) console.log(`bad sector LBA ${b.lba} (${msf(b.lba)}, track ${b.track}): ${b.problem}`);
    });
    if (r.bad.length > SHOW_BAD) console.log(summarizeBad(r.bad.slice(SHOW_BAD)));
    const skipped = r.skipped ? `, ${r.skipped} stored without EDC/ECC (not checked)` : "";
    console.log(`${path}: ${r.checked} data sectors checked, ${r.bad.length} bad${skipped}`);
    return r.bad.length ? 1 : 0;
  } finally {
    disc.close();
  }
}
