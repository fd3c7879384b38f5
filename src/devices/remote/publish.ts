// Publishing a device's bytes (an overlay merged with its base) as a new S3 object: a multipart
// upload through Bun.S3Client's writer, read in part-sized chunks, refusing to replace an object
// unless asked, and checked by a stat of the result. Cold code.
import { isPromise, type BlockDevice } from "../types.ts";
import { parseLocation, s3ClientEndpoint, s3Settings, type S3Settings } from "./location.ts";
import { networkReason } from "./store.ts";

export interface PublishOptions {
  s3?: S3Settings;
  /** Bytes per part (5 MiB to 5 GiB, S3's limits). */
  partSize: number;
  /** Replace an existing object. */
  force?: boolean;
  /** Called with the bytes handed to the upload so far. */
  onProgress?: (done: number) => void;
}

export interface Published {
  location: string;
  size: number;
  etag: string;
  parts: number;
}

/** Upload all of `source` as the object `dest` (s3://BUCKET/KEY). */
export async function publish(source: BlockDevice, dest: string, o: PublishOptions): Promise<Published> {
  const loc = parseLocation(dest, s3Settings(o.s3));
  if (loc.kind !== "s3") throw new Error(`${loc.display}: publish writes S3 objects (s3://BUCKET/KEY)`);
  if (!loc.s3.accessKeyId || !loc.s3.secretAccessKey) throw new Error(`${loc.display}: uploading needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY`);
  if (!(o.partSize >= 5 * 1024 * 1024 && o.partSize <= 5 * 1024 ** 3)) throw new Error(`part size ${o.partSize}: S3 parts are 5 MiB to 5 GiB`);
  const client = new Bun.S3Client({
    bucket: loc.bucket, endpoint: s3ClientEndpoint(loc.s3, loc.bucket), region: loc.s3.region, accessKeyId: loc.s3.accessKeyId,
    secretAccessKey: loc.s3.secretAccessKey, sessionToken: loc.s3.sessionToken, virtualHostedStyle: loc.s3.virtualHostedStyle,
  });
  const file = client.file(loc.objectKey);
  const size = source.size();
  if (size === 0) throw new Error("the image is empty: nothing to publish");
  if (!o.force) {
    let exists: boolean;
    try {
      exists = await file.exists();
    } catch (e) {
      throw new Error(`cannot reach ${loc.display}: ${networkReason(e)}`);
    }
    if (exists) throw new Error(`${loc.display} exists; publish never replaces an object unless given --force`);
  }
  const writer = file.writer({ partSize: o.partSize, queueSize: 4, retry: 3, type: "application/octet-stream" });
  let done = 0;
  try {
    while (done < size) {
      // A fresh buffer per part: the writer keeps it until the part is uploaded.
      const chunk = new Uint8Array(Math.min(o.partSize, size - done));
      const r = source.pread(chunk, done, 0);
      if (isPromise(r)) await r;
      const w = writer.write(chunk);
      if (isPromise(w)) await w;
      done += chunk.length;
      o.onProgress?.(done);
    }
    await writer.end();
  } catch (e) {
    try { await writer.end(e as Error); } catch { /* the upload is abandoned (aborted) */ }
    throw new Error(`publishing ${loc.display} failed after ${done} bytes: ${networkReason(e)}`);
  }
  const st = await client.stat(loc.objectKey);
  if (st.size !== size) throw new Error(`${loc.display}: uploaded ${size} bytes but the object has ${st.size}`);
  return { location: loc.display, size, etag: st.etag, parts: Math.ceil(size / o.partSize) };
}
