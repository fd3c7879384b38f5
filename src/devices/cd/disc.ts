// The disc model shared by every CD descriptor (CUE sheet, CloneCD .ccd, lone raw .bin): track
// modes, the LBA layout (pregaps, postgaps, session gaps) and `CdDisc`, the plugin that owns the
// image files and reads raw or cooked sectors from them. Views (views.ts) are block devices over a
// CdDisc. Layout code is cold; readRaw/readFile are on the hot path and allocate nothing per call.
import { closeSync, readSync } from "node:fs";
import { eio } from "../../protocol/errors.ts";
import { needLocal, type StagedFile } from "../staged.ts";
import {
  COOKED_SECTOR, RAW_SECTOR, SUBMODE_DATA, emptyDataSector, encodeMode1, encodeMode2Form1, encodeMode2Form2,
  writeHeader,
} from "./sector.ts";

/** How a 2352-byte raw sector is produced from one file sector. */
export const enum RawKind {
  /** The file holds 2352-byte sectors. */
  Copy,
  /** CDG: 2352 audio bytes + 96 subchannel bytes; keep the first 2352. */
  Cdg,
  /** 2336 bytes (sector without sync and header): prepend a Mode 2 header. */
  Mode2Body,
  /** 2048 bytes of Mode 1 user data: synthesize header, EDC and ECC. */
  Mode1User,
  /** 2048 bytes of XA Form 1 user data: synthesize header, subheader, EDC and ECC. */
  Form1User,
  /** 2324 bytes of XA Form 2 user data: synthesize header, subheader and EDC. */
  Form2User,
}

export interface TrackMode {
  /** As written in a CUE sheet, e.g. "MODE1/2352". */
  readonly name: string;
  /** Bytes per sector in the file. */
  readonly sectorSize: number;
  readonly audio: boolean;
  /** Offset of the 2048 user bytes inside a file sector, or -1: the mode has no cooked view. */
  readonly cookedOffset: number;
  /** Offset of the XA submode byte inside a file sector (Form 2 detection), or -1. */
  readonly submodeOffset: number;
  readonly raw: RawKind;
  /** 0 for audio, else the sector mode (1 or 2) used for synthesized empty sectors. */
  readonly dataMode: 0 | 1 | 2;
  /** The file sectors carry sync + header (checked at load time and by `cd info`). */
  readonly hasHeader: boolean;
}

function mode(name: string, sectorSize: number, cookedOffset: number, submodeOffset: number, raw: RawKind, dataMode: 0 | 1 | 2): TrackMode {
  return Object.freeze({
    name, sectorSize, audio: dataMode === 0, cookedOffset, submodeOffset, raw, dataMode,
    hasHeader: raw === RawKind.Copy && dataMode !== 0,
  });
}

/** Every track mode we accept, by its CUE name (upper case). */
export const TRACK_MODES: ReadonlyMap<string, TrackMode> = new Map([
  mode("AUDIO", 2352, -1, -1, RawKind.Copy, 0),
  mode("CDG", 2448, -1, -1, RawKind.Cdg, 0),
  mode("MODE1/2048", 2048, 0, -1, RawKind.Mode1User, 1),
  mode("MODE1/2352", 2352, 16, -1, RawKind.Copy, 1),
  mode("MODE2/2048", 2048, 0, -1, RawKind.Form1User, 2),
  mode("MODE2/2324", 2324, -1, -1, RawKind.Form2User, 2),
  mode("MODE2/2336", 2336, 8, 2, RawKind.Mode2Body, 2),
  mode("MODE2/2352", 2352, 24, 18, RawKind.Copy, 2),
  mode("CDI/2336", 2336, 8, 2, RawKind.Mode2Body, 2),
  mode("CDI/2352", 2352, 24, 18, RawKind.Copy, 2),
].map((m) => [m.name, m]));

export function trackMode(name: string): TrackMode {
  const m = TRACK_MODES.get(name);
  if (!m) throw new Error(`unknown track mode ${name}`);
  return m;
}

