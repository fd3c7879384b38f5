// Opening copy-on-write overlays (persistent qcow2 files, or throw-away ones unlinked at once) over a
// raw file named by path or a shared base handle (a raw file, or a device stack with its identity),
// and refusing a base other than the one an overlay was made over. Cold code.
import { closeSync, existsSync, fstatSync, openSync, statSync, unlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, dirname, isAbsolute, join, resolve } from "node:path";
import { isPromise, type BlockDevice, type Maybe } from "../types.ts";
import { OverlayBase } from "./base.ts";
import { BACKING_FORMAT_BUN, Qcow2Error, readHeader, validateHeader, writeNewImage, type Header } from "./format.ts";
import {
  decodeIdentity, describeIdentity, encodeIdentity, identityDiff, isUrl, sampleVersion, type BaseIdentity,
} from "./identity.ts";
import { Qcow2Overlay, type OverlayImageOptions } from "./image.ts";
import { RO_DENY, RO_PERMS, RW_DENY, RW_PERMS, lockImage } from "./lock.ts";

export { Qcow2Overlay } from "./image.ts";
export { Qcow2Error } from "./format.ts";
export { OverlayBase } from "./base.ts";
export { describeIdentity, type BaseIdentity } from "./identity.ts";

export interface OpenOverlayOptions {
  /**
   * The base: the path of a raw image (opened read-only here and closed with the overlay), or a
   * shared handle from openBase/deviceBase (the overlay takes a reference of its own; the caller
   * keeps and later releases its own).
   */
  base: string | OverlayBase;
  overlay?: string;
  compat?: boolean;
  /** Serve the overlay read-only (no locks against readers, no repair). */
  readOnly?: boolean;
  log: (msg: string) => void;
}

/**
 * Open (or create, if it does not exist) the qcow2 overlay at `overlay` over `base` (never written;
 * checked against what the overlay records: the backing file and size for a raw file, the identity
 * record for a device stack). With `overlay` undefined, make a throw-away overlay in a temporary
 * file that is unlinked as soon as it is open, so nothing is left behind whatever way the process
 * ends. `compat: true` creates standard-L2 overlays instead of extended L2. Takes QEMU-compatible
 * OFD locks on the overlay (and, for a raw file base opened here, a shared lock that keeps writers
 * away). Refuses unsupported features with an Error naming the feature.
 */
export async function openOverlay(opts: OpenOverlayOptions): Promise<Qcow2Overlay> {
  const own = typeof opts.base === "string";
  const base = typeof opts.base === "string" ? openBase(opts.base) : opts.base;
  try {
    if (opts.overlay === undefined) return openThrowAway(base, opts);
    const path = opts.overlay;
    if (!existsSync(path)) {
      if (opts.readOnly) throw new Error(`overlay ${path} does not exist (cannot create it read-only)`);
      createOverlayFile(path, base, { compat: opts.compat });
      opts.log(`created overlay ${path} over ${describeBase(base)} (${opts.compat ? "standard" : "extended"} L2 entries)`);
    }
    return openImage(path, { readOnly: !!opts.readOnly, base, log: opts.log, lock: true });
  } finally {
    if (own) await base.release();
  }
}

/** Open a raw base read-only and take QEMU's shared read lock on it (denying writers). */
export function openBase(path: string, lock = true): OverlayBase {
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
    return OverlayBase.rawFile(path, fd);
  } catch (e) {
    closeSync(fd);
    throw e;
  }
}

/**
 * A base over an open device stack. `identity.version` defaults to a hash of sampled content
 * (three 64 KiB reads, done once here: overlays opened over the handle later cost nothing more).
 * With `owned` (the default) the device is closed with the handle's last reference.
 */
export async function deviceBase(device: BlockDevice, identity: Omit<BaseIdentity, "version" | "size"> & { version?: string },
  o: { owned?: boolean } = {}): Promise<OverlayBase> {
  const size = device.size();
  if (size === 0) throw new Error(`base ${identity.location} (${identity.stack}) is empty`);
  const probe = OverlayBase.device(device, { ...identity, size, version: identity.version ?? "" }, false);
  const version = identity.version ?? await sampleVersion(probe.image);
  return OverlayBase.device(device, { ...identity, size, version }, o.owned ?? true);
}

function describeBase(base: OverlayBase): string {
  return base.identity === null ? base.path : `${base.identity.location} (${base.identity.stack})`;
}

