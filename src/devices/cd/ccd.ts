// CloneCD descriptor (.ccd) parser. A .ccd is an INI file holding the disc's full TOC ([Entry N]
// sections: session, point, control, PLBA or PMin/PSec/PFrame) and per-track modes and indexes
// ([TRACK N]: MODE=0|1|2, INDEX 0=, INDEX 1= as absolute LBAs). The .img beside it holds raw
// 2352-byte sectors laid out by LBA (sector L at byte L*2352); the optional .sub (subchannel) is
// not needed for any export. Cold code; every error names the file and line.
import { trackMode, type DiscFile, type TrackMode } from "./disc.ts";
import { decodeDescriptor, descriptorLines } from "./text.ts";

export interface CcdTrack {
  number: number;
  session: number;
  /** From [TRACK N] MODE, or null when the section is missing (decide from the TOC control bits). */
  mode: TrackMode | null;
  /** Control nibble of the TOC entry (bit 2 set = data track). */
  control: number;
  /** LBA of INDEX 01. */
  index1: number;
  /** LBA of INDEX 00, or -1. */
  index0: number;
  line: number;
}

export interface CcdSheet {
  tracks: CcdTrack[];
  /** Lead-out LBA of each session (index = session number). */
  leadouts: Map<number, number>;
  warnings: string[];
}

const MAX_ENTRIES = 1000;
/** LBAs beyond this (about 24 hours of audio) are not a CD. */
const MAX_LBA = 100 * 60 * 75 * 10;

interface Section { name: string; line: number; keys: Map<string, { value: string; line: number }> }

function parseInt10or16(v: string): number {
  if (/^0x[0-9a-f]{1,8}$/i.test(v)) return parseInt(v.slice(2), 16);
  if (/^-?\d{1,9}$/.test(v)) return Number(v);
  return NaN;
}

