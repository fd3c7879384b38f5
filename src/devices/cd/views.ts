// Block devices over a CdDisc: the cooked 2048-byte view of a data track (what QEMU boots), and
// raw 2352-byte views of a track or of the whole disc. All read-only. The cooked read path is a
// hot path: one file read per run of sectors into the disc's reusable scratch buffer, then one
// copy of the 2048 user bytes out of each sector; no allocation per request.
import { eio } from "../../protocol/errors.ts";
import { whenLocal } from "../staged.ts";
import { caps, type BlockDevice, type BlockSize, type Capabilities, type DeviceRecipe, type Maybe } from "../types.ts";
import type { CdDisc, DiscFile, Track } from "./disc.ts";
import { COOKED_SECTOR, RAW_SECTOR, SUBMODE_FORM2 } from "./sector.ts";

const READ_ONLY: Capabilities = Object.freeze(caps({ canWrite: false, canFlush: false, canMultiConn: true }));
const MAX_REQUEST = 32 * 1024 * 1024;

/** The cooked (2048 bytes per sector) view of a data track, from INDEX 01 to its end (postgap as zeros). */
export class CookedTrackView implements BlockDevice {
  private readonly file: DiscFile;
  private readonly pos0: number;
  private readonly fileCount: number;
  private readonly total: number;
  private readonly ss: number;
  private readonly co: number;
  private readonly submode: number;
  private readonly firstLba: number;
  private released = false;

  constructor(readonly disc: CdDisc, readonly track: Track) {
    const m = track.mode;
    if (m.cookedOffset < 0) throw new Error(`${disc.source}: track ${track.number} (${m.name}) has no 2048-byte view`);
    this.file = track.file;
    this.ss = m.sectorSize;
    this.co = m.cookedOffset;
    this.submode = m.submodeOffset;
    this.firstLba = track.index1Lba;
    this.pos0 = track.byteOffset + track.index1 * m.sectorSize;
    this.fileCount = track.length;
    this.total = track.length + track.postgap;
    disc.acquire();
  }

  /** Sectors in the view. */
  get sectors(): number { return this.total; }
  size(): number { return this.total * COOKED_SECTOR; }
  blockSize(): BlockSize { return { minimum: 1, preferred: COOKED_SECTOR, maximum: MAX_REQUEST }; }
  capabilities(): Capabilities { return READ_ONLY; }

  pread(buf: Uint8Array, offset: number, _flags: number): Maybe {
    // Files behind a cache (remote images) may need fetching first: the read then runs again.
    return this.disc.staged ? whenLocal(() => this.readNow(buf, offset)) : this.readNow(buf, offset);
  }

  private readNow(buf: Uint8Array, offset: number): void {
    const len = buf.length;
    let done = 0;
    let sector = Math.floor(offset / COOKED_SECTOR);
    let within = offset - sector * COOKED_SECTOR;
    while (done < len) {
      if (sector >= this.fileCount) {
        buf.fill(0, done, len); // postgap: empty sectors
        return;
      }
      const want = Math.ceil((within + len - done) / COOKED_SECTOR);
      const n = Math.min(want, this.fileCount - sector);
      const ss = this.ss;
      if (ss === COOKED_SECTOR) {
        const bytes = Math.min(len - done, n * COOKED_SECTOR - within);
        this.disc.readFile(this.file, buf, done, bytes, this.pos0 + sector * COOKED_SECTOR + within);
        done += bytes;
      } else if (n === 1 && this.submode < 0) {
        // Within one sector and no Form 2 check: read the user bytes straight into buf.
        const take = Math.min(COOKED_SECTOR - within, len - done);
        this.disc.readFile(this.file, buf, done, take, this.pos0 + sector * ss + this.co + within);
        done += take;
      } else {
        const src = this.disc.scratch(n * ss);
        this.disc.readFile(this.file, src, 0, n * ss, this.pos0 + sector * ss);
        const sm = this.submode;
        const co = this.co;
        for (let i = 0, so = 0; i < n; i++, so += ss) {
          if (sm >= 0 && (src[so + sm]! & SUBMODE_FORM2) !== 0) throw this.form2(sector + i);
          const take = Math.min(COOKED_SECTOR - within, len - done);
          src.copy(buf, done, so + co + within, so + co + within + take);
          done += take;
          within = 0;
        }
      }
      within = 0;
      sector += n;
    }
  }

  /** The track over its BIN as plain data (devices/recipe.ts); none for files behind a cache. */
  recipe(): DeviceRecipe | null {
    const f = this.file;
    if (this.disc.staged || f.fd < 0) return null;
    const { file: _file, ...track } = this.track;
    return { kind: "cooked", source: this.disc.source, file: { path: f.path, label: f.label, size: f.size, fd: f.fd }, track };
  }

  private form2(sector: number): Error {
    return eio(`${this.disc.source}: track ${this.track.number} sector at LBA ${this.firstLba + sector} is XA Form 2 (no 2048-byte user data)`);
  }

  close(): void {
    if (this.released) return;
    this.released = true;
    this.disc.release();
  }
}

/** Raw 2352-byte sectors of the disc from `firstLba` for `count` sectors (a track, or the whole disc). */
export class RawView implements BlockDevice {
  private released = false;

  constructor(readonly disc: CdDisc, readonly firstLba: number, readonly count: number) {
    disc.acquire();
  }

  size(): number { return this.count * RAW_SECTOR; }
  blockSize(): BlockSize { return { minimum: 1, preferred: 4096, maximum: MAX_REQUEST }; }
  capabilities(): Capabilities { return READ_ONLY; }

  pread(buf: Uint8Array, offset: number, _flags: number): Maybe {
    return this.disc.staged ? whenLocal(() => this.readNow(buf, offset)) : this.readNow(buf, offset);
  }

  private readNow(buf: Uint8Array, offset: number): void {
    const len = buf.length;
    const first = Math.floor(offset / RAW_SECTOR);
    const within = offset - first * RAW_SECTOR;
    const n = Math.ceil((within + len) / RAW_SECTOR);
    if (within === 0 && len === n * RAW_SECTOR) {
      this.disc.readRaw(buf, 0, this.firstLba + first, n);
      return;
    }
    const tmp = this.disc.viewScratch(n * RAW_SECTOR);
    this.disc.readRaw(tmp, 0, this.firstLba + first, n);
    tmp.copy(buf, 0, within, within + len);
  }

  close(): void {
    if (this.released) return;
    this.released = true;
    this.disc.release();
  }
}