/**
 * The backing name to store for `basePath`: relative to the overlay when they sit in the same
 * directory (so the pair can be moved together), absolute otherwise.
 */
export function backingNameFor(overlayPath: string, basePath: string): string {
  const ov = resolve(overlayPath);
  const b = resolve(basePath);
  return dirname(ov) === dirname(b) ? basename(b) : b;
}

/**
 * What the header says about `base`: a raw file's name with format raw (QEMU follows it), or for a
 * device stack the name of what the user named (the .cue, the .xz, the URL) with the format
 * "bun-nbd", which QEMU refuses to open rather than misread, and the identity record.
 */
function backingFor(overlayPath: string, base: OverlayBase): { backingName: string; backingFormat?: string; baseIdentity?: Uint8Array } {
  const id = base.identity;
  if (id === null) return { backingName: backingNameFor(overlayPath, base.path) };
  const name = isUrl(id.location) ? id.location : backingNameFor(overlayPath, id.location);
  return { backingName: name, backingFormat: BACKING_FORMAT_BUN, baseIdentity: encodeIdentity(id) };
}

/** Create a new overlay file at `path` over `base`: a raw file's path (which must exist) or a base handle. */
export function createOverlayFile(path: string, base: string | OverlayBase, o: { compat?: boolean; size?: number; clusterBits?: number }): void {
  const size = typeof base === "string" ? o.size ?? statSync(base).size : base.size;
  const what = typeof base === "string" ? base : describeBase(base);
  if (size === 0) throw new Error(`base image ${what} is empty`);
  const backing = typeof base === "string" ? { backingName: backingNameFor(path, base) } : backingFor(path, base);
  const fd = openSync(path, "wx", 0o644);
  try {
    writeNewImage(fd, path, { size, compat: o.compat, clusterBits: o.clusterBits, ...backing });
  } catch (e) {
    closeSync(fd);
    unlinkSync(path);
    throw e;
  }
  closeSync(fd);
}

/** Where a header's backing name points, resolved like QEMU: relative to the overlay's directory. */
export function resolveBacking(overlayPath: string, backingName: string): string {
  return isAbsolute(backingName) || isUrl(backingName) ? backingName : join(dirname(resolve(overlayPath)), backingName);
}

/** The identity record an overlay keeps for its base (overlays over a device stack), or null. */
export function storedIdentity(h: Header, path: string): BaseIdentity | null {
  return h.baseIdentity === null ? null : decodeIdentity(h.baseIdentity, path);
}

/**
 * Open an existing overlay. With `base` given, it must be the base the overlay was made over (the
 * same raw file, or a device stack with the same identity) and the overlay takes a reference on
 * it. Without, a raw base is opened from the header's backing name, and a device-stack base is
 * left detached (metadata only: info, diff, check, reset; reading the base fails). With `lock`,
 * QEMU-compatible locks are taken (read-write: the same bytes as a qemu-io rw open; read-only: a
 * consistent view that keeps writers out).
 */