export function parseCcd(bytes: Uint8Array, label: string): CcdSheet {
  const lines = descriptorLines(decodeDescriptor(bytes, label), label);
  const sections: Section[] = [];
  let cur: Section | null = null;
  for (let ln = 1; ln <= lines.length; ln++) {
    const line = lines[ln - 1]!.trim();
    if (line === "" || line.startsWith(";") || line.startsWith("#")) continue;
    const sec = /^\[([^\]]{1,64})\]/.exec(line);
    if (sec) {
      if (sections.length >= MAX_ENTRIES) throw new Error(`${label}:${ln}: more than ${MAX_ENTRIES} sections; not a CloneCD descriptor?`);
      cur = { name: sec[1]!.trim().toUpperCase().replace(/\s+/g, " "), line: ln, keys: new Map() };
      sections.push(cur);
      continue;
    }
    const eq = line.indexOf("=");
    if (eq <= 0 || !cur) throw new Error(`${label}:${ln}: expected "[Section]" or "key=value", found "${line.slice(0, 40)}"`);
    cur.keys.set(line.slice(0, eq).trim().toUpperCase().replace(/\s+/g, " "), { value: line.slice(eq + 1).trim(), line: ln });
  }
  if (!sections.some((s) => s.name === "CLONECD")) throw new Error(`${label}: no [CloneCD] section; not a CloneCD descriptor`);

  const num = (s: Section, key: string, min: number, max: number, required = true): number => {
    const kv = s.keys.get(key);
    if (!kv) {
      if (required) throw new Error(`${label}:${s.line}: [${s.name}] has no ${key}=`);
      return NaN;
    }
    const v = parseInt10or16(kv.value);
    if (!Number.isFinite(v) || v < min || v > max) throw new Error(`${label}:${kv.line}: ${key}=${kv.value.slice(0, 20)} is out of range (${min}-${max})`);
    return v;
  };

  const warnings: string[] = [];
  const leadouts = new Map<number, number>();
  const toc = new Map<number, { session: number; control: number; lba: number; line: number }>();
  for (const s of sections) {
    if (!/^ENTRY \d+$/.test(s.name)) continue;
    const session = num(s, "SESSION", 1, 99);
    const point = num(s, "POINT", 0, 255);
    const adr = num(s, "ADR", 0, 15, false);
    if (!Number.isNaN(adr) && adr !== 1) continue;
    const control = num(s, "CONTROL", 0, 15, false);
    let lba = num(s, "PLBA", -MAX_LBA, MAX_LBA, false);
    if (Number.isNaN(lba)) lba = (num(s, "PMIN", 0, 99) * 60 + num(s, "PSEC", 0, 59)) * 75 + num(s, "PFRAME", 0, 74) - 150;
    if (point === 0xa2) leadouts.set(session, lba);
    else if (point >= 1 && point <= 99) {
      if (toc.has(point)) throw new Error(`${label}:${s.line}: track ${point} appears twice in the TOC`);
      if (lba < 0) throw new Error(`${label}:${s.line}: track ${point} starts at negative LBA ${lba}`);
      toc.set(point, { session, control: Number.isNaN(control) ? 0 : control, lba, line: s.line });
    }
  }
  if (toc.size === 0) throw new Error(`${label}: the TOC lists no tracks`);

  const tracks: CcdTrack[] = [];
  const numbers = [...toc.keys()].sort((a, b) => a - b);
  for (let i = 0; i < numbers.length; i++) {
    const n = numbers[i]!;
    if (i > 0 && n !== numbers[i - 1]! + 1) throw new Error(`${label}: track numbers jump from ${numbers[i - 1]} to ${n}`);
    const e = toc.get(n)!;
    const ts = sections.find((s) => s.name === `TRACK ${n}`);
    let mode: TrackMode | null = null;
    let index1 = e.lba, index0 = -1, line = e.line;
    if (ts) {
      line = ts.line;
      const m = num(ts, "MODE", 0, 255);
      if (m === 0) mode = trackMode("AUDIO");
      else if (m === 1) mode = trackMode("MODE1/2352");
      else if (m === 2) mode = trackMode("MODE2/2352");
      else throw new Error(`${label}:${ts.keys.get("MODE")!.line}: unknown track mode MODE=${m} (expected 0, 1 or 2)`);
      const i1 = num(ts, "INDEX 1", 0, MAX_LBA, false);
      if (!Number.isNaN(i1)) {
        if (i1 !== e.lba) warnings.push(`${label}:${ts.keys.get("INDEX 1")!.line}: INDEX 1=${i1} differs from the TOC (${e.lba}); using the TOC`);
      }
      const i0 = num(ts, "INDEX 0", 0, MAX_LBA, false);
      if (!Number.isNaN(i0)) {
        if (i0 > index1) throw new Error(`${label}:${ts.keys.get("INDEX 0")!.line}: INDEX 0=${i0} is after INDEX 1 (${index1})`);
        index0 = i0;
      }
    }
    tracks.push({ number: n, session: e.session, mode, control: e.control, index1, index0, line });
  }
  for (let i = 1; i < tracks.length; i++) {
    const a = tracks[i - 1]!, b = tracks[i]!;
    if (b.session < a.session) throw new Error(`${label}:${b.line}: track ${b.number} is in session ${b.session}, before track ${a.number}'s session ${a.session}`);
    if ((b.index0 >= 0 ? b.index0 : b.index1) <= a.index1) throw new Error(`${label}:${b.line}: track ${b.number} does not start after track ${a.number}`);
  }
  return { tracks, leadouts, warnings };
}

/** The end LBA (exclusive) of track i: the next track's start in its session, else the session's lead-out. */
export function ccdTrackEnd(sheet: CcdSheet, i: number, img: DiscFile, label: string): number {
  const t = sheet.tracks[i]!;
  const next = sheet.tracks[i + 1];
  const fileEnd = Math.floor(img.size / 2352);
  let end: number;
  if (next && next.session === t.session) end = next.index0 >= 0 ? next.index0 : next.index1;
  else {
    const lo = sheet.leadouts.get(t.session);
    if (lo === undefined) throw new Error(`${label}: session ${t.session} has no lead-out entry (Point=0xa2)`);
    if (lo <= t.index1) throw new Error(`${label}: the lead-out of session ${t.session} (LBA ${lo}) is not after track ${t.number}'s INDEX 1 (LBA ${t.index1})`);
    end = lo;
  }
  if (end > fileEnd) {
    if (t.index1 >= fileEnd) throw new Error(`${label}:${t.line}: track ${t.number} starts at LBA ${t.index1}, beyond the end of ${img.label} (${fileEnd} sectors)`);
    sheet.warnings.push(`${label}: track ${t.number} ends at LBA ${end} but ${img.label} holds ${fileEnd} sectors; truncated`);
    end = fileEnd;
  }
  return end;
}
