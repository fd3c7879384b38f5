// Opening remote images (http(s)://, s3://) as exports: found and pinned (open-image.ts), then
// sniffed: a CUE sheet (by name; BINs next to it), raw CD sectors (sync pattern, size a multiple of
// 2352), else a raw disk image. Cold code.
import type { ExportSpec } from "../types.ts";
import { objectBaseName, parseLocation, s3Settings } from "./location.ts";
import { openRemoteImage, remoteExportName, type RemoteOpenOptions } from "./open-image.ts";
import { describeVersion } from "./store.ts";

export { RemoteImage } from "./device.ts";
export { isRemote, redactUrl, parseLocation, type S3Settings } from "./location.ts";
export { remoteCounters, type RemoteCounters } from "./metrics.ts";
export { versionTag, describeVersion } from "./store.ts";
export * from "./open-image.ts";

/** The exports of a remote object: a raw image, or a CD image's views (a CUE sheet, raw CD sectors). */
export async function openRemote(name: string, o: RemoteOpenOptions): Promise<ExportSpec[]> {
  const loc = parseLocation(name, s3Settings(o.settings.s3));
  const exportName = o.name ?? remoteExportName(name);
  const img = await openRemoteImage(loc, o.settings, o.log);
  try {
    const cd = await import("./cd.ts");
    if (/\.cue$/i.test(objectBaseName(loc))) return await cd.openRemoteCue(img, loc, exportName, o);
    if (await cd.looksLikeRawCd(img)) return await cd.openRemoteRawCd(img, exportName, o);
  } catch (e) {
    img.close();
    throw e;
  }
  return [{ name: exportName, description: `remote raw image ${img.location} (${describeVersion(img.version)})`, device: img }];
}
