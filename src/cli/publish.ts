// `bun-nbd publish OVERLAY s3://BUCKET/KEY`: upload what an overlay shows (its base with the
// changes merged) as a new object, in a multipart upload with a progress bar. Wiring only: the
// overlay and its base are opened by src/devices, the upload lives in src/devices/remote/publish.ts.
import { commandArgs } from "./args.ts";
import { formatSize } from "./format.ts";
import { progressBar } from "./progress.ts";
import { parseSize, REMOTE_FLAGS, remoteSettings } from "./remote-args.ts";
import { openOverlayBase } from "../devices/open.ts";
import { describeIdentity, openImage, type OverlayBase } from "../devices/qcow2/index.ts";
import { publish } from "../devices/remote/publish.ts";

const HELP = `usage: bun-nbd publish [options] OVERLAY s3://BUCKET/KEY

Upload the image OVERLAY shows - its base (a raw file, a CD image's cooked view, or a remote
http(s):// or s3:// object) with the overlay's changes merged - as a new S3 object, in a
multipart upload, with a progress bar on stderr (when it is a terminal). The overlay and its base are only read; the
overlay must not be in use by a writer. Credentials and endpoint come from AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION and AWS_ENDPOINT_URL (or --s3-endpoint).
Then serve the new object to everyone: bun-nbd serve s3://BUCKET/KEY

options:
      --part-size SIZE   bytes per uploaded part (default 16M; 5M to 5G)
  -f, --force            replace KEY if it exists (refused by default)
  -q, --quiet            no progress bar
      --s3-endpoint URL, --s3-region REGION, --s3-virtual-hosted, --cache-dir DIR, --no-cache,
      --block-size SIZE  as for serve (they apply to a remote base and to the upload)
  -h, --help             this help`;

export async function main(argv: string[]): Promise<number> {
  const args = commandArgs("publish", HELP, argv, {
    "part-size": { type: "string" },
    force: { type: "boolean", short: "f" },
    quiet: { type: "boolean", short: "q" },
    ...REMOTE_FLAGS,
  }, { min: 2, max: 2, what: "OVERLAY and s3://BUCKET/KEY" });
  if (typeof args === "number") return args;
  const o = args.values;
  const [overlay, dest] = args.positionals as [string, string];
  const log = (m: string) => console.error(m);
  let base: OverlayBase | undefined;
  try {
    const settings = remoteSettings(o);
    const partSize = o["part-size"] === undefined ? 16 * 1024 * 1024 : parseSize(o["part-size"], "--part-size");
    // The base the overlay records: a raw file opens from the header; anything else from its identity.
    const probe = openImage(overlay, { readOnly: true, lock: false, log });
    const identity = probe.base.identity;
    await probe.close();
    if (identity !== null) {
      if (identity.location === dest) throw new Error(`${dest} is the overlay's base: publish writes a new object`);
      base = (await openOverlayBase(identity.location, { log, remote: settings })).base;
    }
    const img = openImage(overlay, { readOnly: true, lock: true, log, base });
    try {
      const what = identity ? describeIdentity(identity) : img.base.path;
      console.error(`publishing ${overlay} (${formatSize(img.size())}) over ${what} to ${dest}`);
      const size = img.size();
      const bar = o.quiet ? undefined : progressBar("uploading");
      const t0 = performance.now();
      const r = await publish(img, dest, { s3: settings.s3, partSize, force: o.force, onProgress: (n) => bar?.(n, size) });
      const secs = (performance.now() - t0) / 1000;
      console.log(`published ${r.location}: ${r.size} bytes in ${r.parts} part${r.parts > 1 ? "s" : ""} in ${secs.toFixed(1)} s (${formatSize(Math.round(r.size / Math.max(secs, 1e-3)))}/s), ETag ${r.etag}`);
    } finally {
      await img.close();
    }
    return 0;
  } catch (e) {
    console.error(`bun-nbd publish: ${(e as Error).message}`);
    return 1;
  } finally {
    await base?.release();
  }
}
