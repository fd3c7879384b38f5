// The command-line flags for remote images (http(s):// and s3:// bases) that serve and publish
// share: their definitions, help text, and conversion into RemoteSettings. Wiring only. Secrets
// come from the environment (AWS_ACCESS_KEY_ID, ...), never from flags, which `ps` would show.
import type { RemoteSettings, SmallReads } from "../devices/remote/index.ts";

export const REMOTE_FLAGS = {
  "cache-dir": { type: "string" },
  "no-cache": { type: "boolean" },
  "cache-size": { type: "string" },
  "block-size": { type: "string" },
  readahead: { type: "string" },
  "small-reads": { type: "string" },
  "remote-connections": { type: "string" },
  "remote-deadline": { type: "string" },
  "s3-endpoint": { type: "string" },
  "s3-region": { type: "string" },
  "s3-virtual-hosted": { type: "boolean" },
} as const;

export const REMOTE_HELP = `remote images (FILE is http://, https:// or s3://BUCKET/KEY; read-only, writes need -o or -s):
      --cache-dir DIR      keep fetched blocks here, per URL and ETag, across restarts
                           (default $XDG_CACHE_HOME/bun-nbd/remote or ~/.cache/bun-nbd/remote)
      --no-cache           a throw-away cache instead (deleted at exit)
      --cache-size SIZE    most bytes the cache directory holds (default 8G; least recently
                           used blocks are dropped)
      --block-size SIZE    unit of the cache and of sequential GETs (default 1M; 64K to 16M)
      --readahead SIZE     most bytes fetched ahead of a sequential reader (default 32M; the
                           window starts at one block and doubles as the reader goes on; 0 = none)
      --small-reads MODE   what a small read out of sequence fetches: pieces (its 4 KiB
                           pieces), blocks (its whole block), or auto (default: pieces while a
                           round trip to the store costs less than moving a block)
      --remote-connections N  GETs in flight per image (default 8)
      --remote-deadline SEC   keep retrying a failed read (network error, 5xx) this long, then
                           answer EIO (default 60)
      --s3-endpoint URL    S3 endpoint, e.g. Ceph RGW or MinIO (default $AWS_ENDPOINT_URL)
      --s3-region REGION   (default $AWS_REGION)
      --s3-virtual-hosted  address the bucket as BUCKET.host instead of host/BUCKET
  S3 credentials: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN (none: anonymous).`;

const UNITS: Record<string, number> = { "": 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 };

/** "8G", "512M", "1MiB", "65536" -> bytes. Throws on anything else. */
export function parseSize(text: string, what: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$/i.exec(text.trim());
  if (!m) throw new Error(`${what}: "${text}" is not a size (e.g. 512M, 8G)`);
  return Math.round(Number(m[1]) * UNITS[m[2]!.toLowerCase()]!);
}

type Values = { [K in keyof typeof REMOTE_FLAGS]?: (typeof REMOTE_FLAGS)[K]["type"] extends "boolean" ? boolean : string };

/** RemoteSettings from the parsed flags (throws an Error naming the flag). */
export function remoteSettings(v: Values): RemoteSettings {
  if (v["no-cache"] && v["cache-dir"] !== undefined) throw new Error("--cache-dir and --no-cache cannot be used together");
  const num = (flag: string, text: string | undefined) => {
    if (text === undefined) return undefined;
    const n = Number(text);
    if (!(n > 0) || !Number.isFinite(n)) throw new Error(`--${flag}: "${text}" is not a positive number`);
    return n;
  };
  const deadline = num("remote-deadline", v["remote-deadline"]);
  const conns = num("remote-connections", v["remote-connections"]);
  if (conns !== undefined && !Number.isInteger(conns)) throw new Error(`--remote-connections: "${v["remote-connections"]}" is not a whole number`);
  return {
    cacheDir: v["no-cache"] ? null : v["cache-dir"],
    cacheSize: v["cache-size"] === undefined ? undefined : parseSize(v["cache-size"], "--cache-size"),
    blockSize: v["block-size"] === undefined ? undefined : parseSize(v["block-size"], "--block-size"),
    readahead: v.readahead === undefined ? undefined : parseSize(v.readahead, "--readahead"),
    smallReads: v["small-reads"] as SmallReads | undefined, // checked with the other settings
    maxInFlight: conns,
    deadlineMs: deadline === undefined ? undefined : deadline * 1000,
    attemptTimeoutMs: deadline === undefined ? undefined : Math.min(30_000, deadline * 1000),
    s3: { endpoint: v["s3-endpoint"], region: v["s3-region"], virtualHostedStyle: v["s3-virtual-hosted"] },
  };
}