/** One image file opened by a disc. */
export interface DiscFile {
  /** Resolved path on disk. */
  readonly path: string;
  /** The name as the descriptor wrote it. */
  readonly label: string;
  readonly size: number;
  fd: number;
  /**
   * For a file whose bytes may not be local yet (a remote object): `fd` is its cache file, read only
   * after `staged.isLocal`; reads throw NotLocal otherwise (the views wait and retry). Closed with the disc.
   */
  staged?: StagedFile;
}

/** A track as a descriptor gives it, file-relative (input to layoutDisc). */
export interface TrackSpec {
  number: number;
  session: number;
  mode: TrackMode;
  /** MOTOROLA: audio stored big-endian, byte-swapped on read. */
  swap: boolean;
  file: DiscFile;
  /** Byte offset of the track's first in-file sector. */
  byteOffset: number;
  /** Sectors of this track stored in the file (in-file pregap included). */
  fileSectors: number;
  /** INDEX 00 relative to the first in-file sector, or -1 when the cue gives none. */
  index0: number;
  /** INDEX 01 relative to the first in-file sector. */
  index1: number;
  /** INDEX 02..99 relative to the first in-file sector, in order. */
  subIndexes: { number: number; rel: number }[];
  /** Sectors before the file part that are not in any file (PREGAP). */
  pregap: number;
  /** Sectors after the file part that are not in any file (POSTGAP). */
  postgap: number;
  /** Descriptor line of the TRACK (0 when not applicable). */
  line: number;
  /**
   * Absolute LBA of the first in-file sector when the descriptor fixes it (CloneCD's TOC); the
   * layout then synthesizes any gap before it instead of computing session gaps itself.
   */
  fixedLba?: number;
}

/** A track placed on the disc. LBAs are absolute (LBA 0 = MSF 00:02:00). */
export interface Track extends TrackSpec {
  /** LBA where the track begins (start of its synthesized pregap, if any). */
  start: number;
  /** LBA of the first in-file sector. */
  fileLba: number;
  /** LBA of INDEX 00 (the pregap start), or -1 when the track has no pregap. */
  index0Lba: number;
  /** LBA of INDEX 01. */
  index1Lba: number;
  /** Sectors from INDEX 01 to the end of the file part (postgap excluded). */
  length: number;
  /** LBA just after the track (postgap included). */
  end: number;
  /** Pregap sectors added because a session started and the sheet stated none. */
  sessionPregap: number;
}

/** A run of LBAs with one source: a file region, or synthesized sectors in a track's style. */
export interface Segment {
  start: number;
  count: number;
  track: Track;
  /** The file, or null for synthesized sectors. */
  file: DiscFile | null;
  /** Byte position in the file of the segment's first sector. */
  pos: number;
  /** What the segment is (for `cd info`): "track", "pregap", "postgap", "session gap". */
  what: string;
}

/** Sectors between sessions: lead-out (6750 after session 1, 2250 later) + lead-in (4500). */
export function sessionGap(previousSession: number): number {
  return (previousSession === 1 ? 6750 : 2250) + 4500;
}
export const SESSION_PREGAP = 150;

/**
 * Places tracks on the disc: running LBA from 0; each track adds its PREGAP, then its file
 * sectors, then its POSTGAP; a new session adds the lead-out + lead-in gap and, when the track
 * states no pregap of its own, a 150-sector pregap.
 */
