// The seam between devices that read their container file synchronously through an fd (the CD
// views, with their shared scratch buffers) and containers whose bytes may not be local yet (a
// remote object behind its block cache, whose fd is the cache file). A synchronous reader asks
// `isLocal` first and throws NotLocal when it must wait; `whenLocal` awaits and reruns the read.
// Devices written against BlockDevice.pread (async allowed) need none of this: they can sit on a
// RawFile locally and on a RemoteImage remotely, unchanged.
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
