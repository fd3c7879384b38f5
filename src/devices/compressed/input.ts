// The compressed bytes every parser and decoder here reads: a local file (always there), or a
// remote object's cache file (staged.ts: bytes become readable once fetched). Every read goes
// through ensure(), which for a staged input throws NotLocal, before anything is read or any
// decoder state changes, when the range is not local yet; the caller waits and runs again.
import { readSync } from "node:fs";
import { readAt as readFd } from "../readat.ts";
import { NotLocal, type StagedFile } from "../staged.ts";

export interface Input {
  /** Read here, at the compressed object's own offsets (once ensure() passed). */
  readonly fd: number;
  /** Bytes in the compressed object. */
  readonly size: number;
  /** Null for a local file. */
  readonly staged: StagedFile | null;
}

export function localInput(fd: number, size: number): Input {
  return { fd, size, staged: null };
}

export function stagedInput(staged: StagedFile, size: number): Input {
  return { fd: staged.fd, size, staged };
}

/** Throw NotLocal unless [pos, pos+len) is readable; when not, fetch `ahead` bytes from pos (at least len). */
export function ensure(inp: Input, pos: number, len: number, ahead = len): void {
  const s = inp.staged;
  if (s === null) return;
  const end = Math.min(inp.size, pos + len);
  if (end <= pos || s.isLocal(pos, end - pos)) return;
  throw new NotLocal(s.makeLocal(pos, Math.min(inp.size, pos + Math.max(len, ahead)) - pos));
}

/** readSync of [pos, pos+len) clipped to the object's end, once local. */
export function readIn(inp: Input, buf: Uint8Array, off: number, len: number, pos: number, ahead = len): number {
  const n = Math.max(0, Math.min(len, inp.size - pos));
  if (n === 0) return 0;
  ensure(inp, pos, n, ahead);
  return readSync(inp.fd, buf, off, n, pos);
}

/** `len` bytes at `pos` (fewer only at the end of the object), once local: for headers and directories. */
export function readAt(inp: Input, len: number, pos: number): Uint8Array {
  const n = Math.max(0, Math.min(len, inp.size - pos));
  ensure(inp, pos, n);
  return readFd(inp.fd, n, pos);
}