export function layoutDisc(specs: TrackSpec[]): { tracks: Track[]; segments: Segment[]; leadout: number } {
  const tracks: Track[] = [];
  const segments: Segment[] = [];
  let lba = 0;
  let prev: Track | null = null;
  for (const spec of specs) {
    let sessionPregap = 0;
    if (spec.fixedLba !== undefined) {
      const at = spec.fixedLba - spec.pregap;
      if (at < lba) throw new Error(`track ${spec.number} at LBA ${spec.fixedLba} overlaps the previous track (which ends at LBA ${lba})`);
      if (at > lba && prev) {
        segments.push({ start: lba, count: at - lba, track: prev, file: null, pos: 0, what: spec.session > prev.session ? "session gap" : "gap" });
        lba = at;
      } else if (at > lba) {
        sessionPregap = at - lba; // sectors before the first track: synthesized as its pregap
      }
    } else if (prev && spec.session > prev.session) {
      const gap = sessionGap(prev.session);
      segments.push({ start: lba, count: gap, track: prev, file: null, pos: 0, what: "session gap" });
      lba += gap;
      if (spec.pregap === 0 && spec.index1 === 0) sessionPregap = SESSION_PREGAP;
    }
    const pregap = spec.pregap + sessionPregap;
    const start = lba;
    const fileLba = start + pregap;
    const index1Lba = fileLba + spec.index1;
    const index0Lba = spec.index0 >= 0 ? fileLba + spec.index0 : pregap > 0 || spec.index1 > 0 ? start : -1;
    const t: Track = {
      ...spec, pregap: spec.pregap, start, fileLba, index0Lba, index1Lba,
      length: spec.fileSectors - spec.index1,
      end: fileLba + spec.fileSectors + spec.postgap, sessionPregap,
    };
    if (pregap > 0) segments.push({ start, count: pregap, track: t, file: null, pos: 0, what: "pregap" });
    segments.push({ start: fileLba, count: spec.fileSectors, track: t, file: spec.file, pos: spec.byteOffset, what: "track" });
    if (spec.postgap > 0) segments.push({ start: fileLba + spec.fileSectors, count: spec.postgap, track: t, file: null, pos: 0, what: "postgap" });
    tracks.push(t);
    lba = t.end;
    prev = t;
  }
  return { tracks, segments, leadout: lba };
}

/** LBA formatted as MSF (mm:ss:ff) of the sector's disc time LBA + 150, for messages. */
export function msf(lba: number): string {
  const a = lba + 150;
  const f = a % 75, s = Math.floor(a / 75) % 60, m = Math.floor(a / 4500);
  return `${String(m).padStart(2, "0")}:${String(s).padStart(2, "0")}:${String(f).padStart(2, "0")}`;
}

/**
 * A disc: its files (opened read-only), tracks, segments and lead-out. Shared by every view made
 * from it; the files close when the last view releases it.
 */
export class CdDisc {
  /** Scratch for file reads that must be expanded or strided (grown as needed, reused). */
  private scratchBuf: Buffer = Buffer.allocUnsafe(64 * 1024);
  /** Second scratch for views that read whole sectors and copy a sub-range out. */
  private viewBuf: Buffer = Buffer.allocUnsafe(64 * 1024);
  private refs = 0;
  private closed = false;
  private lastSeg = 0;

  constructor(
    /** The descriptor (cue/ccd/bin) path, for messages. */
    readonly source: string,
    /** "cue", "ccd" or "raw". */
    readonly format: string,
    readonly files: DiscFile[],
    readonly tracks: Track[],
    readonly segments: Segment[],
    readonly leadout: number,
    readonly warnings: string[],
  ) {
    this.staged = files.some((f) => f.staged !== undefined);
  }

  /** True if some file's bytes may not be local yet (reads can throw NotLocal). */
  readonly staged: boolean;

  get sessions(): number {
    let n = 0;
    for (const t of this.tracks) if (t.session > n) n = t.session;
    return n;
  }

