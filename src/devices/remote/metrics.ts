// Counters of the remote images this process serves, in plain objects, and their rendering as
// metric families (remoteMetrics()) for a metrics endpoint that knows nothing else about remote
// images. Updated on the hot path by plain increments; nothing here formats or allocates per
// request. An image's counters live from its open to its close: after a reload, an image that
// sessions of the old table still read from is reported until the last of them lets go.

export interface RemoteCounters {
  /** The object, as printed (no credentials: redactUrl, or s3://BUCKET/KEY). */
  readonly location: string;
  /** The export the image was opened for (set by the opener; several exports over one image: the configured one). */
  export: string;
  /** GETs sent (every attempt, readahead included). */
  requests: number;
  /** Payload bytes received. */
  bytesFetched: number;
  /** Blocks a read found in the local cache. */
  cacheHits: number;
  /** Blocks a read had to wait for. */
  cacheMisses: number;
  /** Attempts repeated after a network error or a 5xx. */
  retries: number;
  /** Reads answered with EIO (store gone past the deadline, object changed). */
  errors: number;
  /** GETs sent ahead of a sequential reader. */
  readaheadRequests: number;
  /** Blocks dropped from the cache to stay within its size. */
  evictions: number;
  /** Reads refused because the object is no longer the version pinned at open. */
  versionMismatches: number;
  /** Bytes of block data held in the local cache. */
  cachedBytes: number;
}

const live = new Set<RemoteCounters>();

export function newCounters(location: string): RemoteCounters {
  const c: RemoteCounters = {
    location, export: "", requests: 0, bytesFetched: 0, cacheHits: 0, cacheMisses: 0, retries: 0, errors: 0,
    readaheadRequests: 0, evictions: 0, versionMismatches: 0, cachedBytes: 0,
  };
  live.add(c);
  return c;
}

export function dropCounters(c: RemoteCounters): void {
  live.delete(c);
}

/** The counters of every remote image open in this process (live objects: read, do not keep). */
export function remoteCounters(): readonly RemoteCounters[] {
  return [...live];
}

/** One metric family, as src/server/metrics.ts renders a MetricFamily. */
export interface RemoteFamily {
  name: string;
  type: "counter" | "gauge";
  help: string;
  samples: { labels: Record<string, string>; value: number }[];
}

type Numeric = Exclude<keyof RemoteCounters, "location" | "export">;
const FAMILIES: readonly [string, "counter" | "gauge", Numeric, string][] = [
  ["bun_nbd_remote_requests_total", "counter", "requests", "GETs sent to the store (every attempt; readahead and retries included)."],
  ["bun_nbd_remote_fetched_bytes_total", "counter", "bytesFetched", "Payload bytes received from the store."],
  ["bun_nbd_remote_cache_hits_total", "counter", "cacheHits", "Blocks a read found in the local cache."],
  ["bun_nbd_remote_cache_misses_total", "counter", "cacheMisses", "Blocks a read had to wait for the store for."],
  ["bun_nbd_remote_retries_total", "counter", "retries", "GET attempts repeated after a network error, a 5xx or a stall."],
  ["bun_nbd_remote_readahead_requests_total", "counter", "readaheadRequests", "GETs sent ahead of a sequential reader."],
  ["bun_nbd_remote_evictions_total", "counter", "evictions", "Blocks dropped from the local cache to stay within its size."],
  ["bun_nbd_remote_version_mismatches_total", "counter", "versionMismatches", "Reads refused because the object is no longer the version pinned at open."],
  ["bun_nbd_remote_errors_total", "counter", "errors", "Reads answered with EIO (store unreachable past the deadline, object changed)."],
  ["bun_nbd_remote_cached_bytes", "gauge", "cachedBytes", "Bytes of block data held in the local cache."],
];

/**
 * Every open remote image's counters as metric families, labelled by export and location (the
 * redacted form only: never user:password, signing parameters or S3 keys). Images with the same
 * labels (an export reopened by a reload while sessions still read the old image) are summed.
 */
export function remoteMetrics(): RemoteFamily[] {
  const byKey = new Map<string, RemoteCounters[]>();
  for (const c of live) {
    const key = `${c.export}\n${c.location}`;
    const same = byKey.get(key);
    if (same) same.push(c);
    else byKey.set(key, [c]);
  }
  return FAMILIES.map(([name, type, field, help]) => ({
    name, type, help,
    samples: [...byKey.values()].map((cs) => ({
      labels: { export: cs[0]!.export, location: cs[0]!.location },
      value: cs.reduce((sum, c) => sum + c[field], 0),
    })),
  }));
}
