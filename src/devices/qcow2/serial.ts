// Per-cluster serialisation: a copy-on-write that awaits its base holds its guest cluster until the
// data and L2 entry are in place, and writes or zeroes reaching it meanwhile queue behind it. Over a
// synchronous base nothing is ever held, and checking costs one test.
import type { Maybe } from "../types.ts";

export class ClusterLocks {
  /** Guest cluster -> the tail of its queue (never rejects). */
  private readonly tails = new Map<number, Promise<void>>();

  /** Is an operation on cluster c in flight? */
  held(c: number): boolean {
    return this.tails.size !== 0 && this.tails.has(c);
  }

  /** Cluster c is held until `p` settles (the caller found it free and started `p` without yielding). */
  hold(c: number, p: Promise<void>): Promise<void> {
    this.track(c, p);
    return p;
  }

  /** Run `fn` once everything queued on cluster c is done, holding c until what it returns settles. */
  after(c: number, fn: () => Maybe): Promise<void> {
    const prev = this.tails.get(c) ?? Promise.resolve();
    const p = prev.then(fn);
    this.track(c, p);
    return p;
  }

  /** Number of clusters held (tests, and refusing maintenance while changes are in flight). */
  get size(): number {
    return this.tails.size;
  }

  private track(c: number, p: Promise<void>): void {
    const tail = p.then(noop, noop);
    this.tails.set(c, tail);
    void tail.then(() => { if (this.tails.get(c) === tail) this.tails.delete(c); });
  }
}

function noop(): void {}
