// The identity of a non-raw base (a CD image's cooked view, a compressed or remote image): what
// the overlay records about the base it was made over, in a header extension of its own, so that
// opening it over a different base is refused with both named. Cold code.
import { createHash } from "node:crypto";
import { isPromise, type Maybe } from "../types.ts";
import { Qcow2Error } from "./format.ts";

export { BACKING_FORMAT_BUN, EXT_BASE_IDENTITY } from "./format.ts";

/** Longest encoded record accepted (it lives in cluster 0 with the header and the backing name). */
export const MAX_IDENTITY_BYTES = 2048;

export interface BaseIdentity {
  /** What the base is: "cd" (a CD image's cooked view), later "xz", "gzip", "vhd", "http", "s3"... */
  kind: string;
  /** Where: an absolute path (the descriptor the user named) or a URL. */
  location: string;
  /** The base's size in bytes. */
  size: number;
  /** A version tag: an ETag, or "sample-sha256:..." (a hash of sampled content) for local files. */
  version: string;
  /** The device stack, e.g. "cooked 2048-byte view of track 01 (MODE1/2352)". */
  stack: string;
}

export function encodeIdentity(id: BaseIdentity): Uint8Array {
  const bytes = new TextEncoder().encode(JSON.stringify({
    v: 1, kind: id.kind, location: id.location, size: id.size, version: id.version, stack: id.stack,
  }));
  if (bytes.length > MAX_IDENTITY_BYTES) throw new Error(`base identity record is ${bytes.length} bytes (limit ${MAX_IDENTITY_BYTES})`);
  return bytes;
}

export function decodeIdentity(data: Uint8Array, path: string): BaseIdentity {
  let j: Record<string, unknown>;
  try {
    j = JSON.parse(new TextDecoder().decode(data)) as Record<string, unknown>;
  } catch {
    throw new Qcow2Error(path, "the base identity header extension is not valid JSON (corrupt image)");
  }
  const str = (k: string) => (typeof j[k] === "string" ? j[k] as string : "");
  if (j.v !== 1 || typeof j.size !== "number" || !str("kind")) {
    throw new Qcow2Error(path, `unsupported base identity record ${JSON.stringify(j).slice(0, 200)}`);
  }
  return { kind: str("kind"), location: str("location"), size: j.size, version: str("version"), stack: str("stack") };
}

/** One line naming a base: "cd /x/disc.cue (cooked ... track 01 ...), 917504 bytes, sample-sha256:ab12...". */
export function describeIdentity(id: BaseIdentity): string {
  return `${id.kind} ${id.location} (${id.stack}), ${id.size} bytes, version ${id.version}`;
}

/** A URL rather than a path ("https://...", "s3://..."). */
export const isUrl = (s: string) => /^[a-z][a-z0-9+.-]*:\/\//i.test(s);

/**
 * The fields in which `actual` differs from `stored`, or null when they name the same base. A local
 * location may differ (files move; the version tag follows the content); a URL may not (an ETag
 * only means something for its own URL).
 */
export function identityDiff(stored: BaseIdentity, actual: BaseIdentity): string | null {
  const d: string[] = [];
  if (stored.kind !== actual.kind) d.push("kind");
  if ((isUrl(stored.location) || isUrl(actual.location)) && stored.location !== actual.location) d.push("location");
  if (stored.size !== actual.size) d.push("size");
  if (stored.stack !== actual.stack) d.push("device stack");
  if (stored.version !== actual.version) d.push("version");
  return d.length === 0 ? null : d.join(", ");
}

/** Something a version tag can be sampled from (BaseImage has this shape). */
export interface Sampleable {
  readonly size: number;
  read(buf: Uint8Array, off: number, len: number, pos: number): Maybe;
}

const SAMPLE = 64 * 1024;

/**
 * A version tag from content: sha256 of the size and of 64 KiB at the start, the middle and the end
 * (an ISO's volume descriptors, timestamps and file data). Three small reads, so opening an
 * overlay over a big or slow base stays cheap; remote bases pass their ETag instead. Synchronous
 * when the base's reads are. What is sampled is part of the on-disk format: changing it makes
 * every recorded version differ.
 */
export function sampleVersion(base: Sampleable): string | Promise<string> {
  const h = createHash("sha256");
  h.update(String(base.size));
  const at = [0, Math.floor(base.size / 2 / SAMPLE) * SAMPLE, Math.max(0, base.size - SAMPLE)];
  const buf = new Uint8Array(SAMPLE);
  // A sample that cannot be read (say an XA Form 2 sector in a cooked view) counts as a marker:
  // the same base fails the same way every time.
  const unreadable = new TextEncoder().encode("unreadable");
  const from = (k: number): string | Promise<string> => {
    for (; k < at.length; k++) {
      const n = Math.min(SAMPLE, base.size - at[k]!);
      if (n <= 0) continue;
      let r: Maybe;
      try {
        r = base.read(buf, 0, n, at[k]!);
      } catch {
        h.update(unreadable);
        continue;
      }
      if (isPromise(r)) {
        const next = k + 1;
        return r.then(() => { h.update(buf.subarray(0, n)); }, () => { h.update(unreadable); }).then(() => from(next));
      }
      h.update(buf.subarray(0, n));
    }
    return `sample-sha256:${h.digest("hex").slice(0, 32)}`;
  };
  return from(0);
}
