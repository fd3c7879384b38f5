// One ranged GET at a time over Bun's fetch: a web server by its URL, S3 through URLs presigned by
// Bun.S3Client (S3File hides statuses and misreads edges). Every GET is conditional on the pinned
// version (If-Match) and its answer checked (ETag, Content-Range, length): two versions never mix.
import { VERSION } from "../../version.ts";
import { s3ClientEndpoint, type RemoteLocation } from "./location.ts";

/** What identifies the object's bytes: pinned at open, checked on every GET. */
export interface ObjectVersion {
  size: number;
  etag: string | null;
  lastModified: string | null;
}

/** A failed remote request. `retryable`: network trouble or a 5xx/429; `changed`: the object is not the pinned version any more. */
export class RemoteError extends Error {
  constructor(message: string, readonly status: number, readonly retryable: boolean, readonly changed = false) {
    super(message);
    this.name = "RemoteError";
  }
}

export function describeVersion(v: ObjectVersion): string {
  const parts = [`${v.size} bytes`];
  if (v.etag) parts.push(`ETag ${v.etag}`);
  if (v.lastModified) parts.push(`Last-Modified ${v.lastModified}`);
  return parts.join(", ");
}

/** The version tag an overlay records: the ETag, else Last-Modified plus size. */
export function versionTag(v: ObjectVersion): string {
  return v.etag ?? (v.lastModified ? `last-modified:${v.lastModified}` : `size:${v.size}`);
}

export class ObjectStore {
  readonly display: string;
  private readonly auth: string | null;
  private s3: InstanceType<typeof Bun.S3Client> | null = null;
  private signed: { url: string; until: number } | null = null;

  constructor(readonly loc: RemoteLocation) {
    this.display = loc.display;
    this.auth = null;
    if (loc.kind === "http" && (loc.url.username || loc.url.password)) {
      this.auth = "Basic " + Buffer.from(`${decodeURIComponent(loc.url.username)}:${decodeURIComponent(loc.url.password)}`).toString("base64");
    }
    if (loc.kind === "s3" && loc.s3.accessKeyId && loc.s3.secretAccessKey) {
      this.s3 = new Bun.S3Client({
        bucket: loc.bucket, endpoint: s3ClientEndpoint(loc.s3, loc.bucket), region: loc.s3.region, accessKeyId: loc.s3.accessKeyId,
        secretAccessKey: loc.s3.secretAccessKey, sessionToken: loc.s3.sessionToken, virtualHostedStyle: loc.s3.virtualHostedStyle,
      });
    }
  }

  /** The URL a GET goes to. S3: presigned for an hour, renewed every ten minutes. */
  private url(): string {
    const loc = this.loc;
    if (loc.kind === "http") {
      if (!this.auth) return loc.url.href;
      const u = new URL(loc.url.href);
      u.username = "";
      u.password = "";
      return u.href;
    }
    const now = Date.now();
    if (this.signed && now < this.signed.until) return this.signed.url;
    let url: string;
    if (this.s3) {
      url = this.s3.presign(loc.objectKey, { method: "GET", expiresIn: 3600 });
    } else {
      // No credentials: an anonymous GET (a public bucket).
      const ep = (loc.s3.endpoint ?? `https://s3.${loc.s3.region ?? "us-east-1"}.amazonaws.com`).replace(/\/$/, "");
      const key = loc.objectKey.split("/").map(encodeURIComponent).join("/");
      url = loc.s3.virtualHostedStyle ? `${ep.replace("://", `://${loc.bucket}.`)}/${key}` : `${ep}/${loc.bucket}/${key}`;
    }
    this.signed = { url, until: now + 600_000 };
    return url;
  }

  private headers(range: string, pin: ObjectVersion | null): Record<string, string> {
    const h: Record<string, string> = { Range: range, "Accept-Encoding": "identity", "User-Agent": `bun-nbd/${VERSION}` };
    if (this.auth) h.Authorization = this.auth;
    if (pin?.etag && !pin.etag.startsWith("W/")) h["If-Match"] = pin.etag;
    else if (pin?.lastModified) h["If-Unmodified-Since"] = pin.lastModified;
    return h;
  }