  acquire(): void { this.refs++; }
  release(): void {
    if (--this.refs <= 0) this.close();
  }
  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const f of this.files) {
      if (f.staged) {
        try { void f.staged.close(); } catch { /* already closed */ }
        f.fd = -1;
      } else if (f.fd >= 0) {
        try { closeSync(f.fd); } catch { /* already closed */ }
        f.fd = -1;
      }
    }
  }

  scratch(n: number): Buffer {
    if (this.scratchBuf.length < n) this.scratchBuf = Buffer.allocUnsafe(Math.max(n, this.scratchBuf.length * 2));
    return this.scratchBuf;
  }
  viewScratch(n: number): Buffer {
    if (this.viewBuf.length < n) this.viewBuf = Buffer.allocUnsafe(Math.max(n, this.viewBuf.length * 2));
    return this.viewBuf;
  }

  /** Reads exactly `len` bytes at `pos` of `file` into buf[off..]; a short read is EIO. */
  readFile(file: DiscFile, buf: Uint8Array, off: number, len: number, pos: number): void {
    if (file.fd < 0) throw eio(`${this.source}: ${file.path} is closed`);
    if (file.staged !== undefined) needLocal(file.staged, pos, len);
    let done = 0;
    while (done < len) {
      const n = readSync(file.fd, buf, off + done, len - done, pos + done);
      if (n <= 0) throw eio(`${this.source}: short read of ${file.path} at byte ${pos + done} (file truncated after open?)`);
      done += n;
    }
  }

  /** The index of the segment holding `lba` (segments are sorted and contiguous from 0). */
  segmentAt(lba: number): number {
    const segs = this.segments;
    let i = this.lastSeg;
    const s = segs[i];
    if (s && lba >= s.start && lba < s.start + s.count) return i;
    let lo = 0, hi = segs.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (segs[mid]!.start <= lba) lo = mid; else hi = mid - 1;
    }
    i = lo;
    this.lastSeg = i;
    return i;
  }

  /** Fills buf[off .. off + count*2352) with the raw sectors lba .. lba+count-1 (< leadout). */
  readRaw(buf: Uint8Array, off: number, lba: number, count: number): void {
    while (count > 0) {
      const seg = this.segments[this.segmentAt(lba)]!;
      const n = Math.min(count, seg.start + seg.count - lba);
      if (seg.file === null) this.synthesize(buf, off, seg.track, lba, n);
      else this.readRawFromFile(buf, off, seg, lba, n);
      off += n * RAW_SECTOR;
      lba += n;
      count -= n;
    }
  }

  private readRawFromFile(buf: Uint8Array, off: number, seg: Segment, lba: number, n: number): void {
    const t = seg.track;
    const m = t.mode;
    const ss = m.sectorSize;
    const pos = seg.pos + (lba - seg.start) * ss;
    if (m.raw === RawKind.Copy) {
      this.readFile(seg.file!, buf, off, n * RAW_SECTOR, pos);
      if (t.swap) swapPairs(buf, off, off + n * RAW_SECTOR);
      return;
    }
    const src = this.scratch(n * ss);
    this.readFile(seg.file!, src, 0, n * ss, pos);
    for (let i = 0; i < n; i++) {
      const o = off + i * RAW_SECTOR;
      const so = i * ss;
      switch (m.raw) {
        case RawKind.Cdg:
          src.copy(buf, o, so, so + RAW_SECTOR);
          if (t.swap) swapPairs(buf, o, o + RAW_SECTOR);
          break;
        case RawKind.Mode2Body:
          writeHeader(buf, o, lba + i, 2);
          src.copy(buf, o + 16, so, so + 2336);
          break;
        case RawKind.Mode1User:
          src.copy(buf, o + 16, so, so + COOKED_SECTOR);
          encodeMode1(buf, o, lba + i);
          break;
        case RawKind.Form1User:
          src.copy(buf, o + 24, so, so + COOKED_SECTOR);
          encodeMode2Form1(buf, o, lba + i, SUBMODE_DATA);
          break;
        case RawKind.Form2User:
          src.copy(buf, o + 24, so, so + 2324);
          encodeMode2Form2(buf, o, lba + i);
          break;
        default:
          throw eio(`${this.source}: no raw form for ${m.name}`);
      }
    }
  }

  /** Synthesized sectors in the style of `t`: silence for audio, empty data sectors otherwise. */
  private synthesize(buf: Uint8Array, off: number, t: Track, lba: number, n: number): void {
    if (t.mode.dataMode === 0) {
      buf.fill(0, off, off + n * RAW_SECTOR);
      return;
    }
    const mode = t.mode.dataMode;
    for (let i = 0; i < n; i++) emptyDataSector(buf, off + i * RAW_SECTOR, lba + i, mode);
  }
}

/** Swaps each byte pair in buf[start, end) (MOTOROLA big-endian audio to little-endian). */
export function swapPairs(buf: Uint8Array, start: number, end: number): void {
  for (let i = start; i + 1 < end; i += 2) {
    const a = buf[i]!;
    buf[i] = buf[i + 1]!;
    buf[i + 1] = a;
  }
}
