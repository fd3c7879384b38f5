// Where a remote image lives (an http(s):// URL or s3://bucket/key), S3 settings from the AWS
// conventions (AWS_ACCESS_KEY_ID, ..., AWS_ENDPOINT_URL) overridden by flags, and the one place that
// makes a location safe to print (no user:password, no signing parameters). Cold code.

/** S3 settings; flags and config entries override the environment. Secrets never get printed. */
export interface S3Settings {
  endpoint?: string;
  region?: string;
  accessKeyId?: string;
  secretAccessKey?: string;
  sessionToken?: string;
  /** Use https://BUCKET.host/key instead of https://host/BUCKET/key. */
  virtualHostedStyle?: boolean;
}

export type RemoteLocation =
  | { kind: "http"; url: URL; display: string; key: string }
  | { kind: "s3"; bucket: string; objectKey: string; s3: S3Settings; display: string; key: string };

/** True if `name` is something openRemote understands (http://, https://, s3://). */
export function isRemote(name: string): boolean {
  return /^(https?|s3):\/\//i.test(name);
}

/** S3 settings from the environment (the AWS CLI's names), then `over` on top. */
export function s3Settings(over: S3Settings = {}, env: Record<string, string | undefined> = process.env): S3Settings {
  const pick = <T>(...xs: (T | undefined)[]) => xs.find((x) => x !== undefined && x !== "");
  return {
    endpoint: pick(over.endpoint, env.AWS_ENDPOINT_URL_S3, env.AWS_ENDPOINT_URL, env.S3_ENDPOINT),
    region: pick(over.region, env.AWS_REGION, env.AWS_DEFAULT_REGION),
    accessKeyId: pick(over.accessKeyId, env.AWS_ACCESS_KEY_ID),
    secretAccessKey: pick(over.secretAccessKey, env.AWS_SECRET_ACCESS_KEY),
    sessionToken: pick(over.sessionToken, env.AWS_SESSION_TOKEN),
    virtualHostedStyle: over.virtualHostedStyle,
  };
}

/**
 * The endpoint to give Bun.S3Client: with virtual-hosted style, BUCKET.host (Bun adds the bucket to
 * the host only for AWS's own endpoints; given one, it drops the bucket from the URL altogether).
 */
export function s3ClientEndpoint(s3: S3Settings, bucket: string): string | undefined {
  if (!s3.endpoint || !s3.virtualHostedStyle) return s3.endpoint;
  const u = new URL(s3.endpoint);
  u.hostname = `${bucket}.${u.hostname}`;
  return u.href.replace(/\/$/, "");
}

/** Query parameters that carry signatures or credentials (presigned S3, Azure SAS, GCS). */
const SECRET_PARAMS = /^(x-amz-(signature|credential|security-token|date|expires|algorithm|signedheaders)|signature|awsaccesskeyid|expires|x-goog-(signature|credential|date|expires|algorithm|signedheaders)|sig|se|sp|sv|sr|st|spr|skoid|sktid|skt|ske|sks|skv|token|access_token)$/i;

/** `url` without user:password and with signing parameters removed: safe for logs, LIST and cache keys. */
export function redactUrl(url: URL): string {
  const u = new URL(url.href);
  u.username = "";
  u.password = "";
  const keep = [...u.searchParams].filter(([k]) => !SECRET_PARAMS.test(k));
  const hidden = [...u.searchParams].length - keep.length;
  u.search = "";
  for (const [k, v] of keep) u.searchParams.append(k, v);
  let s = u.href;
  if (hidden > 0) s += `${u.search ? "&" : "?"}…`;
  return s;
}

/** Parse a remote name. Throws a clear Error for a malformed one. */
export function parseLocation(name: string, s3: S3Settings = s3Settings()): RemoteLocation {
  let url: URL;
  try {
    url = new URL(name);
  } catch {
    throw new Error(`not a valid URL: ${safeText(name)}`);
  }
  const scheme = url.protocol.toLowerCase();
  if (scheme === "http:" || scheme === "https:") {
    if (url.pathname === "/" || url.pathname === "") throw new Error(`${redactUrl(url)}: the URL names no object`);
    const display = redactUrl(url);
    return { kind: "http", url, display, key: display };
  }
  if (scheme === "s3:") {
    const bucket = url.hostname;
    const objectKey = decodeURIComponent(url.pathname.replace(/^\//, ""));
    if (!bucket) throw new Error(`${safeText(name)}: no bucket (expected s3://BUCKET/KEY)`);
    if (!objectKey || objectKey.endsWith("/")) throw new Error(`s3://${bucket}/${objectKey}: no object key (expected s3://BUCKET/KEY)`);
    if (url.username || url.password) throw new Error(`s3://${bucket}/${objectKey}: credentials do not belong in the URL; use AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY`);
    const display = `s3://${bucket}/${objectKey}`;
    const endpoint = s3.endpoint ? redactUrl(new URL(s3.endpoint)).replace(/\/$/, "") : "aws";
    return { kind: "s3", bucket, objectKey, s3, display, key: `${display} at ${endpoint}` };
  }
  throw new Error(`unsupported URL scheme ${scheme} (expected http://, https:// or s3://)`);
}

/** The location of `rel` (a name from a CUE sheet) next to `loc`'s object. */
export function siblingLocation(loc: RemoteLocation, rel: string): RemoteLocation {
  const norm = rel.replace(/\\/g, "/");
  if (loc.kind === "http") {
    const u = new URL(norm.split("/").map(encodeURIComponent).join("/"), loc.url);
    u.search = loc.url.search;
    u.username = loc.url.username;
    u.password = loc.url.password;
    const display = redactUrl(u);
    return { kind: "http", url: u, display, key: display };
  }
  const parts = loc.objectKey.split("/").slice(0, -1);
  for (const p of norm.split("/")) {
    if (p === "" || p === ".") continue;
    if (p === "..") parts.pop();
    else parts.push(p);
  }
  const objectKey = parts.join("/");
  const display = `s3://${loc.bucket}/${objectKey}`;
  return { ...loc, objectKey, display, key: loc.key.replace(loc.display, display) };
}

/** The last path component of a location without its extension: the default export name. */
/** The default export name of a remote object: its last path component without the extension. */
export function remoteExportName(name: string): string {
  const b = objectBaseName(parseLocation(name, {}));
  const dot = b.lastIndexOf(".");
  return dot > 0 ? b.slice(0, dot) : b;
}

export function objectBaseName(loc: RemoteLocation): string {
  const path = loc.kind === "http" ? decodeURIComponent(loc.url.pathname) : loc.objectKey;
  return path.split("/").filter(Boolean).pop() ?? "remote";
}

/** A name as the user typed it, with anything that looks like user:password@ removed. */
function safeText(s: string): string {
  return s.replace(/\/\/[^/@]*@/, "//");
}
