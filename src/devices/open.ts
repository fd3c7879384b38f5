// Opening is one function: from what the user named (a path, or archive.zip/MEMBER) to exports,
// by what the content is (sniff.ts: magic numbers, CD001, sync patterns, a sheet's text) rather
// than the extension alone. Each kind has one small opener in OPENERS; compressed containers are
// opened and their content sniffed again. Overlays (--overlay/--snapshot) wrap what FILE would
// serve without one (openOverlayBase). Remote names (http(s)://, s3://) go to remote/index.ts, which
// sniffs the object the same way. Everything is checked before the server listens.
import { closeSync, fstatSync, openSync, readSync, statSync } from "node:fs";
import { basename, dirname, extname, resolve } from "node:path";
import { RawFile } from "./file.ts";
import type { OverlayBase } from "./qcow2/base.ts";
import type { RemoteSettings } from "./remote/index.ts";
import { isRemote, remoteExportName } from "./remote/location.ts";
import { IsoView } from "./iso.ts";
import { HEAD_BYTES, type Kind, type Probe, sniff } from "./sniff.ts";
import { type BlockDevice, type ExportSpec, isPromise } from "./types.ts";

export interface OpenOptions {
  readOnly?: boolean;
  /** Export name override (only with a single FILE). */
  name?: string;
  /** Serve FILE through this qcow2 overlay (created if missing). */
  overlay?: string;
  /** Serve FILE through a throw-away overlay removed at exit. */
  snapshot?: boolean;
  /** Create standard-L2 overlays (for QEMU older than 5.2). */
  compat?: boolean;
  /** Warnings (e.g. a partial CD sector dropped). */
  log: (msg: string) => void;
  /** Notices (e.g. an overlay was created, an index was built). */
  info?: (msg: string) => void;
  /** How http(s):// and s3:// images are fetched and cached. */
  remote?: RemoteSettings;
}


/** What one FILE serves without an overlay. */
export interface Opened {
  kind: Kind;
  /** exports[0] is the default export; an overlay wraps it. */
  exports: ExportSpec[];
  /** Set when exports[0] is the file's bytes verbatim (a raw image): an overlay can name it as a raw backing file. */
  rawBase?: string;
}

const COMPRESSION = /\.(gz|xz|zip|imz)$/i;

/** The export name a file gets by default: its file name without the extension (and without .gz/.xz/.zip before it). */
export function exportNameFor(path: string): string {
  let b = basename(path);
  if (COMPRESSION.test(b) && extname(b.replace(COMPRESSION, ""))) b = b.replace(COMPRESSION, "");
  const ext = extname(b);
  return ext && ext !== b ? b.slice(0, -ext.length) : b;
}

export async function openExports(files: string[], opts: OpenOptions): Promise<ExportSpec[]> {
  if (files.length === 0) throw new Error("no FILE given");
  if (opts.name !== undefined && files.length > 1) throw new Error("--name needs exactly one FILE");
  if ((opts.overlay || opts.snapshot) && files.length > 1) throw new Error("--overlay and --snapshot need exactly one FILE (the base image)");
  const out: ExportSpec[] = [];
  try {
    for (const file of files) out.push(...await openOne(file, opts));
  } catch (e) {
    await closeAll(out);
    throw e;
  }
  return out;
}

async function closeAll(specs: ExportSpec[]): Promise<void> {
  for (const s of specs) { try { await s.device.close?.(); } catch { /* already failing */ } }
}

async function openOne(file: string, opts: OpenOptions): Promise<ExportSpec[]> {
  if (opts.overlay === undefined && !opts.snapshot) return (await openImage(file, opts)).exports;
  const name = opts.name ?? (isRemote(file) ? remoteExportName(file) : exportNameFor(file));
  const { openOverlay } = await import("./qcow2/index.ts");
  const base = await openOverlayBase(file, opts);
  try {
    const device = await openOverlay({ base: base.base, overlay: opts.overlay, compat: opts.compat, readOnly: opts.readOnly, log: opts.info ?? opts.log });
    const what = opts.overlay ? `overlay ${opts.overlay}` : "throw-away snapshot";
    return [{ name, description: `${base.description} through ${what}`, device }];
  } finally {
    await base.base.release(); // the overlay holds its own reference
  }
}

/**
 * The base an overlay over FILE wraps: what FILE serves without one (its default export). A raw
 * image is the raw file (QEMU can follow it too); anything else (a CD's cooked view, an ISO, a
 * compressed image, a VHD) is recorded as a device-stack base. The files under a CD view get QEMU's
 * shared read lock, as a raw base does. The caller releases the handle.
 */
