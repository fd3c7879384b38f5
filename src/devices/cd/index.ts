// CD images as NBD exports: detection (isCdImage), loading a disc from a CUE sheet, a CloneCD
// .ccd or a lone raw .bin/.img (loadDisc), and the export list (openCdImage):
//   <base>          cooked 2048-byte view of the first data track (what QEMU boots)
//   <base>/tNN      cooked view of every data track
//   <base>/tNN.raw  every track as raw 2352-byte sectors (audio as 16-bit LE PCM)
//   <base>/raw      the whole disc, LBA 0 to the lead-out, gaps synthesized
import { closeSync, fstatSync, openSync, readdirSync, readFileSync, readSync, statSync } from "node:fs";
import { basename, dirname, extname, join } from "node:path";
import type { ExportSpec } from "../types.ts";
import { ccdTrackEnd, parseCcd } from "./ccd.ts";
import { cueTrackSpecs, parseCue } from "./cue.ts";
import { CdDisc, layoutDisc, trackMode, type DiscFile, type Track, type TrackSpec } from "./disc.ts";
import { hasSync, headerLba, RAW_SECTOR } from "./sector.ts";
import { CookedTrackView, RawView } from "./views.ts";
import { needLocal } from "../staged.ts";

/** Image files larger than this are refused (1 TiB; a CD holds under 1 GiB). */
export const MAX_IMAGE_BYTES = 2 ** 40;

/** True if `path` should be opened as a CD image: .cue/.ccd by extension, or a lone .img/.bin of raw CD sectors. */
export function isCdImage(path: string): boolean {
  const ext = extname(path).toLowerCase();
  if (ext === ".cue" || ext === ".ccd") return true;
  if (ext !== ".img" && ext !== ".bin") return false;
  try {
    return looksLikeRawCd(path);
  } catch {
    return false;
  }
}

function looksLikeRawCd(path: string): boolean {
  const fd = openSync(path, "r");
  try {
    const st = fstatSync(fd);
    if (!st.isFile() || st.size === 0 || st.size % RAW_SECTOR !== 0) return false;
    const head = new Uint8Array(16);
    if (readSync(fd, head, 0, 16, 0) !== 16) return false;
    return hasSync(head, 0);
  } finally {
    closeSync(fd);
  }
}

/** Finds a file a descriptor names: exact, then case-insensitive per path component, then the basename next to the descriptor. */
export function resolveImageFile(dir: string, name: string): string | null {
  const norm = name.replace(/\\/g, "/");
  const absolute = norm.startsWith("/") || /^[A-Za-z]:\//.test(norm);
  const candidates: string[][] = [];
  if (!absolute) candidates.push(norm.split("/").filter((p) => p !== "" && p !== "."));
  const base = norm.split("/").pop() ?? "";
  if (base !== "") candidates.push([base]);
  for (const parts of candidates) {
    const exact = join(dir, ...parts);
    if (isFile(exact)) return exact;
    let cur = dir;
    let ok = true;
    for (const part of parts) {
      if (part === "..") { cur = join(cur, ".."); continue; }
      let entries: string[];
      try { entries = readdirSync(cur); } catch { ok = false; break; }
      const hit = entries.find((e) => e === part) ?? entries.find((e) => e.toLowerCase() === part.toLowerCase());
      if (hit === undefined) { ok = false; break; }
      cur = join(cur, hit);
    }
    if (ok && isFile(cur)) return cur;
  }
  return null;
}

function isFile(p: string): boolean {
  try { return statSync(p).isFile(); } catch { return false; }
}

function openImageFile(path: string, label: string, what: string): DiscFile {
  let fd: number;
  try {
    fd = openSync(path, "r");
  } catch (e) {
    throw new Error(`${what}: cannot open ${path}: ${(e as Error).message}`);
  }
  const st = fstatSync(fd);
  if (!st.isFile()) { closeSync(fd); throw new Error(`${what}: ${path} is not a regular file`); }
  if (st.size > MAX_IMAGE_BYTES) { closeSync(fd); throw new Error(`${what}: ${path} is ${st.size} bytes, larger than any CD image (limit ${MAX_IMAGE_BYTES})`); }
  return { path, label, size: st.size, fd };
}

function closeAll(files: DiscFile[]): void {
  for (const f of files) if (f.fd >= 0) { try { closeSync(f.fd); } catch { /* ignore */ } f.fd = -1; }
}

