// The raw test clients' receive buffer (robustness, TLS and trace wires): bytes as they arrive,
// taken exactly n at a time.

/** Received bytes not yet read. */
export class ByteQueue {
  private bufs: Buffer[] = [];
  have = 0;
  push(b: Buffer): void {
    this.bufs.push(b);
    this.have += b.length;
  }
  /** The first `n` bytes (the caller made sure there are that many). */
  take(n: number): Buffer {
    const all = this.bufs.length === 1 ? this.bufs[0]! : Buffer.concat(this.bufs);
    const rest = all.subarray(n);
    this.bufs = rest.length ? [rest] : [];
    this.have = rest.length;
    return all.subarray(0, n);
  }
}
