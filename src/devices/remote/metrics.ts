// Counters of the remote images this process serves, in plain objects a metrics endpoint can read
// (remoteCounters()) without knowing anything else about remote images. Updated on the hot path by
// plain increments; nothing here formats or allocates per request.

export interface RemoteCounters {
  /** The object, as printed (no credentials). */
  readonly location: string;
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
    location, requests: 0, bytesFetched: 0, cacheHits: 0, cacheMisses: 0, retries: 0, errors: 0,
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
