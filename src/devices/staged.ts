// The seam for devices that read their file synchronously through an fd (the CD views) over bytes
// that may not be local yet (a remote object: the fd is its cache file). isLocal/NotLocal/whenLocal:
// wait and rerun. Devices written against async BlockDevice.pread can sit on a RemoteImage as is.
import { eio } from "../protocol/errors.ts";
import type { Maybe } from "./types.ts";

/** A file whose bytes become readable through `fd` once `makeLocal` has resolved. */
export interface StagedFile {
  /** Read through this fd, at the object's own offsets, once the range is local. */
  readonly fd: number;
  isLocal(pos: number, len: number): boolean;
  makeLocal(pos: number, len: number): Promise<void>;
  close(): Maybe;
}

/** Thrown by a synchronous reader that found bytes not yet local; `ready` settles when they are. */
export class NotLocal extends Error {
  constructor(readonly ready: Promise<void>) {
    super("bytes are not local yet");
    this.name = "NotLocal";
  }
}

/** Throw NotLocal unless [pos, pos+len) of `f` is local. */
export function needLocal(f: StagedFile, pos: number, len: number): void {
  if (!f.isLocal(pos, len)) throw new NotLocal(f.makeLocal(pos, len));
}

/**
 * Run a synchronous read; while it throws NotLocal, wait for the bytes and run it again (each run
 * makes more bytes local; a cache too small to hold one request's bytes fails after `attempts`).
 */
export function whenLocal(read: () => void, attempts = 64): Maybe {
  try {
    read();
    return;
  } catch (e) {
    if (!(e instanceof NotLocal)) throw e;
    return retry(read, e, attempts);
  }
}

async function retry(read: () => void, first: NotLocal, attempts: number): Promise<void> {
  let wait = first;
  for (let i = 0; i < attempts; i++) {
    await wait.ready;
    try {
      read();
      return;
    } catch (e) {
      if (!(e instanceof NotLocal)) throw e;
      wait = e;
    }
  }
  wait.ready.catch(() => {});
  throw eio(`bytes did not stay local after ${attempts} fetches (is the cache smaller than one request?)`);
}

/** Like whenLocal, for cold code that returns a value (loading a disc, sniffing a header). */
export async function untilLocal<T>(fn: () => T, attempts = 1024): Promise<T> {
  for (let i = 0; ; i++) {
    try {
      return fn();
    } catch (e) {
      if (!(e instanceof NotLocal) || i >= attempts) throw e;
      await e.ready;
    }
  }
}
