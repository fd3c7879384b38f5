// The base under an overlay and the shared, reference-counted handle on it: a raw file read
// synchronously through its fd (the fast path; the only base QEMU can follow), or any device stack
// read through its pread, synchronous or not. Never written, so one handle serves many overlays.
import { closeSync, fstatSync } from "node:fs";
import { seekData, seekHole } from "../../sys/libc.ts";
import { eio } from "../../protocol/errors.ts";
import { EXTENT_HOLE, EXTENT_ZERO, isPromise, type BlockDevice, type Maybe } from "../types.ts";
import { readFull } from "./format.ts";
import type { BaseIdentity } from "./identity.ts";

export type AddExtent = (s: number, l: number, t: number) => void;

export interface BaseImage {
  readonly size: number;
  /**
   * Read [pos, pos+len) into buf[off..]; bytes past the base's end read as zeros. Returns undefined
   * when done, or a Promise while the bytes are still arriving (buf is written until it settles).
   */
  read(buf: Uint8Array, off: number, len: number, pos: number): Maybe;
  /** Report [start, start+len) as runs of data (type 0) and holes (hole+zero), in order. */
  extents(start: number, len: number, add: AddExtent): Maybe;
  close(): Maybe;
}

export class RawBase implements BaseImage {
  constructor(readonly fd: number, readonly size: number) {}

  read(buf: Uint8Array, off: number, len: number, pos: number): undefined {
    const avail = Math.max(0, Math.min(len, this.size - pos));
    if (avail > 0) readFull(this.fd, buf, off, avail, pos);
    if (avail < len) buf.fill(0, off + avail, off + len);
    return undefined;
  }

  extents(start: number, len: number, add: AddExtent): undefined {
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
    return undefined;
  }

  close(): void {
    closeSync(this.fd);
  }
}

/** Any device stack as a base. Requests are split at its maximum size and widened to its minimum. */
export class DeviceBase implements BaseImage {
  readonly size: number;
  private readonly min: number;
  private readonly max: number;

  constructor(readonly device: BlockDevice) {
    this.size = device.size();
    const bs = device.blockSize?.();
    this.min = bs?.minimum ?? 1;
    this.max = Math.max(this.min, Math.floor((bs?.maximum ?? 32 * 1024 * 1024) / this.min) * this.min);
  }

  read(buf: Uint8Array, off: number, len: number, pos: number): Maybe {
    const avail = Math.max(0, Math.min(len, this.size - pos));
    if (avail < len) buf.fill(0, off + avail, off + len);
    if (avail === 0) return;
    if (this.min === 1 && avail <= this.max) return this.device.pread(buf.subarray(off, off + avail), pos, 0);
    let pending: Promise<unknown>[] | null = null;
    for (let done = 0; done < avail;) {
      const p = pos + done;
      const n = Math.min(avail - done, this.max - (p % this.min));
      const r = p % this.min === 0 && n % this.min === 0
        ? this.device.pread(buf.subarray(off + done, off + done + n), p, 0)
        : this.unaligned(buf, off + done, n, p);
      if (isPromise(r)) (pending ??= []).push(r);
      done += n;
    }
    return pending === null ? undefined : settleAll(pending);
  }

  /** Read an unaligned piece through a bounce buffer covering whole blocks. */
  private unaligned(buf: Uint8Array, off: number, n: number, pos: number): Maybe {
    const a = pos - (pos % this.min);
    const e = Math.min(Math.ceil((pos + n) / this.min) * this.min, Math.ceil(this.size / this.min) * this.min);
    const tmp = new Uint8Array(e - a);
    const copy = () => { buf.set(tmp.subarray(pos - a, pos - a + n), off); };
    const r = this.device.pread(tmp, a, 0);
    if (isPromise(r)) return r.then(copy);
    copy();
  }

