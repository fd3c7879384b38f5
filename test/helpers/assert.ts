// Assertions uvu lacks: byte comparison that reports the first differing offset (instead of a
// 4,000-line diff), and a deadline, since uvu has no per-test timeout.
import * as assert from "uvu/assert";

export function bytesEqual(actual: Uint8Array, expected: Uint8Array, what = "bytes"): void {
  if (actual.length !== expected.length) {
    assert.unreachable(`${what}: length ${actual.length}, expected ${expected.length}${firstDiff(actual, expected)}`);
  }
  const d = Buffer.compare(Buffer.from(actual.buffer, actual.byteOffset, actual.length),
    Buffer.from(expected.buffer, expected.byteOffset, expected.length));
  if (d !== 0) assert.unreachable(`${what} differ${firstDiff(actual, expected)}`);
}

function firstDiff(a: Uint8Array, b: Uint8Array): string {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    if (a[i] !== b[i]) {
      const hex = (x: Uint8Array) => Buffer.from(x.subarray(i, Math.min(i + 16, x.length))).toString("hex");
      return ` at offset ${i} (0x${i.toString(16)}): got ${hex(a)} expected ${hex(b)}`;
    }
  }
  return n < Math.max(a.length, b.length) ? ` (equal up to ${n})` : "";
}

/** Run `fn` but fail if it takes longer than `ms`. */
export async function deadline<T>(ms: number, what: string, fn: () => Promise<T>): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`deadline: ${what} took longer than ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([fn(), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Expect `fn` to reject; returns the error for further checks. */
export async function rejects(fn: () => Promise<unknown>, what: string): Promise<Error> {
  try {
    await fn();
  } catch (e) {
    return e as Error;
  }
  assert.unreachable(`${what}: expected an error`);
  throw new Error("unreachable");
}