/** Loads a disc (files opened read-only; the format by extension unless given). Throws an Error naming the file and line for a bad descriptor. */
export function loadDisc(path: string, format?: "cue" | "ccd" | "raw"): CdDisc {
  const ext = extname(path).toLowerCase();
  const f = format ?? (ext === ".cue" ? "cue" : ext === ".ccd" ? "ccd" : "raw");
  if (f === "cue") return loadCue(path);
  if (f === "ccd") return loadCcd(path);
  return loadRaw(path);
}

function readDescriptor(path: string): Uint8Array {
  let st;
  try { st = statSync(path); } catch (e) { throw new Error(`${path}: ${(e as Error).message}`); }
  if (!st.isFile()) throw new Error(`${path}: not a regular file`);
  notAnImage(path, st.size);
  if (st.size > 1024 * 1024) throw new Error(`${path}: ${st.size} bytes is too large for a disc descriptor (limit 1048576)`);
  return readFileSync(path);
}

/** A descriptor (.cue/.ccd) that is really a disc image: refuse with what to do instead. */
function notAnImage(path: string, size: number): void {
  const head = new Uint8Array(32774);
  const fd = openSync(path, "r");
  let n: number;
  try { n = readSync(fd, head, 0, head.length, 0); } finally { closeSync(fd); }
  const kind = extname(path).toLowerCase() === ".ccd" ? "CloneCD descriptor" : "CUE sheet";
  if (n === head.length && size % 2048 === 0 && new TextDecoder().decode(head.subarray(32769, 32774)) === "CD001") {
    throw new Error(`${path} is not a ${kind} but an ISO 9660 image (CD001 at byte 32769): rename it to .iso and serve it directly ` +
      `(an ISO is served as a CD), or write a sheet for it with MODE1/2048, or make a raw image with \`bun-nbd cd make\``);
  }
  if (size % RAW_SECTOR === 0 && hasSync(head, 0)) {
    throw new Error(`${path} is not a ${kind} but raw 2352-byte CD sectors: rename it to .bin and serve it directly (served as one data track), or write a sheet for it`);
  }
}

function loadCue(path: string): CdDisc {
  const sheet = parseCue(readDescriptor(path), path);
  const warnings = [...sheet.warnings];
  const dir = dirname(path);
  const files: DiscFile[] = [];
  const byPath = new Map<string, DiscFile>();
  try {
    const perFile = sheet.files.map((cf) => {
      const resolved = resolveImageFile(dir, cf.name);
      if (resolved === null) throw new Error(`${path}:${cf.line}: FILE "${cf.name}" not found next to the sheet`);
      if (basename(resolved) !== basename(cf.name.replace(/\\/g, "/"))) {
        warnings.push(`${path}:${cf.line}: FILE "${cf.name}" resolved to ${resolved}`);
      }
      let f = byPath.get(resolved);
      if (!f) {
        f = openImageFile(resolved, cf.name, `${path}:${cf.line}`);
        byPath.set(resolved, f);
        files.push(f);
      }
      return f;
    });
    const specs = cueTrackSpecs(sheet, perFile, path, warnings);
    for (const t of specs) checkSectorFormat(path, t);
    return finish(path, "cue", files, specs, warnings);
  } catch (e) {
    closeAll(files);
    throw e;
  }
}

/**
 * Refuse a sheet whose data track mode contradicts the file: a raw mode (MODE1/2352...) over a
 * 2048-byte ISO (no sync pattern where one must be, CD001 at byte 32769 of the track, a whole
 * number of 2048-byte sectors), or a cooked mode (MODE1/2048) over raw sectors. Served as
 * written, either gives garbage sectors; the message says how to fix it.
 */
function checkSectorFormat(path: string, t: TrackSpec): void {
  if (t.mode.audio || t.fileSectors <= 0) return;
  const head = new Uint8Array(32 * 1024 + 8);
  const n = readSync(t.file.fd, head, 0, head.length, t.byteOffset);
  const rest = t.file.size - t.byteOffset;
  const where = `${path}:${t.line}: track ${String(t.number).padStart(2, "0")} is declared ${t.mode.name}`;
  if (t.mode.sectorSize === RAW_SECTOR && !hasSync(head, 0)) {
    const iso = n >= 32774 && head[32769] === 0x43 && head[32770] === 0x44 && head[32771] === 0x30 && head[32772] === 0x30 && head[32773] === 0x31;
    if (iso && rest % 2048 === 0) {
      throw new Error(`${where}, but "${t.file.label}" is a 2048-byte-sector ISO 9660 image (no sync pattern, CD001 at byte 32769): ` +
        `write MODE1/2048 in the sheet, or make a real raw image with \`bun-nbd cd make ${t.file.label} NEW.cue\`, or serve the .iso directly`);
    }
  }
  if (t.mode.sectorSize === 2048 && t.mode.cookedOffset === 0 && hasSync(head, 0) && rest % RAW_SECTOR === 0) {
    throw new Error(`${where}, but "${t.file.label}" holds raw 2352-byte sectors (sync pattern at its start): write MODE${head[15] === 2 ? 2 : 1}/2352 in the sheet`);
  }
}

