// CUE sheet (CDRWIN) parser: lenient where real sheets vary (keyword case, line ends, BOM, tabs,
// unquoted names with spaces, trailing junk, `\` separators, file-name case), strict where a guess
// would be wrong (missing FILE, unknown mode, INDEX out of range, bad MSF). Every error names the
// sheet and line. parseCue is pure; cueTrackSpecs turns the parse into disc layout input once the
// files' sizes are known. Cold code, written for clarity.
import { TRACK_MODES, type DiscFile, type TrackMode, type TrackSpec } from "./disc.ts";
import { decodeDescriptor, descriptorLines } from "./text.ts";

export interface CueIndex { number: number; frames: number; line: number }

export interface CueTrack {
  number: number;
  mode: TrackMode;
  session: number;
  line: number;
  pregap: number;
  postgap: number;
  indexes: CueIndex[];
}

export interface CueFile {
  /** The name as written (quotes removed, `\` kept). */
  name: string;
  type: "BINARY" | "MOTOROLA";
  line: number;
  tracks: CueTrack[];
}

export interface CueSheet {
  files: CueFile[];
  warnings: string[];
  catalog?: string;
}

/** Largest minute value accepted in an MSF time (a CD holds at most ~100 minutes). */
export const MAX_MSF_MINUTES = 999;

const IGNORED = new Set([
  "CATALOG", "CDTEXTFILE", "FLAGS", "ISRC", "TITLE", "PERFORMER", "SONGWRITER", "COMPOSER", "ARRANGER",
  "MESSAGE", "DISC_ID", "GENRE", "TOC_INFO1", "TOC_INFO2", "UPC_EAN", "SIZE_INFO", "ORIGINAL",
]);
const DECODED_TYPES = new Set(["WAVE", "AIFF", "MP3", "FLAC", "APE", "OGG"]);
const MAX_WARNINGS = 20;

interface Token { text: string; quoted: boolean; start: number; end: number }

function tokenize(line: string): Token[] {
  const out: Token[] = [];
  let i = 0;
  const n = line.length;
  while (i < n) {
    const c = line[i]!;
    if (c === " " || c === "\t") { i++; continue; }
    if (c === '"') {
      const close = line.indexOf('"', i + 1);
      const end = close < 0 ? n : close;
      out.push({ text: line.slice(i + 1, end), quoted: true, start: i, end: close < 0 ? n : close + 1 });
      i = close < 0 ? n : close + 1;
      continue;
    }
    const s = i;
    while (i < n && line[i] !== " " && line[i] !== "\t") i++;
    out.push({ text: line.slice(s, i), quoted: false, start: s, end: i });
  }
  return out;
}

/** Parses `mm:ss:ff` (unpadded digits allowed) to a frame count; throws a message on error. */
export function parseMsf(text: string | undefined): number {
  if (text === undefined) throw new Error("missing time (mm:ss:ff)");
  const m = /^(\d{1,4}):(\d{1,3}):(\d{1,3})$/.exec(text);
  if (!m) throw new Error(`bad time "${text.slice(0, 40)}" (expected mm:ss:ff)`);
  const mm = Number(m[1]), ss = Number(m[2]), ff = Number(m[3]);
  if (mm > MAX_MSF_MINUTES) throw new Error(`time ${text} is out of range (minutes > ${MAX_MSF_MINUTES})`);
  if (ss >= 60) throw new Error(`time ${text} has seconds >= 60`);
  if (ff >= 75) throw new Error(`time ${text} has frames >= 75`);
  return (mm * 60 + ss) * 75 + ff;
}

function parseNumber(text: string | undefined, what: string, min: number, max: number): number {
  if (text === undefined || !/^\d{1,6}$/.test(text)) throw new Error(`bad ${what} "${(text ?? "").slice(0, 40)}"`);
  const v = Number(text);
  if (v < min || v > max) throw new Error(`${what} ${v} is out of range (${min}-${max})`);
  return v;
}

