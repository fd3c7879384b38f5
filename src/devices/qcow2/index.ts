// Opening copy-on-write overlays: persistent qcow2 files next to (or anywhere relative to) a raw
// base, or throw-away ones in an unlinked temporary file. Cold code.
import { closeSync, existsSync, fstatSync, openSync, statSync, unlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, dirname, isAbsolute, join, resolve } from "node:path";
import type { BlockDevice } from "../types.ts";
import { Qcow2Error, readHeader, validateHeader, writeNewImage } from "./format.ts";
import { Qcow2Overlay, type OverlayImageOptions } from "./image.ts";
import { RO_DENY, RO_PERMS, RW_DENY, RW_PERMS, lockImage } from "./lock.ts";

export { Qcow2Overlay } from "./image.ts";
export { Qcow2Error } from "./format.ts";

export interface OpenOverlayOptions {
  base: string;
  overlay?: string;
  compat?: boolean;
  /** Serve the overlay read-only (no locks against readers, no repair). */
  readOnly?: boolean;
  log: (msg: string) => void;
}

/**
 * Open (or create, if it does not exist) the qcow2 overlay at `overlay` over the raw `base`
 * (opened read-only, never written; its size is checked against the overlay). With `overlay`
 * undefined, make a throw-away overlay in a temporary file that is unlinked as soon as it is
 * open, so nothing is left behind whatever way the process ends. `compat: true` creates
 * standard-L2 overlays instead of extended L2. Takes QEMU-compatible OFD locks on the overlay (and
 * a shared lock on the base that keeps writers away). Refuses unsupported features with an Error
 * naming the feature.
 */
export async function openOverlay(opts: OpenOverlayOptions): Promise<BlockDevice> {
  const base = openBase(opts.base);
  try {
    if (opts.overlay === undefined) return openThrowAway(base, opts);
    const path = opts.overlay;
    if (!existsSync(path)) {
      if (opts.readOnly) throw new Error(`overlay ${path} does not exist (cannot create it read-only)`);
      createOverlayFile(path, opts.base, { compat: opts.compat, size: base.size });
      opts.log(`created overlay ${path} over ${opts.base} (${opts.compat ? "standard" : "extended"} L2 entries)`);
    }
    return openImage(path, { readOnly: !!opts.readOnly, base, log: opts.log, lock: true });
  } catch (e) {
    closeSync(base.fd);
    throw e;
  }
}

export interface OpenBase { path: string; fd: number; size: number; dev: number; ino: number }