function loadCcd(path: string): CdDisc {
  const sheet = parseCcd(readDescriptor(path), path);
  const dir = dirname(path);
  const stem = basename(path, extname(path));
  const imgPath = resolveImageFile(dir, `${stem}.img`);
  if (imgPath === null) throw new Error(`${path}: data file ${stem}.img not found next to the descriptor`);
  const img = openImageFile(imgPath, basename(imgPath), path);
  try {
    const specs: TrackSpec[] = [];
    for (let i = 0; i < sheet.tracks.length; i++) {
      const t = sheet.tracks[i]!;
      const start = i === 0 ? 0 : t.index0 >= 0 ? t.index0 : t.index1;
      const end = ccdTrackEnd(sheet, i, img, path);
      let mode = t.mode;
      if (!mode) {
        if ((t.control & 4) === 0) mode = trackMode("AUDIO");
        else {
          const s = new Uint8Array(16);
          readSync(img.fd, s, 0, 16, t.index1 * RAW_SECTOR);
          mode = trackMode(s[15] === 2 ? "MODE2/2352" : "MODE1/2352");
        }
      }
      specs.push({
        number: t.number, session: t.session, mode, swap: false, file: img,
        byteOffset: start * RAW_SECTOR, fileSectors: end - start,
        index0: t.index0 >= 0 ? t.index0 - start : -1, index1: t.index1 - start, subIndexes: [],
        pregap: 0, postgap: 0, line: t.line, fixedLba: start,
      });
    }
    return finish(path, "ccd", [img], specs, sheet.warnings);
  } catch (e) {
    closeAll([img]);
    throw e;
  }
}

function loadRaw(path: string): CdDisc {
  const img = openImageFile(path, basename(path), path);
  try {
    return rawDisc(path, img);
  } catch (e) {
    closeAll([img]);
    throw e;
  }
}

/**
 * A lone file of raw sectors as a one-track disc (`path` names it in messages). Reads through
 * `img.staged` when it has one (then it may throw NotLocal: see staged.ts).
 */
export function rawDisc(path: string, img: DiscFile): CdDisc {
  if (img.size === 0 || img.size % RAW_SECTOR !== 0) throw new Error(`${path}: size ${img.size} is not a multiple of ${RAW_SECTOR}; not a raw CD image`);
  const head = new Uint8Array(16);
  if (img.staged) needLocal(img.staged, 0, 16);
  readSync(img.fd, head, 0, 16, 0);
  if (!hasSync(head, 0)) throw new Error(`${path}: no CD sync pattern at offset 0; not a raw CD image`);
  const m = head[15];
  if (m !== 1 && m !== 2) throw new Error(`${path}: first sector has mode byte ${m}; expected a Mode 1 or Mode 2 data sector`);
  const mode = trackMode(m === 1 ? "MODE1/2352" : "MODE2/2352");
  const sectors = img.size / RAW_SECTOR;
  const warnings = [`${path}: no CUE sheet; serving it as one ${mode.name} data track of ${sectors} sectors`];
  const spec: TrackSpec = {
    number: 1, session: 1, mode, swap: false, file: img, byteOffset: 0, fileSectors: sectors,
    index0: -1, index1: 0, subIndexes: [], pregap: 0, postgap: 0, line: 0,
  };
  return finish(path, "raw", [img], [spec], warnings);
}

/** Lay out the tracks and check their first and last sector headers (exported for remote discs). */
export function finish(path: string, format: string, files: DiscFile[], specs: TrackSpec[], warnings: string[]): CdDisc {
  let laid;
  try {
    laid = layoutDisc(specs);
  } catch (e) {
    throw new Error(`${path}: ${(e as Error).message}`);
  }
  const disc = new CdDisc(path, format, files, laid.tracks, laid.segments, laid.leadout, warnings);
  for (const t of disc.tracks) {
    for (const p of checkTrackHeaders(disc, t)) warnings.push(`${path}: ${p}`);
  }
  return disc;
}