  extents(start: number, len: number, add: AddExtent): Maybe {
    const stop = Math.min(start + len, this.size);
    const tail = () => { if (start + len > stop) add(stop, start + len - stop, EXTENT_HOLE | EXTENT_ZERO); };
    if (stop <= start) { tail(); return; }
    if (this.device.extents === undefined) { add(start, stop - start, 0); tail(); return; }
    // The device may report from before `start` and past `stop`: clip; what it leaves out is data.
    let p = start;
    const r = this.device.extents(start, stop - start, 0, {
      add: (o, l, t) => {
        const s = Math.max(o, p);
        const e = Math.min(o + l, stop);
        if (e > s) { if (s > p) add(p, s - p, 0); add(s, e - s, t & (EXTENT_HOLE | EXTENT_ZERO)); p = e; }
        return p < stop;
      },
    });
    const finish = () => { if (p < stop) add(p, stop - p, 0); tail(); };
    if (isPromise(r)) return r.then(finish);
    finish();
  }

  close(): Maybe {
    return this.device.close?.();
  }
}

/** For inspecting an overlay without its base (info, diff, check, reset): reads of the base fail. */
export class DetachedBase implements BaseImage {
  constructor(readonly size: number, private readonly what: string) {}
  read(): Maybe { throw eio(`${this.what} is not open`); }
  extents(start: number, len: number, add: AddExtent): Maybe { add(start, len, 0); }
  close(): void {}
}

/**
 * A base as overlays hold it: the image, what it is, and a reference count. Whoever makes one
 * holds the first reference; every overlay opened over it takes one more (openImage) and gives it
 * back at close; the image closes with the last reference.
 */
export class OverlayBase {
  /** For a raw file: the path QEMU follows (the backing name), and the file's identity. */
  readonly path: string;
  readonly fd: number;
  readonly dev: number;
  readonly ino: number;
  private refs = 1;

  private constructor(readonly image: BaseImage, readonly identity: BaseIdentity | null, raw: { path: string; fd: number; dev: number; ino: number } | null) {
    this.path = raw?.path ?? identity!.location;
    this.fd = raw?.fd ?? -1;
    this.dev = raw?.dev ?? -1;
    this.ino = raw?.ino ?? -1;
  }

  /** A raw file base on an open fd (which the base closes with its last reference). */
  static rawFile(path: string, fd: number): OverlayBase {
    const st = fstatSync(fd);
    return new OverlayBase(new RawBase(fd, st.size), null, { path, fd, dev: st.dev, ino: st.ino });
  }

  /** A device stack base with its identity (closed with the last reference when `owned`). */
  static device(device: BlockDevice, identity: BaseIdentity, owned = true): OverlayBase {
    const img = new DeviceBase(device);
    if (identity.size !== img.size) throw new Error(`base identity says ${identity.size} bytes, the device has ${img.size}`);
    if (!owned) img.close = () => {};
    return new OverlayBase(img, identity, null);
  }

  /** An overlay's base that is not opened (see DetachedBase). */
  static detached(identity: BaseIdentity): OverlayBase {
    return new OverlayBase(new DetachedBase(identity.size, `the base ${identity.location} (${identity.stack})`), identity, null);
  }

  get size(): number { return this.image.size; }
  /** A plain raw file: QEMU can read it through the backing name, and commit can write it. */
  get isRawFile(): boolean { return this.identity === null; }
  get references(): number { return this.refs; }

  acquire(): this {
    if (this.refs <= 0) throw new Error(`base ${this.path} is already closed`);
    this.refs++;
    return this;
  }

  /** Give a reference back; the last one closes the image. */
  release(): Maybe {
    if (this.refs <= 0) return;
    if (--this.refs === 0) return this.image.close();
  }
}

/**
 * Wait for every promise, then throw the first failure: nothing is left writing into buffers, and
 * every promise has a handler at once (a later one failing first is not an unhandled rejection).
 */
export function settleAll(ps: Promise<unknown>[]): Promise<void> {
  return Promise.allSettled(ps).then((rs) => {
    for (const r of rs) if (r.status === "rejected") throw r.reason;
  });
}
