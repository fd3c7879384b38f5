// A least-recently-used order over block numbers 0..n-1, as a doubly linked list in two typed
// arrays (no allocation per block): the remote cache evicts from its tail.
export class LruList {
  private readonly prev: Int32Array;
  private readonly next: Int32Array;
  /** The most recently used block, or -1. */
  head = -1;
  /** The least recently used block, or -1. */
  tail = -1;

  constructor(n: number) {
    this.prev = new Int32Array(n).fill(-1);
    this.next = new Int32Array(n).fill(-1);
  }

  /** Put `b` (not in the list) at the head. */
  pushFront(b: number): void {
    this.prev[b] = -1;
    this.next[b] = this.head;
    if (this.head >= 0) this.prev[this.head] = b;
    this.head = b;
    if (this.tail < 0) this.tail = b;
  }

  /** Take `b` out of the list (nothing if it is not in it). */
  unlink(b: number): void {
    const p = this.prev[b]!, n = this.next[b]!;
    if (p >= 0) this.next[p] = n; else if (this.head === b) this.head = n;
    if (n >= 0) this.prev[n] = p; else if (this.tail === b) this.tail = p;
    this.prev[b] = -1;
    this.next[b] = -1;
  }

  /** Move `b` to the head if it is in the list. */
  touch(b: number): void {
    if (this.head === b || this.prev[b]! < 0) return;
    this.unlink(b);
    this.pushFront(b);
  }
}