/** Open a raw base read-only and take QEMU's shared read lock on it (denying writers). */
export function openBase(path: string, lock = true): OpenBase {
  let fd: number;
  try {
    fd = openSync(path, "r");
  } catch (e) {
    throw new Error(`cannot open base image ${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) throw new Error(`base image ${path} is not a regular file`);
    if (st.size === 0) throw new Error(`base image ${path} is empty`);
    if (lock) lockImage(fd, path, RO_PERMS, RO_DENY);
    return { path, fd, size: st.size, dev: st.dev, ino: st.ino };
  } catch (e) {
    closeSync(fd);
    throw e;
  }
}

/**
 * The backing name to store for `base`: relative to the overlay when they sit in the same
 * directory (so the pair can be moved together), absolute otherwise.
 */
export function backingNameFor(overlayPath: string, basePath: string): string {
  const ov = resolve(overlayPath);
  const b = resolve(basePath);
  return dirname(ov) === dirname(b) ? basename(b) : b;
}

/** Create a new overlay file at `path` for `basePath` (which must exist). */
export function createOverlayFile(path: string, basePath: string, o: { compat?: boolean; size?: number; clusterBits?: number }): void {
  const size = o.size ?? statSync(basePath).size;
  if (size === 0) throw new Error(`base image ${basePath} is empty`);
  const fd = openSync(path, "wx", 0o644);
  try {
    writeNewImage(fd, path, { size, backingName: backingNameFor(path, basePath), compat: o.compat, clusterBits: o.clusterBits });
  } catch (e) {
    closeSync(fd);
    unlinkSync(path);
    throw e;
  }
  closeSync(fd);
}

/** Where a header's backing name points, resolved like QEMU: relative to the overlay's directory. */
export function resolveBacking(overlayPath: string, backingName: string): string {
  return isAbsolute(backingName) ? backingName : join(dirname(resolve(overlayPath)), backingName);
}

/**
 * Open an existing overlay. `base` is opened from the header's backing name when not given; when
 * given it must be the same file. With `lock`, QEMU-compatible locks are taken (read-write: the
 * same bytes as a qemu-io rw open; read-only: a consistent view that keeps writers out).
 */
export function openImage(path: string, o: {
  readOnly: boolean; base?: OpenBase; log: (msg: string) => void; lock: boolean; repair?: boolean;
  /** Wraps the overlay file's I/O (tests: recording writes and syncs, injecting failures). */
  wrapFile?: OverlayImageOptions["wrapFile"];
}): Qcow2Overlay {
  let fd: number;
  try {
    fd = openSync(path, o.readOnly ? "r" : "r+");
  } catch (e) {
    throw new Error(`cannot open overlay ${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
  let base = o.base;
  const ownBase = base === undefined;
  try {
    const h = readHeader(fd, path);
    validateHeader(h, path, !o.readOnly);
    const backing = resolveBacking(path, h.backingName!);
    if (base === undefined) {
      base = openBase(backing, o.lock);
    } else {
      let st;
      try {
        st = statSync(backing);
      } catch {
        throw new Qcow2Error(path, `its backing file ${h.backingName} (${backing}) does not exist, but ${base.path} was given as the base`);
      }
      if (st.dev !== base.dev || st.ino !== base.ino) {
        throw new Qcow2Error(path, `its backing file is ${backing}, not ${base.path}`);
      }
    }
    return finishOpen(path, fd, h, base, o.readOnly, o.lock, o.log, o.repair ?? true, o.wrapFile);
  } catch (e) {
    closeSync(fd);
    if (ownBase && base !== undefined) closeSync(base.fd);
    throw e;
  }
}

function finishOpen(path: string, fd: number, h: ReturnType<typeof readHeader>, base: OpenBase, readOnly: boolean,
  lock: boolean, log: (msg: string) => void, repair: boolean, wrapFile?: OverlayImageOptions["wrapFile"]): Qcow2Overlay {
  const expect = Math.ceil(base.size / 512) * 512;
  if (h.size !== expect) {
    throw new Qcow2Error(path, `virtual size ${h.size} does not match base ${base.path} (${base.size} bytes): the base changed size, or is not the base this overlay was made for`);
  }
  if (lock) lockImage(fd, path, readOnly ? RO_PERMS : RW_PERMS, readOnly ? RO_DENY : RW_DENY);
  const img = new Qcow2Overlay({ path, fd, header: h, readOnly, baseFd: base.fd, baseSize: base.size, log, wrapFile });
  if (!readOnly) {
    img.clearAutoclear();
    img.checkRefcountCoverage();
  }
  const r = img.scan(!readOnly && repair);
  if (r.errors.length > 0 && !readOnly) {
    throw new Qcow2Error(path, `refcounts are inconsistent (${r.errors.slice(0, 3).join("; ")}${r.errors.length > 3 ? "; ..." : ""}): repair with qemu-img check -r all`, "corrupt refcounts");
  }
  if (r.repaired > 0) log(`overlay ${path}: repaired ${r.repaired} leaked cluster(s) (left by a crash)`);
  return img;
}

function openThrowAway(base: OpenBase, opts: OpenOverlayOptions): Qcow2Overlay {
  const dir = process.env.TMPDIR || tmpdir();
  const path = join(dir, `bun-nbd-snapshot-${process.pid}-${Math.random().toString(36).slice(2, 10)}.qcow2`);
  const fd = openSync(path, "wx+", 0o600);
  // Unlinked at once: the kernel reclaims the space when the process ends, however it ends.
  unlinkSync(path);
  try {
    writeNewImage(fd, path, { size: base.size, backingName: resolve(base.path), compat: opts.compat });
    const h = readHeader(fd, path);
    validateHeader(h, path, true);
    const img = finishOpen(`${path} (deleted)`, fd, h, base, false, false, opts.log, false);
    opts.log(`throw-away overlay over ${base.path} in ${dir} (unlinked, discarded at exit)`);
    return img;
  } catch (e) {
    closeSync(fd);
    throw e;
  }
}