export interface HeaderCheck { lba: number; ok: boolean; problem?: string }

/** Checks the first and last raw sector of a data track (sync, MSF = LBA + 150, mode byte); returns problems. */
export function checkTrackHeaders(disc: CdDisc, t: Track): string[] {
  if (!t.mode.hasHeader || t.length <= 0) return [];
  const out: string[] = [];
  for (const lba of t.length > 1 ? [t.index1Lba, t.index1Lba + t.length - 1] : [t.index1Lba]) {
    const p = headerProblem(disc, t, lba);
    if (p) out.push(`track ${t.number} sector at LBA ${lba}: ${p}`);
  }
  return out;
}

/** The header problem of one raw sector of track `t`, or null. */
export function headerProblem(disc: CdDisc, t: Track, lba: number): string | null {
  const s = new Uint8Array(16);
  disc.readFile(t.file, s, 0, 16, t.byteOffset + (lba - t.fileLba) * RAW_SECTOR);
  if (!hasSync(s, 0)) return "no sync pattern";
  const at = headerLba(s, 0);
  if (at !== lba) return `header address ${at < 0 ? "is not valid BCD" : `says LBA ${at}`}, expected LBA ${lba}`;
  if (s[15] !== t.mode.dataMode) return `mode byte ${s[15]}, expected ${t.mode.dataMode} for ${t.mode.name}`;
  return null;
}

const two = (n: number) => String(n).padStart(2, "0");

function range(first: number, count: number): string {
  return count > 0 ? `LBA ${first}-${first + count - 1} (${count} sectors)` : `LBA ${first} (empty)`;
}

/** The exports of a CD image (see the file comment). Every device is read-only. */
export async function openCdImage(path: string, opts: { name?: string; log: (msg: string) => void; format?: "cue" | "ccd" | "raw" }): Promise<ExportSpec[]> {
  return discExports(loadDisc(path, opts.format), basename(path), opts.name ?? basename(path, extname(path)), opts.log);
}

/** The exports of a loaded disc (closed on failure); `file` names the descriptor in descriptions. */
export function discExports(disc: CdDisc, file: string, base: string, log: (msg: string) => void): ExportSpec[] {
  for (const w of disc.warnings) log(w);
  const out: ExportSpec[] = [];
  try {
    const cooked = disc.tracks.filter((t) => t.mode.cookedOffset >= 0 && t.length > 0);
    const first = cooked[0];
    if (first) {
      const note = first.mode.submodeOffset >= 0 ? ", XA Form 2 sectors read as EIO" : "";
      out.push({
        name: base,
        description: `${file} track ${two(first.number)} ${first.mode.name}, cooked 2048-byte sectors, ${range(first.index1Lba, first.length + first.postgap)}${note}`,
        device: new CookedTrackView(disc, first),
      });
    } else {
      log(`${disc.source}: no data track with a 2048-byte view; only raw exports`);
    }
    for (const t of cooked) {
      out.push({
        name: `${base}/t${two(t.number)}`,
        description: `${file} track ${two(t.number)} ${t.mode.name} (session ${t.session}), cooked 2048-byte sectors, ${range(t.index1Lba, t.length + t.postgap)}`,
        device: new CookedTrackView(disc, t),
      });
    }
    for (const t of disc.tracks) {
      const what = t.mode.audio ? `${t.mode.name}, 16-bit LE PCM` : t.mode.name;
      out.push({
        name: `${base}/t${two(t.number)}.raw`,
        description: `${file} track ${two(t.number)} ${what} (session ${t.session}), raw 2352-byte sectors, ${range(t.index1Lba, t.length + t.postgap)}`,
        device: new RawView(disc, t.index1Lba, t.length + t.postgap),
      });
    }
    out.push({
      name: `${base}/raw`,
      description: `${file} whole disc, raw 2352-byte sectors, LBA 0-${disc.leadout - 1}, lead-out ${disc.leadout}, ${disc.tracks.length} track(s), ${disc.sessions} session(s)`,
      device: new RawView(disc, 0, disc.leadout),
    });
  } catch (e) {
    disc.close();
    throw e;
  }
  return out;
}
