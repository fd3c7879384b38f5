// `cd info` and `cd verify` logic: the track table of a loaded disc (with header checks of the
// first and last raw sector of each data track), and a full EDC/ECC check of every stored data
// sector. Cold code; the CLI only formats what these return.
import type { CdDisc, Track } from "./disc.ts";
import { headerProblem } from "./index.ts";
import { checkSector, RAW_SECTOR } from "./sector.ts";

export interface TrackInfo {
  number: number;
  session: number;
  mode: string;
  file: string;
  fileType: "BINARY" | "MOTOROLA";
  sectorSize: number;
  /** Byte offset in the file of the track's first stored sector. */
  byteOffset: number;
  /** LBA of INDEX 00 (pregap start), or null when the track has no pregap. */
  index00: number | null;
  index01: number;
  /** INDEX 02..99 as LBAs. */
  indexes: { number: number; lba: number }[];
  /** Sectors from INDEX 01 to the end of the stored track. */
  length: number;
  /** Pregap sectors not stored in any file (PREGAP, or implied by a new session). */
  pregap: number;
  /** Pregap sectors stored in the file (INDEX 00 to INDEX 01). */
  storedPregap: number;
  postgap: number;
  /** LBA just after the track. */
  end: number;
  /** Header check of the first and last sector from INDEX 01: "ok", a problem, or "n/a" (no headers stored). */
  headers: { first: string; last: string };
}

export interface DiscInfo {
  source: string;
  format: string;
  leadout: number;
  sessions: { number: number; firstTrack: number; lastTrack: number; start: number; end: number }[];
  files: { name: string; path: string; size: number }[];
  tracks: TrackInfo[];
  warnings: string[];
}

export function discInfo(disc: CdDisc): DiscInfo {
  const tracks = disc.tracks.map((t): TrackInfo => {
    let first = "n/a", last = "n/a";
    if (t.mode.hasHeader && t.length > 0) {
      first = headerProblem(disc, t, t.index1Lba) ?? "ok";
      last = headerProblem(disc, t, t.index1Lba + t.length - 1) ?? "ok";
    }
    return {
      number: t.number, session: t.session, mode: t.mode.name, file: t.file.label,
      fileType: t.swap ? "MOTOROLA" : "BINARY", sectorSize: t.mode.sectorSize, byteOffset: t.byteOffset,
      index00: t.index0Lba >= 0 ? t.index0Lba : null, index01: t.index1Lba,
      indexes: t.subIndexes.map((i) => ({ number: i.number, lba: t.fileLba + i.rel })),
      length: t.length, pregap: t.pregap + t.sessionPregap, storedPregap: t.index1, postgap: t.postgap, end: t.end,
      headers: { first, last },
    };
  });
  const sessions: DiscInfo["sessions"] = [];
  for (const t of disc.tracks) {
    const s = sessions[sessions.length - 1];
    if (s && s.number === t.session) { s.lastTrack = t.number; s.end = t.end; }
    else sessions.push({ number: t.session, firstTrack: t.number, lastTrack: t.number, start: t.start, end: t.end });
  }
  return {
    source: disc.source, format: disc.format, leadout: disc.leadout, sessions,
    files: disc.files.map((f) => ({ name: f.label, path: f.path, size: f.size })),
    tracks, warnings: [...disc.warnings],
  };
}

export interface BadSector { lba: number; track: number; problem: string }
export interface VerifyResult { checked: number; skipped: number; bad: BadSector[] }

const CHUNK = 256;

/**
 * Recomputes EDC (and ECC for Mode 1 and XA Form 1) of every stored data sector, INDEX 00
 * pregaps included. Tracks stored without EDC/ECC (*\/2048, MODE2/2324) are counted as skipped.
 * `onBad` is called as bad sectors are found (for progress output).
 */
export function verifyDisc(disc: CdDisc, onBad?: (b: BadSector) => void): VerifyResult {
  const res: VerifyResult = { checked: 0, skipped: 0, bad: [] };
  const buf = new Uint8Array(CHUNK * RAW_SECTOR);
  for (const t of disc.tracks) {
    if (t.mode.audio) continue;
    if (!verifiable(t)) { res.skipped += t.fileSectors; continue; }
    for (let lba = t.fileLba, end = t.fileLba + t.fileSectors; lba < end; lba += CHUNK) {
      const n = Math.min(CHUNK, end - lba);
      disc.readRaw(buf, 0, lba, n);
      for (let i = 0; i < n; i++) {
        const p = checkSector(buf, i * RAW_SECTOR, lba + i);
        res.checked++;
        if (p) {
          const b = { lba: lba + i, track: t.number, problem: p };
          res.bad.push(b);
          onBad?.(b);
        }
      }
    }
  }
  return res;
}

/** Tracks whose stored sectors carry EDC/ECC: raw 2352-byte data sectors and 2336-byte Mode 2 bodies. */
function verifiable(t: Track): boolean {
  return t.mode.sectorSize === 2352 || t.mode.sectorSize === 2336;
}