/** Parses a CUE sheet. `label` (the sheet's path) prefixes every message. */
export function parseCue(bytes: Uint8Array, label: string): CueSheet {
  const lines = descriptorLines(decodeDescriptor(bytes, label), label);
  const sheet: CueSheet = { files: [], warnings: [] };
  let warned = 0;
  const warn = (line: number, msg: string) => {
    warned++;
    if (warned <= MAX_WARNINGS) sheet.warnings.push(`${label}:${line}: ${msg}`);
    else if (warned === MAX_WARNINGS + 1) sheet.warnings.push(`${label}: more warnings not shown`);
  };
  let file: CueFile | null = null;
  let track: CueTrack | null = null;
  let session = 1;
  let sawSession = false;
  let lastTrackNumber = 0;

  for (let ln = 1; ln <= lines.length; ln++) {
    const line = lines[ln - 1]!;
    const toks = tokenize(line);
    if (toks.length === 0) continue;
    const kw = toks[0]!.text.toUpperCase();
    const fail = (msg: string): never => { throw new Error(`${label}:${ln}: ${msg}`); };
    const at = (fn: () => number): number => {
      try { return fn(); } catch (e) { return fail(`${kw}: ${(e as Error).message}`); }
    };
    switch (kw) {
      case "FILE": {
        if (toks.length < 2) fail("FILE without a file name");
        let name: string;
        let typeTok: Token | undefined;
        if (toks[1]!.quoted) {
          name = toks[1]!.text;
          typeTok = toks[2];
          if (toks.length > 3) warn(ln, `ignoring trailing text after FILE type: ${line.slice(toks[3]!.start).slice(0, 60)}`);
        } else if (toks.length === 2) {
          name = toks[1]!.text;
        } else {
          // Unquoted name with spaces: everything between FILE and the last token.
          const last = toks[toks.length - 1]!;
          name = line.slice(toks[1]!.start, last.start).trim();
          typeTok = last;
        }
        if (name.length === 0) fail("FILE with an empty file name");
        if (name.length > 1024) fail(`FILE name is ${name.length} characters long (limit 1024)`);
        let type: "BINARY" | "MOTOROLA" = "BINARY";
        if (typeTok === undefined) warn(ln, "FILE has no type; assuming BINARY");
        else {
          const t = typeTok.text.toUpperCase();
          if (t === "BINARY" || t === "MOTOROLA") type = t;
          else if (DECODED_TYPES.has(t)) fail(`FILE type ${t} needs decoding; convert "${name}" to raw BINARY PCM first`);
          else fail(`unknown FILE type "${typeTok.text.slice(0, 40)}" (expected BINARY or MOTOROLA)`);
        }
        if (file && file.tracks.length === 0) warn(file.line, `FILE "${file.name}" has no TRACK; ignored`);
        checkIndexes(track, label); // the previous file's last track is complete now
        file = { name, type, line: ln, tracks: [] };
        sheet.files.push(file);
        track = null;
        break;
      }
      case "TRACK": {
        if (!file) fail("TRACK before any FILE");
        const num = at(() => parseNumber(toks[1]?.text, "track number", 1, 99));
        const modeName = toks[2]?.text.toUpperCase();
        if (modeName === undefined) fail(`TRACK ${num} has no mode`);
        const mode = TRACK_MODES.get(modeName!);
        if (!mode) fail(`unknown track mode "${toks[2]!.text.slice(0, 40)}" (known: ${[...TRACK_MODES.keys()].join(", ")})`);
        if (lastTrackNumber > 0 && num !== lastTrackNumber + 1) {
          fail(`TRACK ${num} follows track ${lastTrackNumber}; track numbers must increase by 1`);
        }
        if (toks.length > 3) warn(ln, `ignoring trailing text after TRACK mode: ${line.slice(toks[3]!.start).slice(0, 60)}`);
        checkIndexes(track, label);
        lastTrackNumber = num;
        track = { number: num, mode: mode!, session, line: ln, pregap: 0, postgap: 0, indexes: [] };
        file!.tracks.push(track);
        break;
      }
      case "INDEX": {
        if (!track) fail("INDEX before any TRACK");
        const num = at(() => parseNumber(toks[1]?.text, "index number", 0, 99));
        const frames = at(() => parseMsf(toks[2]?.text));
        const prev = track!.indexes[track!.indexes.length - 1];
        if (prev && num <= prev.number) fail(`INDEX ${num} after INDEX ${prev.number}; index numbers must increase`);
        if (prev && num !== prev.number + 1) fail(`INDEX ${num} after INDEX ${prev.number}; index numbers must increase by 1`);
        if (!prev && num > 1) fail(`INDEX ${num} before INDEX 01`);
        if (prev && frames < prev.frames) fail(`INDEX ${num} (${toks[2]!.text}) is before INDEX ${prev.number}`);
        if (track!.postgap > 0) fail("INDEX after POSTGAP");
        track!.indexes.push({ number: num, frames, line: ln });
        break;
      }
      case "PREGAP": {
        if (!track) fail("PREGAP before any TRACK");
        if (track!.indexes.length > 0) fail("PREGAP must come before the track's INDEX lines");
        if (track!.pregap > 0) fail("second PREGAP for one track");
        track!.pregap = at(() => parseMsf(toks[1]?.text));
        break;
      }
      case "POSTGAP": {
        if (!track) fail("POSTGAP before any TRACK");
        if (track!.indexes.length === 0) fail("POSTGAP must come after the track's INDEX lines");
        if (track!.postgap > 0) fail("second POSTGAP for one track");
        track!.postgap = at(() => parseMsf(toks[1]?.text));
        break;
      }
      case "REM": {
        const what = toks[1]?.text.toUpperCase();
        if (what === "SESSION") {
          const n = at(() => parseNumber(toks[2]?.text, "session number", 1, 99));
          const expected = sawSession ? session + 1 : lastTrackNumber === 0 ? 1 : 2;
          if (n !== expected) fail(`REM SESSION ${n} where session ${expected} was expected; sessions must increase by 1`);
          sawSession = true;
          session = n;
        }
        break;
      }
      default:
        if (kw === "CATALOG" && toks[1]) sheet.catalog = toks[1].text.slice(0, 13);
        if (!IGNORED.has(kw)) warn(ln, `unknown command "${toks[0]!.text.slice(0, 40)}" ignored`);
    }
  }
  checkIndexes(track, label);
  if (file && file.tracks.length === 0) warn(file.line, `FILE "${file.name}" has no TRACK; ignored`);
  sheet.files = sheet.files.filter((f) => f.tracks.length > 0);
  if (sheet.files.length === 0) throw new Error(`${label}: no FILE with a TRACK found; not a CUE sheet?`);
  return sheet;
}