export function openImage(path: string, o: {
  readOnly: boolean; base?: OverlayBase; log: (msg: string) => void; lock: boolean; repair?: boolean;
  /** Wraps the overlay file's I/O (tests: recording writes and syncs, injecting failures). */
  wrapFile?: OverlayImageOptions["wrapFile"];
}): Qcow2Overlay {
  let fd: number;
  try {
    fd = openSync(path, o.readOnly ? "r" : "r+");
  } catch (e) {
    throw new Error(`cannot open overlay ${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
  let base: OverlayBase | undefined;
  try {
    const h = readHeader(fd, path);
    validateHeader(h, path, !o.readOnly);
    const stored = storedIdentity(h, path);
    const backing = resolveBacking(path, h.backingName!);
    if (o.base === undefined) {
      base = h.backingFormat === BACKING_FORMAT_BUN ? OverlayBase.detached(stored!) : openBase(backing, o.lock);
      checkBase(path, h, backing, stored, base, false);
    } else {
      checkBase(path, h, backing, stored, o.base, true);
      base = o.base.acquire();
    }
    return finishOpen(path, fd, h, base, o.readOnly, o.lock, o.log, o.repair ?? true, o.wrapFile);
  } catch (e) {
    closeSync(fd);
    if (base !== undefined) quietly(base.release());
    throw e;
  }
}

/**
 * Refuse a base other than the one the overlay was made over, naming both. A raw file must be the
 * backing file (when `given`), and where the overlay records a device stack (rebased onto a raw
 * copy of it, e.g. the cooked view saved as an ISO) it must hold the same bytes.
 */
function checkBase(path: string, h: Header, backing: string, stored: BaseIdentity | null, base: OverlayBase, given: boolean): void {
  const id = base.identity;
  if (id === null) {
    if (stored !== null) {
      const notIt = () => new Qcow2Error(path, `it was made over ${describeIdentity(stored)}, not over the raw file ${base.path}`);
      if (h.backingFormat === BACKING_FORMAT_BUN || base.size !== stored.size) throw notIt();
      const v = sampleVersion(base.image);
      if (typeof v !== "string" || v !== stored.version) throw notIt();
    }
    if (!given) return;
    let st;
    try {
      st = statSync(backing);
    } catch {
      throw new Qcow2Error(path, `its backing file ${h.backingName} (${backing}) does not exist, but ${base.path} was given as the base`);
    }
    if (st.dev !== base.dev || st.ino !== base.ino) throw new Qcow2Error(path, `its backing file is ${backing}, not ${base.path}`);
    return;
  }
  if (stored === null) throw new Qcow2Error(path, `it was made over the raw file ${backing}, not over ${describeIdentity(id)}`);
  const diff = identityDiff(stored, id);
  if (diff !== null) {
    throw new Qcow2Error(path, `its base differs (${diff}): it was made over ${describeIdentity(stored)}; the base given is ${describeIdentity(id)}`);
  }
}

function quietly(r: Maybe): void {
  if (isPromise(r)) r.catch(() => {});
}

/**
 * Check the size, lock, construct and check refcounts (`repair`: free leaks; null: a file just
 * made here, nothing to check); `base` holds a reference for the overlay.
 */
function finishOpen(path: string, fd: number, h: Header, base: OverlayBase, readOnly: boolean,
  lock: boolean, log: (msg: string) => void, repair: boolean | null, wrapFile?: OverlayImageOptions["wrapFile"]): Qcow2Overlay {
  const expect = Math.ceil(base.size / 512) * 512;
  if (h.size !== expect) {
    throw new Qcow2Error(path, `virtual size ${h.size} does not match base ${describeBase(base)} (${base.size} bytes): the base changed size, or is not the base this overlay was made for`);
  }
  if (lock) lockImage(fd, path, readOnly ? RO_PERMS : RW_PERMS, readOnly ? RO_DENY : RW_DENY);
  const img = new Qcow2Overlay({ path, fd, header: h, readOnly, base, log, wrapFile });
  if (!readOnly) {
    img.clearAutoclear();
    img.checkRefcountCoverage();
  }
  if (repair === null) return img;
  const r = img.scan(!readOnly && repair);
  if (r.errors.length > 0 && !readOnly) {
    throw new Qcow2Error(path, `refcounts are inconsistent (${r.errors.slice(0, 3).join("; ")}${r.errors.length > 3 ? "; ..." : ""}): repair with qemu-img check -r all`, "corrupt refcounts");
  }
  if (r.repaired > 0) log(`overlay ${path}: repaired ${r.repaired} leaked cluster(s) (left by a crash)`);
  return img;
}

function openThrowAway(base: OverlayBase, opts: OpenOverlayOptions): Qcow2Overlay {
  const dir = process.env.TMPDIR || tmpdir();
  const path = join(dir, `bun-nbd-snapshot-${process.pid}-${Math.random().toString(36).slice(2, 10)}.qcow2`);
  const fd = openSync(path, "wx+", 0o600);
  // Unlinked at once: the kernel reclaims the space when the process ends, however it ends.
  unlinkSync(path);
  base.acquire();
  try {
    const backing = base.identity === null ? { backingName: resolve(base.path) } : backingFor(path, base);
    writeNewImage(fd, path, { size: base.size, compat: opts.compat, sync: false, ...backing });
    const h = readHeader(fd, path);
    validateHeader(h, path, true);
    const img = finishOpen(`${path} (deleted)`, fd, h, base, false, false, opts.log, null);
    opts.log(`throw-away overlay over ${describeBase(base)} in ${dir} (unlinked, discarded at exit)`);
    return img;
  } catch (e) {
    closeSync(fd);
    quietly(base.release());
    throw e;
  }
}
