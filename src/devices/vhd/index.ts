// Opening a VHD: the footer (at the end; checksum checked) says fixed, dynamic or differencing.
// Fixed: the raw part before the footer, served read-write by the raw file plugin (sendfile
// included). Dynamic: header, BAT (every entry checked against the file size) and the read-only
// DynamicVhd plugin. Differencing disks are refused. Cold code.
import { closeSync, fstatSync, openSync } from "node:fs";
import { readAt } from "../readat.ts";
import { basename } from "node:path";
import { RawFile } from "../file.ts";
import type { BlockDevice } from "../types.ts";
import { DynamicVhd } from "./dynamic.ts";
import { DISK_DIFFERENCING, DISK_FIXED, FOOTER_SIZE, type Footer, parseDynamicHeader, parseFooter, VhdError } from "./format.ts";

export { VhdError } from "./format.ts";

/** Refuse BATs with more entries than this (a 2 TiB disk of 2 MiB blocks has 2^20). */
const MAX_ENTRIES = 1 << 26;


export interface OpenedVhd { device: BlockDevice; description: string; footer: Footer; fixed: boolean }

const mib = (n: number) => `${(n / 1048576).toFixed(n % 1048576 ? 2 : 0)} MiB`;

export function openVhd(path: string, opts: { readOnly?: boolean; log: (msg: string) => void }): OpenedVhd {
  let fd: number;
  try {
    fd = openSync(path, "r");
  } catch (e) {
    throw new Error(`cannot open ${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
  let owned = true;
  try {
    const fileSize = fstatSync(fd).size;
    if (fileSize < FOOTER_SIZE) throw new VhdError(`${path}: ${fileSize} bytes is too short for a VHD`);
    const footer = parseFooter(readAt(fd, FOOTER_SIZE, fileSize - FOOTER_SIZE), `${path}`);
    const made = `${footer.creatorApp || "unknown"}${footer.creatorHost ? `, ${footer.creatorHost}` : ""}`;
    if (footer.diskType === DISK_FIXED) {
      if (footer.currentSize > fileSize - FOOTER_SIZE) {
        throw new VhdError(`${path}: the footer says ${footer.currentSize} bytes, but only ${fileSize - FOOTER_SIZE} precede it (truncated?)`);
      }
      if (footer.currentSize < fileSize - FOOTER_SIZE) opts.log(`${path}: ${fileSize - FOOTER_SIZE - footer.currentSize} bytes between the disk and the footer are ignored`);
      closeSync(fd);
      owned = false;
      const device = RawFile.open(path, { readOnly: opts.readOnly, size: footer.currentSize });
      return { device, footer, fixed: true, description: `${basename(path)}: fixed VHD, ${mib(footer.currentSize)} (made by ${made})` };
    }
    if (footer.diskType === DISK_DIFFERENCING) {
      const h = parseDynamicHeader(readAt(fd, 1024, footer.dataOffset), path);
      throw new VhdError(`${path} is a differencing VHD (child of "${h.parentName}"): not supported; merge it into a standalone image first (qemu-img convert -O vpc)`);
    }
    if (footer.dataOffset < 0 || footer.dataOffset + 1024 > fileSize) throw new VhdError(`${path}: the footer's header offset ${footer.dataOffset} is outside the file`);
    const h = parseDynamicHeader(readAt(fd, 1024, footer.dataOffset), path);
    const blocks = Math.ceil(footer.currentSize / h.blockSize);
    if (h.maxEntries < blocks) throw new VhdError(`${path}: the BAT has ${h.maxEntries} entries, a disk of ${footer.currentSize} bytes needs ${blocks}`);
    if (blocks > MAX_ENTRIES) throw new VhdError(`${path}: ${blocks} BAT entries is more than the limit ${MAX_ENTRIES}`);
    if (h.tableOffset + blocks * 4 > fileSize) throw new VhdError(`${path}: the BAT at byte ${h.tableOffset} runs past the end of the file`);
    const raw = readAt(fd, blocks * 4, h.tableOffset);
    const bat = new Uint32Array(blocks);
    const bitmapBytes = Math.ceil(h.blockSize / 512 / 8 / 512) * 512;
    const dataEnd = fileSize - FOOTER_SIZE;
    for (let i = 0; i < blocks; i++) {
      const e = ((raw[i * 4]! << 24) | (raw[i * 4 + 1]! << 16) | (raw[i * 4 + 2]! << 8) | raw[i * 4 + 3]!) >>> 0;
      bat[i] = e;
      if (e === 0xffffffff) continue;
      const at = e * 512;
      if (at + bitmapBytes + h.blockSize > dataEnd) {
        throw new VhdError(`${path}: BAT entry ${i} points past the end of the file (block at byte ${at}, ${bitmapBytes + h.blockSize} bytes long; the data ends at ${dataEnd})`);
      }
      if (at < footer.dataOffset + 1024) throw new VhdError(`${path}: BAT entry ${i} points into the headers (byte ${at})`);
    }
    owned = false;
    const device = new DynamicVhd(basename(path), fd, { size: footer.currentSize, blockSize: h.blockSize, bat, bitmapBytes });
    const used = bat.reduce((n, e) => n + (e === 0xffffffff ? 0 : 1), 0);
    return {
      device, footer, fixed: false,
      description: `${basename(path)}: dynamic VHD, ${mib(footer.currentSize)}, ${used} of ${blocks} blocks of ${mib(h.blockSize)} allocated (made by ${made})`,
    };
  } finally {
    if (owned) closeSync(fd);
  }
}