function checkIndexes(track: CueTrack | null, label: string): void {
  if (!track) return;
  if (!track.indexes.some((i) => i.number === 1)) {
    throw new Error(`${label}:${track.line}: TRACK ${String(track.number).padStart(2, "0")} has no INDEX 01`);
  }
}

/**
 * Lays a parsed sheet's tracks out inside their files: per FILE, each track starts at its first
 * INDEX (the first track of a file at the file's start), ends at the next track's first INDEX or at
 * the file's end (a partial last sector is dropped with a warning), and byte offsets accumulate
 * with each track's own sector size. `files[i]` is the opened file for `sheet.files[i]`.
 */
export function cueTrackSpecs(sheet: CueSheet, files: DiscFile[], label: string, warnings: string[]): TrackSpec[] {
  const specs: TrackSpec[] = [];
  sheet.files.forEach((cf, fi) => {
    const file = files[fi]!;
    let byteOffset = 0;
    const firsts = cf.tracks.map((t, k) => (k === 0 ? 0 : t.indexes[0]!.frames));
    for (let k = 0; k < cf.tracks.length; k++) {
      const t = cf.tracks[k]!;
      const ss = t.mode.sectorSize;
      const first = firsts[k]!;
      const idx1 = t.indexes.find((i) => i.number === 1)!;
      const idx0 = t.indexes.find((i) => i.number === 0);
      let sectors: number;
      if (k + 1 < cf.tracks.length) {
        const next = cf.tracks[k + 1]!;
        const nextFirst = next.indexes[0]!;
        if (nextFirst.frames <= idx1.frames) {
          throw new Error(`${label}:${nextFirst.line}: INDEX ${String(nextFirst.number).padStart(2, "0")} of track ${next.number} is not after track ${t.number}'s INDEX 01`);
        }
        sectors = nextFirst.frames - first;
        if (byteOffset + sectors * ss > file.size) {
          throw new Error(`${label}:${nextFirst.line}: INDEX ${String(nextFirst.number).padStart(2, "0")} of track ${next.number} is out of range: beyond the end of "${cf.name}" (${file.size} bytes)`);
        }
      } else {
        const avail = Math.max(0, file.size - byteOffset);
        sectors = Math.floor(avail / ss);
        const rest = avail - sectors * ss;
        if (rest > 0) warnings.push(`${label}: "${cf.name}" ends with a partial ${ss}-byte sector (${rest} bytes); dropped`);
        if (idx1.frames - first >= sectors) {
          throw new Error(`${label}:${idx1.line}: INDEX 01 of track ${t.number} is out of range: "${cf.name}" (${file.size} bytes) holds ${Math.floor(file.size / ss)} sectors of ${ss} bytes`);
        }
      }
      const rel1 = idx1.frames - first;
      specs.push({
        number: t.number, session: t.session, mode: t.mode, swap: cf.type === "MOTOROLA" && t.mode.audio, file,
        byteOffset, fileSectors: sectors,
        index0: idx0 ? idx0.frames - first : -1,
        index1: rel1,
        subIndexes: t.indexes.filter((i) => i.number > 1).map((i) => ({ number: i.number, rel: i.frames - first })),
        pregap: t.pregap, postgap: t.postgap, line: t.line,
      });
      byteOffset += sectors * ss;
    }
  });
  return specs;
}
