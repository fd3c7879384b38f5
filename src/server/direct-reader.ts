// Receiving without Bun's copy: once a data callback shows a stream (a large chunk), the transmission
// phase reads what the socket still holds straight into a reused buffer with recv(2), instead of
// waiting for Bun, which copies every read into a freshly allocated chunk (0.5-0.6 CPU-s per GiB
// received here, against 0.2 for recv into a reused buffer).
//
// The buffer is reused, so nothing may keep a view of it past the receive call: the receiver marks
// it `held` when it does (a backlog kept while paused, or a WRITE payload that a device finishes
// asynchronously) and the reader takes a fresh buffer for the next read.

/** Size of the reused receive buffer. */
const BUFFER = 256 * 1024;
/** At most this much is read per data callback, so one busy client does not starve the others. */
const BUDGET = 4 * 1024 * 1024;
/** A chunk from Bun at least this large means the client is streaming: read on directly. */
export const STREAM_CHUNK = 64 * 1024;
/** WRITE payloads at least this large in this reader's buffer get a buffer of their own. */
const OWN_PAYLOAD = 32 * 1024;

export class DirectReader {
  private buf: Uint8Array | null = null;
  /** The chunk being received is this reader's buffer. */
  active = false;
  /** Something kept a view of the current buffer: the next read goes to a fresh one. */
  held = false;

  constructor(private readonly recv: (dst: Uint8Array, off: number, len: number) => number) {}

  /**
   * Read what the socket holds and pass it to `receive`, while `go()` allows and at most BUDGET
   * bytes. A read that does not fill the buffer means the socket is empty: no further recv(2).
   */
  drain(receive: (chunk: Uint8Array) => void, go: () => boolean): void {
    let budget = BUDGET;
    while (budget > 0 && go()) {
      let b = this.buf;
      if (b === null || this.held) {
        b = this.buf = Buffer.allocUnsafe(BUFFER);
        this.held = false;
      }
      const n = this.recv(b, 0, b.length);
      if (n === 0) return;
      budget -= n;
      this.active = true;
      try {
        receive(n === b.length ? b : b.subarray(0, n));
      } finally {
        this.active = false;
      }
      if (n < b.length) return;
    }
  }

  /**
   * The rest of a payload that spans chunks, read straight into `p` from `fill` (one copy, not two,
   * and no chunk allocated for it); returns the new fill. What is not there yet comes with later chunks.
   */
  fill(p: Uint8Array, fill: number): number {
    for (let k = 1; k > 0 && fill < p.length;) {
      k = this.recv(p, fill, p.length - fill);
      fill += k;
    }
    return fill;
  }

  /** A WRITE payload seen as `view` of the chunk: itself, or a copy when large and in the reused buffer. */
  payload(view: Uint8Array): Uint8Array {
    return this.active && view.length >= OWN_PAYLOAD ? Buffer.from(view) : view;
  }

  /** The receiver keeps a view of the chunk it is given (only matters for this reader's own buffer). */
  hold(): void {
    if (this.active) this.held = true;
  }
}
