// The backing layer under an overlay: a raw file, read with zeros past its end, and its allocation
// (SEEK_DATA/SEEK_HOLE) for base:allocation. Never written, so one handle can serve many overlays.
import { closeSync } from "node:fs";
import { seekData, seekHole } from "../../sys/libc.ts";
import { EXTENT_HOLE, EXTENT_ZERO } from "../types.ts";
import { readFull } from "./format.ts";

export interface BaseImage {
  readonly size: number;
  /** Read [pos, pos+len) into buf[off..]; bytes past the base's end read as zeros. */
  read(buf: Uint8Array, off: number, len: number, pos: number): void;
  /** Report [start, start+len) as runs of data (type 0) and holes (hole+zero), in order. */
  extents(start: number, len: number, add: (s: number, l: number, t: number) => void): void;
  /** Called by the overlay's close(); a handle shared by several overlays would count them. */
  close(): void;
}

export class RawBase implements BaseImage {
  constructor(readonly fd: number, readonly size: number) {}

  read(buf: Uint8Array, off: number, len: number, pos: number): void {
    const avail = Math.max(0, Math.min(len, this.size - pos));
    if (avail > 0) readFull(this.fd, buf, off, avail, pos);
    if (avail < len) buf.fill(0, off + avail, off + len);
  }

  extents(start: number, len: number, add: (s: number, l: number, t: number) => void): void {
    const end = start + len;
    let p = start;
    if (p < this.size) {
      const stop = Math.min(end, this.size);
      while (p < stop) {
        let d: number;
        try {
          d = seekData(this.fd, p);
        } catch {
          add(p, stop - p, 0);
          p = stop;
          break;
        }
        if (d === -1 || d >= stop) { add(p, stop - p, EXTENT_HOLE | EXTENT_ZERO); p = stop; break; }
        if (d > p) add(p, d - p, EXTENT_HOLE | EXTENT_ZERO);
        let h: number;
        try { h = seekHole(this.fd, d); } catch { h = stop; }
        if (h === -1 || h > stop) h = stop;
        add(d, h - d, 0);
        p = h;
      }
    }
    if (p < end) add(p, end - p, EXTENT_HOLE | EXTENT_ZERO);
  }

  close(): void {
    closeSync(this.fd);
  }
}