export async function openOverlayBase(file: string, opts: { name?: string; log: (msg: string) => void; info?: (msg: string) => void; remote?: RemoteSettings }): Promise<{ base: OverlayBase; description: string }> {
  const { openBase, deviceBase } = await import("./qcow2/index.ts");
  const img = await openImage(file, { name: opts.name, log: opts.log, info: opts.info, readOnly: true, remote: opts.remote });
  const [first, ...rest] = img.exports;
  await closeAll(rest);
  if (!first) throw new Error(`${file}: nothing to put an overlay on`);
  if (img.rawBase || img.kind === "qcow2") {
    await closeAll([first]);
    if (img.kind === "qcow2") throw new Error(`${file} is a qcow2 overlay already: serve it directly, without --overlay/--snapshot`);
    return { base: openBase(img.rawBase!), description: basename(file) };
  }
  try {
    let stack = first.description ?? KIND_NAMES[img.kind];
    let kind: string = img.kind;
    let location = resolve(file);
    if (isRemote(file)) {
      // A remote raw object is recorded by its URL and ETag; other remote kinds by URL and content.
      const remote = await import("./remote/index.ts");
      if (first.device instanceof remote.RemoteImage) {
        const base = await deviceBase(first.device, remote.remoteIdentity(first.device));
        return { base, description: first.description ?? file };
      }
      // A remote compressed image: by the object's URL and ETag too, with what it decodes to.
      const obj = (await import("./remote/compressed.ts")).remoteObjectOf(first.device);
      if (obj) return { base: await deviceBase(first.device, remote.remoteIdentity(obj, stack)), description: stack };
      location = remote.parseLocation(file, {}).display;
    }
    if (img.kind === "cue" || img.kind === "ccd" || img.kind === "rawcd") {
      const { CookedTrackView } = await import("./cd/views.ts");
      const { lockImage, RO_DENY, RO_PERMS } = await import("./qcow2/lock.ts");
      const view = first.device;
      if (!(view instanceof CookedTrackView)) throw new Error(`${file}: no data track with a 2048-byte view to put an overlay on (audio only?)`);
      for (const f of view.disc.files) if (!f.staged) lockImage(f.fd, f.path, RO_PERMS, RO_DENY);
      stack = `cooked 2048-byte view of track ${String(view.track.number).padStart(2, "0")} (${view.track.mode.name})`;
      kind = "cd";
    }
    const base = await deviceBase(first.device, { kind, location, stack });
    return { base, description: first.description ?? basename(file) };
  } catch (e) {
    await closeAll([first]);
    throw e;
  }
}

const KIND_NAMES: Record<Kind, string> = {
  xz: "xz-compressed image", gzip: "gzip-compressed image", zip: "zip archive", vhd: "VHD", qcow2: "qcow2 image",
  iso: "ISO 9660 image", cue: "CUE sheet", ccd: "CloneCD image", rawcd: "raw CD image", raw: "raw image",
};

/** Where FILE is: the path itself, or an archive with a member path after it (archive.zip/dir/disk.img). */
export function locate(file: string): { path: string; member?: string } {
  try { statSync(file); return { path: file }; } catch { /* perhaps archive/member */ }
  for (let p = file, up = dirname(p); up !== p; p = up, up = dirname(p)) {
    let st;
    try { st = statSync(up); } catch { continue; }
    if (st.isFile()) return { path: up, member: file.slice(up.length + 1) };
    break;
  }
  return { path: file };
}

/** The first and last bytes of a file, for sniff(). Null for what is not a regular file (left to the raw opener). */
function probeFile(path: string): Probe | null {
  let fd: number;
  try { fd = openSync(path, "r"); } catch { return null; }
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) return null;
    const head = new Uint8Array(Math.min(HEAD_BYTES, st.size));
    readSync(fd, head, 0, head.length, 0);
    const tail = new Uint8Array(Math.min(512, st.size));
    readSync(fd, tail, 0, tail.length, st.size - tail.length);
    return { head, tail, size: st.size, name: path };
  } finally {
    closeSync(fd);
  }
}

/** The head of a device (not its tail: reaching the end of a single-block xz file means decoding all of it). */
async function probeDevice(dev: BlockDevice, name: string): Promise<Probe> {
  const size = dev.size();
  const head = new Uint8Array(Math.min(HEAD_BYTES, size));
  const r = dev.pread(head, 0, 0);
  if (isPromise(r)) await r;
  return { head, tail: new Uint8Array(0), size, name };
}

