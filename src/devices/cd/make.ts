// `cd make`: wraps a 2048-byte-sector image (an ISO) into raw 2352-byte sectors with sync,
// header, EDC and ECC (Mode 1, or Mode 2 XA Form 1 with subheaders) and writes a one-track CUE
// sheet beside the BIN. Streams in chunks, so large images need little memory.
import { closeSync, existsSync, fstatSync, openSync, readSync, writeFileSync, writeSync } from "node:fs";
import { basename, dirname, extname, join, resolve } from "node:path";
import {
  COOKED_SECTOR, encodeMode1, encodeMode2Form1, RAW_SECTOR, SUBMODE_DATA, SUBMODE_EOF, SUBMODE_EOR,
} from "./sector.ts";

export type MakeMode = "MODE1" | "MODE2";

const CHUNK = 512;

/** Wraps one cooked sector (2048 bytes at `src[so..]`) into a raw sector at `dst[o..]`. */
export function wrapSector(src: Uint8Array, so: number, dst: Uint8Array, o: number, lba: number, mode: MakeMode, last: boolean): void {
  if (mode === "MODE1") {
    dst.set(src.subarray(so, so + COOKED_SECTOR), o + 16);
    encodeMode1(dst, o, lba);
  } else {
    dst.set(src.subarray(so, so + COOKED_SECTOR), o + 24);
    encodeMode2Form1(dst, o, lba, last ? SUBMODE_DATA | SUBMODE_EOF | SUBMODE_EOR : SUBMODE_DATA);
  }
}

/**
 * Writes `<cue stem>.bin` next to `cuePath` and the sheet itself. Returns the BIN path and the
 * sector count. Throws a clear Error for an input that is not a whole number of 2048-byte sectors,
 * and (without `force`) when the BIN or the sheet already exists.
 */
export function makeBinCue(isoPath: string, cuePath: string, mode: MakeMode, opts: { force?: boolean } = {}): { bin: string; sectors: number } {
  if (extname(cuePath).toLowerCase() !== ".cue") throw new Error(`${cuePath}: the sheet's name must end in .cue`);
  const binName = `${basename(cuePath, extname(cuePath))}.bin`;
  const binPath = join(dirname(cuePath), binName);
  if (resolve(binPath) === resolve(isoPath)) throw new Error(`${isoPath}: would be overwritten by the BIN ${binPath}`);
  if (!opts.force) {
    const there = [cuePath, binPath].filter((p) => existsSync(p));
    if (there.length) throw new Error(`${there.join(" and ")} already exist${there.length === 1 ? "s" : ""}: not overwriting (use --force to replace)`);
  }
  const fd = openSync(isoPath, "r");
  let out = -1;
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) throw new Error(`${isoPath}: not a regular file`);
    if (st.size === 0 || st.size % COOKED_SECTOR !== 0) {
      throw new Error(`${isoPath}: size ${st.size} is not a whole number of 2048-byte sectors`);
    }
    const sectors = st.size / COOKED_SECTOR;
    out = openSync(binPath, "w");
    const src = new Uint8Array(CHUNK * COOKED_SECTOR);
    const dst = new Uint8Array(CHUNK * RAW_SECTOR);
    for (let lba = 0; lba < sectors; lba += CHUNK) {
      const n = Math.min(CHUNK, sectors - lba);
      let got = 0;
      while (got < n * COOKED_SECTOR) {
        const r = readSync(fd, src, got, n * COOKED_SECTOR - got, lba * COOKED_SECTOR + got);
        if (r <= 0) throw new Error(`${isoPath}: short read at byte ${lba * COOKED_SECTOR + got}`);
        got += r;
      }
      dst.fill(0, 0, n * RAW_SECTOR);
      for (let i = 0; i < n; i++) wrapSector(src, i * COOKED_SECTOR, dst, i * RAW_SECTOR, lba + i, mode, lba + i === sectors - 1);
      let put = 0;
      while (put < n * RAW_SECTOR) put += writeSync(out, dst, put, n * RAW_SECTOR - put);
    }
    closeSync(out);
    out = -1;
    writeFileSync(cuePath, `FILE "${binName}" BINARY\n  TRACK 01 ${mode}/2352\n    INDEX 01 00:00:00\n`);
    return { bin: binPath, sectors };
  } finally {
    closeSync(fd);
    if (out >= 0) closeSync(out);
  }
}
