// Image builders for the end-to-end tier: the hard-disk image booted by hdboot.bin, the El Torito
// ISO around cdboot.bin, and the patterned scratch disk the kernel guest reads and writes.
// Every builder also returns what the guest is expected to report, so tests never hard-code it.
import { closeSync, copyFileSync, ftruncateSync, mkdirSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from "node:fs";
import { join } from "node:path";
import { runOk } from "../helpers/env.ts";

export const E2E_DIR = new URL(".", import.meta.url).pathname.replace(/\/$/, "");
export const HDBOOT_BIN = join(E2E_DIR, "boot/hdboot.bin");
export const CDBOOT_BIN = join(E2E_DIR, "boot/cdboot.bin");
export const FDBOOT_BIN = join(E2E_DIR, "boot/fdboot.bin");

export const MiB = 1 << 20;
export const GiB = 1 << 30;

/** The boot programs' order-sensitive 32-bit hash: h = h * 31 + byte (mod 2^32). */
export function hash31(data: Uint8Array): string {
  let h = 0;
  for (let i = 0; i < data.length; i++) h = (Math.imul(h, 31) + data[i]!) >>> 0;
  return h.toString(16).toUpperCase().padStart(8, "0");
}

/** `len` bytes where each 8-byte big-endian word holds its own position plus `base` (nbdkit's pattern). */
export function offsetPattern(base: number, len: number): Uint8Array {
  const out = new Uint8Array(Math.ceil(len / 8) * 8);
  const dv = new DataView(out.buffer);
  for (let i = 0; i < len; i += 8) {
    const v = base + i;
    dv.setUint32(i, Math.floor(v / 2 ** 32));
    dv.setUint32(i + 4, v >>> 0);
  }
  return out.subarray(0, len);
}

const hex16 = (n: number) => n.toString(16).toUpperCase().padStart(16, "0");

function writeAt(fd: number, data: Uint8Array, pos: number): void {
  let done = 0;
  while (done < data.length) done += writeSync(fd, data, done, data.length - done, pos + done);
}

export const HD = {
  MID_LBA: 2048,
  SUM_LBA: 4096,
  SUM_BYTES: 64 * 512,
  MID_TEXT: "MID-MARKER-AT-1MiB",
  END_TEXT: "END-MARKER-IN-LAST-SECTOR",
  /** What the guest writes into LBA (sectors - 2). */
  WRITTEN_PREFIX: "GUEST-WROTE-THIS-SECTOR\0",
  WRITTEN_FILL: 0xa5,
};

export interface HdImage {
  path: string;
  size: number;
  sectors: number;
  /** The LBA the guest writes (the second-to-last). */
  writeLba: number;
  /** Serial lines the guest must print, in order. */
  expect: string[];
}

/** Expected serial lines and the written LBA for an hdboot disk of `size` bytes. */
export function hdExpectations(size: number): Omit<HdImage, "path"> {
  const sectors = size / 512;
  const region = offsetPattern(HD.SUM_LBA * 512, HD.SUM_BYTES);
  return {
    size, sectors, writeLba: sectors - 2,
    expect: [
      "STAGE1 OK drive=80",
      "STAGE2 OK (loaded from LBA 1 via AH=42h)",
      `SECTORS=${hex16(sectors)} BPS=0200`,
      `MID LBA=${hex16(HD.MID_LBA)}: ${HD.MID_TEXT}`,
      `END LBA=${hex16(sectors - 1)}: ${HD.END_TEXT}`,
      `HASH31 LBA=4096 COUNT=64: ${hash31(region)}`,
      `WROTE LBA=${hex16(sectors - 2)}`,
      "READBACK OK",
      "ALL-OK",
    ],
  };
}

/**
 * Write a sparse hard-disk image for hdboot.bin: the boot program at LBA 0-3, a text marker at
 * LBA 2048 and in the last sector, and 32 KiB of offset pattern at LBA 4096 (HASH31 28C8C800).
 */
export function makeHdImage(path: string, size: number): HdImage {
  if (size % 512 !== 0 || size < 4 * MiB) throw new Error(`hd image size ${size}: need a multiple of 512, >= 4 MiB`);
  const boot = readFileSync(HDBOOT_BIN);
  const sectors = size / 512;
  rmSync(path, { force: true });
  const fd = openSync(path, "w");
  try {
    ftruncateSync(fd, size);
    writeAt(fd, boot, 0);
    writeAt(fd, Buffer.from(HD.MID_TEXT + "\0"), HD.MID_LBA * 512);
    writeAt(fd, Buffer.from(HD.END_TEXT + "\0"), (sectors - 1) * 512);
    writeAt(fd, offsetPattern(HD.SUM_LBA * 512, HD.SUM_BYTES), HD.SUM_LBA * 512);
  } finally {
    closeSync(fd);
  }
  return { path, ...hdExpectations(size) };
}

/** The sector the guest wrote, as the host should find it afterwards. */
export function expectedWrittenSector(): Uint8Array {
  const s = new Uint8Array(512).fill(HD.WRITTEN_FILL);
  s.set(Buffer.from(HD.WRITTEN_PREFIX), 0);
  return s;
}

export const FD = {
  SIZE: 1474560,
  /** C40 H1 S1 and C79 H1 S18 (the last sector), as LBAs of an 80/2/18 floppy. */
  MID_LBA: (40 * 2 + 1) * 18,
  END_LBA: 2879,
  /** The track the guest hashes (C1 H0 S1-18) and the sector it writes (C79 H1 S17). */
  TRACK_LBA: 36,
  WRITE_LBA: 2878,
  MID_TEXT: "FLOPPY-MID-MARKER-C40-H1-S1",
  END_TEXT: "FLOPPY-END-MARKER-C79-H1-S18",
};

export interface FloppyImage { path: string; expect: string[]; writeLba: number }

/**
 * A 1.44M FAT12 floppy (mkfs.fat -R 4) around fdboot.bin: mkfs.fat's BPB kept, the boot program
 * around it and in reserved sectors 1-3, text markers at C40 H1 S1 and in the last sector, and an
 * offset pattern over the track C1 H0 (the first free clusters, so the file system stays valid).
 */
export async function makeFloppyImage(path: string, label = "BUNNBDBOOT"): Promise<FloppyImage> {
  rmSync(path, { force: true });
  await runOk(["mkfs.fat", "-F", "12", "-R", "4", "-n", label, "-C", path, String(FD.SIZE / 1024)], { timeoutMs: 30_000 });
  const boot = readFileSync(FDBOOT_BIN);
  const fd = openSync(path, "r+");
  try {
    writeAt(fd, boot.subarray(0, 3), 0);
    writeAt(fd, boot.subarray(0x3e, 512), 0x3e);
    writeAt(fd, boot.subarray(512, 2048), 512);
    writeAt(fd, Buffer.from(FD.MID_TEXT + "\0"), FD.MID_LBA * 512);
    writeAt(fd, Buffer.from(FD.END_TEXT + "\0"), FD.END_LBA * 512);
    writeAt(fd, offsetPattern(FD.TRACK_LBA * 512, 18 * 512), FD.TRACK_LBA * 512);
  } finally {
    closeSync(fd);
  }
  return {
    path, writeLba: FD.WRITE_LBA,
    expect: [
      "FDBOOT STAGE1 OK drive=00", "FDBOOT STAGE2 OK (C0 H0 S2 via AH=02h)", "GEOMETRY LASTC=4F LASTH=01 SPT=12 TYPE=04",
      `C40 H1 S1: ${FD.MID_TEXT}`, `C79 H1 S18: ${FD.END_TEXT}`, `HASH31 C1 H0 S1-18: ${hash31(offsetPattern(FD.TRACK_LBA * 512, 18 * 512))}`,
      "WROTE C79 H1 S17", "READBACK OK", "ALL-OK",
    ],
  };
}

export interface CdImage { path: string; expect: string[] }

/** Build the El Torito no-emulation ISO around cdboot.bin with xorriso. */
export async function makeCdIso(path: string, workDir: string): Promise<CdImage> {
  const d = join(workDir, "iso-root");
  rmSync(d, { recursive: true, force: true });
  mkdirSync(d, { recursive: true });
  copyFileSync(CDBOOT_BIN, join(d, "cdboot.bin"));
  writeFileSync(join(d, "MARKER.TXT"), "CD-MARKER-FILE-CONTENT\n");
  const data = offsetPattern(0, 32768);
  writeFileSync(join(d, "DATA.BIN"), data);
  rmSync(path, { force: true });
  await runOk(["xorriso", "-as", "mkisofs", "-quiet", "-o", path, "-V", "NBDTESTCD",
    "-b", "cdboot.bin", "-no-emul-boot", "-boot-load-size", "4", d], { timeoutMs: 60_000 });
  rmSync(d, { recursive: true, force: true });
  return {
    path,
    expect: [
      "CDBOOT OK drive=E0", "BPS=0800", "PVD CD001 VOLID=NBDTESTCD ",
      ": CD-MARKER-FILE-CONTENT", "HASH31 DATA.BIN 16 BLOCKS LBA=", `: ${hash31(data)}`, "ALL-OK",
    ],
  };
}

/**
 * A sparse scratch disk for the kernel guest: offset pattern in the first MiB, around the middle
 * and in the last MiB (any size; the last partial bytes are patterned too), so the guest's reads
 * at start/middle/end compare real data.
 */
export function makePatternedImage(path: string, size: number): void {
  rmSync(path, { force: true });
  const fd = openSync(path, "w");
  try {
    ftruncateSync(fd, size);
    const n = Math.min(MiB, size);
    writeAt(fd, offsetPattern(0, n), 0);
    const mid = Math.floor(size / 2 / MiB) * MiB;
    if (mid + MiB <= size) writeAt(fd, offsetPattern(mid, MiB), mid);
    const tail = Math.max(0, size - MiB);
    writeAt(fd, offsetPattern(tail, size - tail), tail);
  } finally {
    closeSync(fd);
  }
}
