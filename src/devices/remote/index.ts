// Opening remote images (http(s)://, s3://) as exports: found and pinned (open-image.ts), then
// sniffed like a local file (sniff.ts): raw, a CUE sheet (BINs next to it), raw CD sectors, an ISO,
// a fixed VHD, a compressed image (.xz, .gz, a .zip member: compressed.ts). Cold code.
import { HEAD_BYTES, sniff, type Kind } from "../sniff.ts";
import type { ExportSpec } from "../types.ts";
import { objectBaseName, parseLocation, remoteExportName, s3Settings, type RemoteLocation } from "./location.ts";
import { openRemoteImage, type RemoteOpenOptions } from "./open-image.ts";
import type { RemoteImage } from "./device.ts";
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
 * an ISO, a fixed VHD, or an .xz, .gz or .zip image (ARCHIVE.zip/MEMBER names a member, as for a
 * local file). Dynamic VHDs, CloneCD images and qcow2 files are refused by name.
 */
export async function openRemote(name: string, o: RemoteOpenOptions): Promise<OpenedRemote> {
  const exportName = o.name ?? remoteExportName(name);
  const { img, loc, member } = await find(name, o);
  img.counters.export = exportName; // metrics are labelled with the export (a CUE sheet's BINs: cd.ts)
  try {
    const size = img.size();
    const head = new Uint8Array(Math.min(HEAD_BYTES, size));
    const tail = new Uint8Array(Math.min(512, size));
    await img.pread(head, 0, 0);
    await img.pread(tail, size - tail.length, 0);
    let kind = sniff({ head, tail, size, name: img.location });
    if (/\.cue$/i.test(objectBaseName(loc))) kind = "cue";
    const what = img.location;
    if (member !== undefined && kind !== "zip") throw new Error(`${what} is not a zip archive, so it has no member ${member}`);
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
      case "xz":
      case "gzip":
      case "zip": {
        const { openRemoteCompressed } = await import("./compressed.ts");
        return { kind, exports: await openRemoteCompressed(kind, img, loc, exportName, { member, log: o.log }) };
      }
      default:
        throw new Error(`${what} is a ${kind} image: CloneCD images and qcow2 files cannot be served from a remote store yet (their readers work on local files); serve it as a raw image`);
    }
  } catch (e) {
    await img.close();
    throw e;
  }
}

/** ARCHIVE.zip/MEMBER (or .imz): the archive's name and the member's path. */
const MEMBER = /^([^?#]*?\.(?:zip|imz))\/([^?#]+)$/i;

/**
 * The object `name` names, opened; when there is none and the name reads ARCHIVE.zip/MEMBER, the
 * archive, with the member to serve (the local CLI's archive.zip/MEMBER).
 */
async function find(name: string, o: RemoteOpenOptions): Promise<{ img: RemoteImage; loc: RemoteLocation; member?: string }> {
  const loc = parseLocation(name, s3Settings(o.settings.s3));
  try {
    return { img: await openRemoteImage(loc, o.settings, o.log), loc };
  } catch (e) {
    const m = MEMBER.exec(name);
    if (m === null) throw e;
    const archive = parseLocation(m[1]!, s3Settings(o.settings.s3));
    let img: RemoteImage;
    try {
      img = await openRemoteImage(archive, o.settings, o.log);
    } catch {
      throw e; // neither the object nor the archive: report the name as given
    }
    return { img, loc: archive, member: decodeURIComponent(m[2]!) };
  }
}
