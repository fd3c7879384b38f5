// Opening remote images (http(s)://, s3://) as exports: found and pinned (open-image.ts), then
// sniffed like a local file (sniff.ts): raw, a CUE sheet (BINs next to it), raw CD sectors, an ISO,
// a fixed VHD. Cold code.
import { HEAD_BYTES, sniff, type Kind } from "../sniff.ts";
import type { ExportSpec } from "../types.ts";
import { objectBaseName, parseLocation, remoteExportName, s3Settings } from "./location.ts";
import { openRemoteImage, type RemoteOpenOptions } from "./open-image.ts";
import { describeVersion } from "./store.ts";

export { RemoteImage, type SmallReads } from "./device.ts";
export { isRemote, redactUrl, parseLocation, remoteExportName, type S3Settings } from "./location.ts";
export { remoteCounters, type RemoteCounters } from "./metrics.ts";
export { versionTag, describeVersion } from "./store.ts";
export * from "./open-image.ts";

/** What a remote object serves, as the local opener reports it (kind as sniffed; never a raw backing file). */
export interface OpenedRemote { kind: Kind; exports: ExportSpec[] }

const ISO_DESCRIPTION = (what: string, size: number) => `${what}: CD image, ${(size / 1048576).toFixed(1)} MiB of 2048-byte sectors`;

/**
 * The exports of a remote object, by its content (the same sniffing as for a file: the first
 * HEAD_BYTES and the last 512 bytes): a raw image, a CUE sheet (BINs next to it), raw CD sectors,
 * an ISO, or a fixed VHD. Compressed images, dynamic VHDs and qcow2 files are refused by name.
 */
export async function openRemote(name: string, o: RemoteOpenOptions): Promise<OpenedRemote> {
  const loc = parseLocation(name, s3Settings(o.settings.s3));
  const exportName = o.name ?? remoteExportName(name);
  const img = await openRemoteImage(loc, o.settings, o.log);
  try {
    const size = img.size();
    const head = new Uint8Array(Math.min(HEAD_BYTES, size));
    const tail = new Uint8Array(Math.min(512, size));
    await img.pread(head, 0, 0);
    await img.pread(tail, size - tail.length, 0);
    let kind = sniff({ head, tail, size, name: img.location });
    if (/\.cue$/i.test(objectBaseName(loc))) kind = "cue";
    const what = img.location;
    switch (kind) {
      case "raw":
        return { kind, exports: [{ name: exportName, description: `remote raw image ${what} (${describeVersion(img.version)})`, device: img }] };
      case "cue":
        return { kind, exports: await (await import("./cd.ts")).openRemoteCue(img, loc, exportName, o) };
      case "rawcd":
        return { kind, exports: await (await import("./cd.ts")).openRemoteRawCd(img, exportName, o) };
      case "iso": {
        const { IsoView } = await import("../iso.ts");
        return { kind, exports: [{ name: exportName, description: ISO_DESCRIPTION(what, size), device: new IsoView(img) }] };
      }
      case "vhd": {
        const { DISK_FIXED, parseFooter } = await import("../vhd/format.ts");
        const footer = parseFooter(tail, what);
        if (footer.diskType !== DISK_FIXED) throw new Error(`${what}: a dynamic or differencing VHD cannot be served from a remote store yet (its reader works on local files); serve a fixed VHD or a raw image`);
        const { PartitionView } = await import("../partition-view.ts");
        const device = new PartitionView(img, 0, footer.currentSize);
        return { kind, exports: [{ name: exportName, description: `${what}: fixed VHD, ${(footer.currentSize / 1048576).toFixed(1)} MiB (read-only)`, device }] };
      }
      default:
        throw new Error(`${what} is a ${kind} image: compressed images, CloneCD images and qcow2 files cannot be served from a remote store yet (their readers work on local files); serve it decompressed or as a raw image`);
    }
  } catch (e) {
    await img.close();
    throw e;
  }
}