  /**
   * Find the object and pin its version: a GET of its first byte (which also proves that the
   * server honours ranges). Fails with a RemoteError naming the location and the status.
   */
  async probe(timeoutMs = 30_000): Promise<ObjectVersion> {
    let res: Response;
    try {
      res = await fetch(this.url(), { headers: this.headers("bytes=0-0", null), signal: AbortSignal.timeout(timeoutMs), redirect: "follow" });
    } catch (e) {
      throw new RemoteError(`cannot reach ${this.display}: ${networkReason(e)}`, 0, true);
    }
    if (res.status === 416) {
      await drain(res);
      throw new RemoteError(`${this.display} is empty (HTTP 416 for its first byte)`, 416, false);
    }
    if (res.status === 200) {
      await res.body?.cancel();
      throw new RemoteError(`${this.display}: the server ignores range requests (HTTP 200 for bytes=0-0); it cannot serve a disk image`, 200, false);
    }
    if (res.status !== 206) throw await statusError(this.display, res);
    const total = contentRangeTotal(res.headers.get("content-range"));
    await drain(res);
    if (total === null) throw new RemoteError(`${this.display}: no usable Content-Range in the answer to a range request`, 206, false);
    if (total === 0) throw new RemoteError(`${this.display} is empty`, 206, false);
    return { size: total, etag: res.headers.get("etag"), lastModified: res.headers.get("last-modified") };
  }

  /**
   * Stream bytes [start, end) of the pinned version (0 <= start < end <= size) into `sink`, in
   * order, as they arrive. Throws RemoteError: `changed` when the object is no longer that
   * version, `retryable` for network errors, 5xx and a transfer that stalls (no byte for `idleMs`;
   * a slow one that keeps moving is waited for). Bytes already given to `sink` stay valid.
   */
  async get(start: number, end: number, pin: ObjectVersion, stop: AbortSignal, idleMs: number, sink: (chunk: Uint8Array) => void): Promise<void> {
    if (!(start >= 0 && end > start && end <= pin.size)) throw new RemoteError(`${this.display}: bad range [${start}, ${end})`, 0, false);
    const ac = new AbortController();
    const onStop = () => ac.abort(stop.reason);
    stop.addEventListener("abort", onStop);
    let last = Date.now();
    const watchdog = setInterval(() => {
      if (Date.now() - last > idleMs) ac.abort(new DOMException(`no data for ${idleMs} ms`, "TimeoutError"));
    }, Math.max(50, Math.min(1000, idleMs / 4)));
    try {
      await this.getRange(start, end, pin, ac.signal, () => { last = Date.now(); }, sink);
    } finally {
      clearInterval(watchdog);
      stop.removeEventListener("abort", onStop);
    }
  }

