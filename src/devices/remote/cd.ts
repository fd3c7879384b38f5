// CD images in a bucket or behind a web server: a CUE sheet whose BINs are found next to it, or a
// lone raw-sector file. The local disc model and views, their files staged through the block
// cache (staged.ts). Cold code.
import { basename } from "node:path";
import { cueTrackSpecs, parseCue } from "../cd/cue.ts";
import type { DiscFile } from "../cd/disc.ts";
import { discExports, finish, rawDisc } from "../cd/index.ts";
import { untilLocal } from "../staged.ts";
import type { ExportSpec } from "../types.ts";
import type { RemoteImage } from "./device.ts";
import { objectBaseName, siblingLocation, type RemoteLocation } from "./location.ts";
import { openRemoteImage, stagedFile, type RemoteOpenOptions } from "./open-image.ts";

const MAX_SHEET = 1024 * 1024;

function discFile(img: RemoteImage, label: string): DiscFile {
  return { path: img.location, label, size: img.size(), fd: img.blocks.fd, staged: stagedFile(img) };
}

export async function openRemoteRawCd(img: RemoteImage, name: string, o: RemoteOpenOptions): Promise<ExportSpec[]> {
  const f = discFile(img, basename(img.location));
  const disc = await untilLocal(() => rawDisc(img.location, f));
  return discExports(disc, img.location, name, o.log);
}

/** The sheet `cue` (already open), its BINs opened next to it. Closes what it opened on failure. */
export async function openRemoteCue(cue: RemoteImage, loc: RemoteLocation, name: string, o: RemoteOpenOptions): Promise<ExportSpec[]> {
  const where = cue.location;
  if (cue.size() > MAX_SHEET) throw new Error(`${where}: ${cue.size()} bytes is too large for a CUE sheet (limit ${MAX_SHEET})`);
  const text = new Uint8Array(cue.size());
  await cue.pread(text, 0, 0);
  const sheet = parseCue(text, where);
  const warnings = [...sheet.warnings];
  const files: DiscFile[] = [];
  const opened: RemoteImage[] = [];
  try {
    const byLocation = new Map<string, DiscFile>();
    const perFile: DiscFile[] = [];
    for (const cf of sheet.files) {
      const at = siblingLocation(loc, cf.name);
      let f = byLocation.get(at.display);
      if (f === undefined) {
        let img: RemoteImage;
        try {
          img = await openRemoteImage(at, o.settings, o.log);
        } catch (e) {
          throw new Error(`${where}:${cf.line}: FILE "${cf.name}": ${(e as Error).message}`);
        }
        opened.push(img);
        img.counters.export = name;
        f = discFile(img, cf.name);
        byLocation.set(at.display, f);
        files.push(f);
      }
      perFile.push(f);
    }
    const specs = cueTrackSpecs(sheet, perFile, where, warnings);
    const disc = await untilLocal(() => finish(where, "cue", files, specs, [...warnings]));
    cue.close(); // the sheet is parsed; the BINs belong to the disc now
    return discExports(disc, objectBaseName(loc), name, o.log);
  } catch (e) {
    for (const img of opened) img.close();
    throw e;
  }
}
