// Turn the FILE arguments of `serve` into exports: raw images, CD images (BIN/CUE, CloneCD, lone raw
// CD sectors), remote images (http(s)://, s3://) and copy-on-write overlays over what FILE serves
// without one. Everything is opened before the server listens: errors are clear, nothing half-started.
import { basename, extname, resolve } from "node:path";
import { RawFile } from "./file.ts";
import type { OverlayBase } from "./qcow2/base.ts";
import type { RemoteSettings } from "./remote/index.ts";
import type { BlockDevice, ExportSpec } from "./types.ts";

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
  /** Notices (e.g. an overlay was created). */
  info?: (msg: string) => void;
  /** How http(s):// and s3:// images are fetched and cached. */
  remote?: RemoteSettings;
}

const isRemoteName = (f: string) => /^(https?|s3):\/\//i.test(f);

/** The export name a file gets by default: its file name without the extension. */
export function exportNameFor(path: string): string {
  const b = basename(path);
  const ext = extname(b);
  return ext && ext !== b ? b.slice(0, -ext.length) : b;
}

export async function openExports(files: string[], opts: OpenOptions): Promise<ExportSpec[]> {
  if (files.length === 0) throw new Error("no FILE given");
  if (opts.name !== undefined && files.length > 1) throw new Error("--name needs exactly one FILE");
  if ((opts.overlay || opts.snapshot) && files.length > 1) throw new Error("--overlay and --snapshot need exactly one FILE (the base image)");
  const out: ExportSpec[] = [];
  const opened: BlockDevice[] = [];
  try {
    for (const file of files) {
      const specs = await openOne(file, opts);
      for (const s of specs) { out.push(s); opened.push(s.device); }
    }
  } catch (e) {
    for (const d of opened) { try { await d.close?.(); } catch { /* already failing */ } }
    throw e;
  }
  return out;
}

async function openOne(file: string, opts: OpenOptions): Promise<ExportSpec[]> {
  const remote = isRemoteName(file) ? await import("./remote/index.ts") : null;
  if (remote !== null && opts.overlay === undefined && !opts.snapshot) {
    return remote.openRemote(file, { name: opts.name, settings: opts.remote ?? {}, log: opts.info ?? opts.log });
  }
  const name = opts.name ?? (remote !== null ? remote.remoteExportName(file) : exportNameFor(file));
  if (opts.overlay !== undefined || opts.snapshot) {
    const { openOverlay } = await import("./qcow2/index.ts");
    const base = await openOverlayBase(file, { log: opts.info ?? opts.log, remote: opts.remote });
    try {
      const device = await openOverlay({ base: base.base, overlay: opts.overlay, compat: opts.compat, readOnly: opts.readOnly, log: opts.info ?? opts.log });
      const what = opts.overlay ? `overlay ${opts.overlay}` : "throw-away snapshot";
      return [{ name, description: `${base.description} through ${what}`, device }];
    } finally {
      await base.base.release(); // the overlay holds its own reference
    }
  }
  const cd = await import("./cd/index.ts");
  if (cd.isCdImage(file)) return cd.openCdImage(file, { name: opts.name, log: opts.log });
  const device = RawFile.open(file, { readOnly: opts.readOnly });
  return [{ name, description: `raw image ${basename(file)}`, device }];
}

/**
 * The base an overlay over FILE wraps: what FILE serves without one. A raw image is the raw file
 * (QEMU can follow it too); a CD image is the cooked 2048-byte view of its first data track (the
 * default export), recorded as a device-stack base. Either way the files under it get QEMU's
 * shared read lock, which keeps writers away while it is open. The caller releases the handle.
 */
export async function openOverlayBase(file: string, opts: { log: (msg: string) => void; remote?: RemoteSettings }): Promise<{ base: OverlayBase; description: string }> {
  const { openBase, deviceBase } = await import("./qcow2/index.ts");
  const { lockImage, RO_DENY, RO_PERMS } = await import("./qcow2/lock.ts");
  const cd = await import("./cd/index.ts");
  if (isRemoteName(file)) return openRemoteBase(file, opts);
  if (!cd.isCdImage(file)) return { base: openBase(file), description: basename(file) };
  const specs = await cd.openCdImage(file, { log: opts.log });
  const first = specs[0]!;
  const { CookedTrackView } = await import("./cd/views.ts");
  const view = first.device;
  try {
    for (const s of specs.slice(1)) await s.device.close?.();
    if (!(view instanceof CookedTrackView)) throw new Error(`${file}: no data track with a 2048-byte view to put an overlay on (audio only?)`);
    for (const f of view.disc.files) lockImage(f.fd, f.path, RO_PERMS, RO_DENY);
    const t = view.track;
    const stack = `cooked 2048-byte view of track ${String(t.number).padStart(2, "0")} (${t.mode.name})`;
    const base = await deviceBase(view, { kind: "cd", location: resolve(file), stack });
    return { base, description: first.description ?? basename(file) };
  } catch (e) {
    await view.close?.();
    throw e;
  }
}

/**
 * A remote image as an overlay's base: a raw object recorded by its URL and ETag (a persistent
 * overlay refuses to open over another version), a remote CD image's cooked view by its sheet's URL
 * and sampled content. Reads go through the block cache.
 */
async function openRemoteBase(file: string, opts: { log: (msg: string) => void; remote?: RemoteSettings }): Promise<{ base: OverlayBase; description: string }> {
  const { deviceBase } = await import("./qcow2/index.ts");
  const { openRemote, RemoteImage, remoteIdentity } = await import("./remote/index.ts");
  const { CookedTrackView } = await import("./cd/views.ts");
  const specs = await openRemote(file, { settings: opts.remote ?? {}, log: opts.log });
  const first = specs[0]!;
  const dev = first.device;
  try {
    for (const s of specs.slice(1)) await s.device.close?.();
    let base: OverlayBase;
    if (dev instanceof RemoteImage) {
      base = await deviceBase(dev, remoteIdentity(dev));
    } else if (dev instanceof CookedTrackView) {
      const t = dev.track;
      base = await deviceBase(dev, { kind: "cd", location: dev.disc.source, stack: `cooked 2048-byte view of track ${String(t.number).padStart(2, "0")} (${t.mode.name})` });
    } else {
      throw new Error(`${file}: no data track with a 2048-byte view to put an overlay on (audio only?)`);
    }
    return { base, description: first.description ?? file };
  } catch (e) {
    await dev.close?.();
    throw e;
  }
}