interface Ctx { path: string; member?: string; name: string; opts: OpenOptions }
type Opener = (c: Ctx) => Promise<Opened>;

/** What FILE serves (without an overlay). */
export async function openImage(file: string, opts: OpenOptions): Promise<Opened> {
  if (isRemote(file)) {
    const { openRemote } = await import("./remote/index.ts");
    return openRemote(file, { name: opts.name, settings: opts.remote ?? {}, log: opts.info ?? opts.log });
  }
  const { path, member, kind } = localKind(file);
  if (member !== undefined && kind !== "zip") throw new Error(`cannot open ${file}: no such file (${path} is not a zip archive)`);
  return OPENERS[kind]({ path, member, name: opts.name ?? exportNameFor(file), opts });
}

/** What a local FILE holds, by its content (and a .cue/.ccd/.zip name), without opening it as an image. */
export function localKind(file: string): { path: string; member?: string; kind: Kind } {
  const { path, member } = locate(file);
  const probe = probeFile(path);
  const ext = extname(path).toLowerCase();
  let kind: Kind = probe ? sniff(probe) : "raw";
  // A descriptor named as one is read as one: the CD loader explains what is wrong if it is not.
  if (ext === ".cue") kind = "cue";
  if (ext === ".ccd") kind = "ccd";
  // The last part of a split archive starts with directory entries, not a local header.
  if ((ext === ".zip" || ext === ".imz") && kind === "raw") kind = "zip";
  return { path, member, kind };
}

function cdImage(format: "cue" | "ccd" | "raw"): Opener {
  return async (c) => {
    const cd = await import("./cd/index.ts");
    const exports = await cd.openCdImage(c.path, { name: c.opts.name, log: c.opts.log, format });
    return { kind: format === "raw" ? "rawcd" : format, exports };
  };
}

const OPENERS: Record<Kind, Opener> = {
  raw: async (c) => ({
    kind: "raw", rawBase: c.path,
    exports: [{ name: c.name, description: `raw image ${basename(c.path)}`, device: RawFile.open(c.path, { readOnly: c.opts.readOnly, log: c.opts.log }) }],
  }),
  cue: cdImage("cue"),
  ccd: cdImage("ccd"),
  rawcd: cdImage("raw"),
  iso: async (c) => {
    const device = new IsoView(RawFile.open(c.path, { readOnly: true }));
    return { kind: "iso", exports: [isoExport(c.name, device, basename(c.path))] };
  },
  vhd: async (c) => {
    const { openVhd } = await import("./vhd/index.ts");
    const v = openVhd(c.path, { readOnly: c.opts.readOnly, log: c.opts.log });
    return { kind: "vhd", exports: [{ name: c.name, description: v.description, device: v.device }] };
  },
  qcow2: async (c) => {
    const { openImage: openQcow2 } = await import("./qcow2/index.ts");
    const device = openQcow2(c.path, { readOnly: !!c.opts.readOnly, log: c.opts.info ?? c.opts.log, lock: true });
    return { kind: "qcow2", exports: [{ name: c.name, description: `qcow2 overlay ${basename(c.path)}`, device }] };
  },
  xz: (c) => compressed("xz", c),
  gzip: (c) => compressed("gzip", c),
  zip: (c) => compressed("zip", c),
};

/** An ISO's export. The volume label and El Torito are added by serve's inspection step. */
function isoExport(name: string, device: BlockDevice, what: string): ExportSpec {
  return { name, description: `${what}: CD image, ${(device.size() / 1048576).toFixed(1)} MiB of 2048-byte sectors`, device };
}

async function compressed(kind: "xz" | "gzip" | "zip", c: Ctx): Promise<Opened> {
  const { openCompressed } = await import("./compressed/index.ts");
  const info = c.opts.info ?? (() => {});
  const o = await openCompressed(kind, c.path, { member: c.member, log: c.opts.log, info });
  try {
    const inner = sniff(await probeDevice(o.device, o.inner));
    if (inner === "iso") return { kind, exports: [isoExport(c.name, new IsoView(o.device), o.description)] };
    if (inner !== "raw") {
      throw new Error(`${c.path} holds a ${KIND_NAMES[inner]} (${o.inner}); it cannot be served from inside ${KIND_NAMES[kind].replace(/-compressed image$/, "")} compression: decompress it first`);
    }
    return { kind, exports: [{ name: c.name, description: o.description, device: o.device }] };
  } catch (e) {
    await o.device.close?.();
    throw e;
  }
}