  private async getRange(start: number, end: number, pin: ObjectVersion, signal: AbortSignal, progress: () => void, sink: (chunk: Uint8Array) => void): Promise<void> {
    let res: Response;
    try {
      res = await fetch(this.url(), { headers: this.headers(`bytes=${start}-${end - 1}`, pin), signal, redirect: "follow" });
    } catch (e) {
      throw new RemoteError(`${this.display}: ${networkReason(signal.reason ?? e)}`, 0, true);
    }
    progress();
    if (res.status === 412 || res.status === 416 || res.status === 404) {
      await drain(res);
      const why = res.status === 404 ? "the object is gone (HTTP 404)" : res.status === 412 ? "HTTP 412 Precondition Failed" : "HTTP 416 (its size changed)";
      throw new RemoteError(`${this.display} changed since it was opened: ${why}`, res.status, false, true);
    }
    if (res.status !== 206) {
      if (res.status === 200) { await res.body?.cancel(); throw new RemoteError(`${this.display}: HTTP 200 (whole object) for a range request`, 200, false); }
      throw await statusError(this.display, res);
    }
    const cr = res.headers.get("content-range");
    const etag = res.headers.get("etag");
    const lm = res.headers.get("last-modified");
    const m = cr === null ? null : /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(cr.trim());
    if (m === null || Number(m[1]) !== start || Number(m[2]) !== end - 1) {
      await drain(res);
      throw new RemoteError(`${this.display}: asked for bytes ${start}-${end - 1}, got Content-Range ${cr}`, 206, true);
    }
    if ((m[3] !== "*" && Number(m[3]) !== pin.size) || (pin.etag && etag && etag !== pin.etag) || (!pin.etag && pin.lastModified && lm && lm !== pin.lastModified)) {
      await drain(res);
      const now = describeVersion({ size: m[3] === "*" ? pin.size : Number(m[3]), etag, lastModified: lm });
      throw new RemoteError(`${this.display} changed since it was opened: pinned ${describeVersion(pin)}, now ${now}`, 206, false, true);
    }
    const want = end - start;
    // A small answer of the announced length is read whole: a stream reader's machinery costs more
    // than the bytes (measured at QD1: ~20 µs of CPU per GET). Anything else is streamed, so a
    // body longer than asked is cut off rather than buffered.
    const whole = want <= SMALL_BODY && res.headers.get("content-length") === String(want);
    let got = 0;
    try {
      if (whole) {
        const body = await res.bytes();
        progress();
        got = body.length;
        if (got === want) sink(body);
      } else {
        const reader = res.body!.getReader();
        for (;;) {
          const { done, value } = await reader.read();
          if (done) break;
          progress();
          if (got + value.length > want) { await reader.cancel(); got = -1; break; }
          got += value.length;
          sink(value);
        }
      }
    } catch (e) {
      throw new RemoteError(`${this.display}: reading bytes ${start}-${end - 1}: ${networkReason(signal.reason ?? e)}`, 206, true);
    }
    if (got !== want) {
      throw new RemoteError(`${this.display}: ${got < 0 ? "more" : `${got}`} bytes for ${start}-${end - 1}`, 206, true);
    }
  }
}

/** Answers up to this size are read whole (Response.bytes()), larger ones streamed. */
const SMALL_BODY = 64 * 1024;

function contentRangeTotal(cr: string | null): number | null {
  const m = cr === null ? null : /^bytes \d+-\d+\/(\d+)$/.exec(cr.trim());
  return m === null ? null : Number(m[1]);
}

async function drain(res: Response): Promise<void> {
  try { await res.arrayBuffer(); } catch { /* the status is what matters */ }
}

const REASONS: Record<number, string> = {
  400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
  409: "Conflict", 410: "Gone", 429: "Too Many Requests", 500: "Internal Server Error", 501: "Not Implemented",
  502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
};

/** "URL: HTTP 403 Forbidden (SignatureDoesNotMatch)"; 5xx, 408 and 429 are retryable. */
async function statusError(display: string, res: Response): Promise<RemoteError> {
  let code = "";
  try {
    const text = (await res.text()).slice(0, 4096);
    const m = /<Code>([^<]{1,80})<\/Code>/.exec(text);
    if (m) code = ` (${m[1]})`;
  } catch { /* no body */ }
  const s = res.status;
  const reason = res.statusText || REASONS[s] || "";
  return new RemoteError(`${display}: HTTP ${s}${reason ? " " + reason : ""}${code}`, s, s >= 500 || s === 408 || s === 429);
}

/** A short reason for a fetch that failed before any status: "connection refused", "timed out". */
export function networkReason(e: unknown): string {
  const err = e as { name?: string; code?: string; message?: string };
  if (err?.name === "TimeoutError") return "timed out";
  if (err?.name === "AbortError") return "aborted";
  const code = err?.code ?? "";
  if (/ConnectionRefused|ECONNREFUSED/i.test(code)) return "connection refused";
  if (/ConnectionClosed|ECONNRESET|socket/i.test(code)) return "connection closed by the server";
  if (/FailedToOpenSocket|ENOTFOUND|DNS/i.test(code)) return `cannot connect (${code})`;
  return code ? `${code}${err.message ? ": " + err.message : ""}` : err?.message ?? String(e);
}
