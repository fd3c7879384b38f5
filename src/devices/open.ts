// Turn the FILE arguments of `serve` into exports: raw images, CD images (BIN/CUE, CloneCD, lone
// raw CD sectors) and copy-on-write overlays over a raw base. Every file is checked before the
// server listens, so a missing or unreadable file is a clear error and nothing is half-started.
import { basename, extname } from "node:path";
import { RawFile } from "./file.ts";
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
  if (isRemoteName(file)) {
    if (opts.overlay !== undefined || opts.snapshot) throw new Error("--overlay and --snapshot over a remote image are not available yet");
    const { openRemote } = await import("./remote/index.ts");
    return openRemote(file, { name: opts.name, settings: opts.remote ?? {}, log: opts.info ?? opts.log });
  }
  const name = opts.name ?? exportNameFor(file);
  if (opts.overlay !== undefined || opts.snapshot) {
    const { openOverlay } = await import("./qcow2/index.ts");
    const device = await openOverlay({ base: file, overlay: opts.overlay, compat: opts.compat, readOnly: opts.readOnly, log: opts.info ?? opts.log });
    const what = opts.overlay ? `overlay ${opts.overlay}` : "throw-away snapshot";
    return [{ name, description: `${basename(file)} through ${what}`, device }];
  }
  const cd = await import("./cd/index.ts");
  if (cd.isCdImage(file)) return cd.openCdImage(file, { name: opts.name, log: opts.log });
  const device = RawFile.open(file, { readOnly: opts.readOnly });
  return [{ name, description: `raw image ${basename(file)}`, device }];
}
