// Compressed images in a bucket or behind a web server (.xz, .gz, .zip/.imz): the same parsers and
// decoders as for a local file (compressed/), reading the object's cache file through the staged
// seam: an xz Block's or an index span's compressed bytes are fetched in one request before it is
// decoded; the gzip/zip index is built in one pass over the whole object (fetched in large
// requests) and cached under the object's URL and version (ETag), so a restart fetches only what
// reads need. A stored zip member is a plain view of the object. Cold code.
import { basename } from "node:path";
import { remoteKey } from "../compressed/cache.ts";
import { type CompressedKind, type Container, openContainer } from "../compressed/index.ts";
import { stagedInput } from "../compressed/input.ts";
import { IsoView } from "../iso.ts";
import { PartitionView } from "../partition-view.ts";
import { HEAD_BYTES, sniff } from "../sniff.ts";
import { type BlockDevice, type ExportSpec, isPromise } from "../types.ts";
import type { RemoteImage } from "./device.ts";
import { objectBaseName, type RemoteLocation } from "./location.ts";
import { stagedFile } from "./open-image.ts";
import { describeVersion, versionTag } from "./store.ts";

/** The remote object under each compressed device opened here (for an overlay's base identity). */
const under = new WeakMap<BlockDevice, RemoteImage>();

/** The remote object a device opened here reads, if it is one of them. */
export function remoteObjectOf(device: BlockDevice): RemoteImage | undefined {
  return under.get(device);
}

const KIND = { xz: "xz", gzip: "gzip", zip: "zip" } as const;

/**
 * The export of a compressed remote object (`img`, already open and sniffed as `kind`); `member`
 * names the zip member (archive.zip/MEMBER). Closes `img` on failure.
 */
export async function openRemoteCompressed(kind: CompressedKind, img: RemoteImage, loc: RemoteLocation, exportName: string,
  o: { member?: string; log: (msg: string) => void }): Promise<ExportSpec[]> {
  const what = img.location;
  const version = versionTag(img.version);
  const c: Container = {
    where: what,
    label: objectBaseName(loc),
    input: stagedInput(stagedFile(img), img.size()),
    key: (w) => remoteKey(loc.key, version, img.size(), w),
    prefetch: (pos, len) => img.load(pos, len),
    stored: (_name, start, length) => new PartitionView(img, start, length),
    close: () => img.close(),
  };
  let device: BlockDevice | null = null;
  try {
    const opened = await openContainer(kind, c, { member: o.member, log: o.log, info: o.log });
    device = opened.device;
    const desc = `${opened.description} (remote ${what}, ${describeVersion(img.version)})`;
    const inner = sniff(await probe(device, opened.inner));
    if (inner === "iso") device = new IsoView(device);
    else if (inner !== "raw") {
      throw new Error(`${what} holds a ${inner} image (${opened.inner}); it cannot be served from inside ${KIND[kind]} compression: decompress it first`);
    }
    under.set(device, img);
    return [{ name: exportName, description: desc, device }];
  } catch (e) {
    if (device) await device.close?.(); // closes img too
    else await img.close();
    throw e;
  }
}

/** The head of a device, for sniff() (not its tail: that could mean decoding a whole single-block xz file). */
async function probe(dev: BlockDevice, name: string) {
  const size = dev.size();
  const head = new Uint8Array(Math.min(HEAD_BYTES, size));
  const r = dev.pread(head, 0, 0);
  if (isPromise(r)) await r;
  return { head, tail: new Uint8Array(0), size, name: basename(name) };
}
