// The output buffer both server transports gather small replies in (socket-transport.ts while a
// data callback is corked, blocking-transport.ts while a thread handles one receive): small sends
// are copied in, small replies are built in place (reserve/commit), and the whole batch leaves
// with one send when it is full or its owner flushes it.

/** The batch's size. */
export const BATCH_SIZE = 256 * 1024;
/** Sends up to this size are copied into the batch; larger ones go out directly. */
export const SMALL_SEND = 64 * 1024;
/**
 * Replies up to this size are built in place in the batch (reserve): a 64 KiB read with its
 * chunk header fits, so a device that reads into memory (a cooked CD view, an overlay) fills the
 * batch directly instead of an allocated buffer that is then copied into it.
 */
export const IN_PLACE_MAX = SMALL_SEND + 64;

export class OutputBatch {
  private buf = new Uint8Array(BATCH_SIZE);
  /** Bytes in the batch. */
  length = 0;

  /** `out` sends a full batch, or what flush() finds; the batch is reused once it returns (`more`: a payload follows). */
  constructor(private readonly out: (b: Uint8Array, more: boolean) => void) {}

  /** Copy `b` in (sending the batch first if `b` does not fit); false when `b` is too large to batch. */
  add(b: Uint8Array): boolean {
    if (b.length > SMALL_SEND) return false;
    if (this.length + b.length > BATCH_SIZE) this.flush();
    this.buf.set(b, this.length);
    this.length += b.length;
    return true;
  }

  /** Room for `length` bytes, to be filled in place and then committed; null when too large. */
  reserve(length: number): Uint8Array | null {
    if (length > IN_PLACE_MAX) return null;
    if (this.length + length > BATCH_SIZE) this.flush();
    return this.buf.subarray(this.length, this.length + length);
  }

  /** The reserved bytes are filled: they are part of the output now. */
  commit(length: number): void {
    this.length += length;
  }

  /** Someone keeps the reserved region (an asynchronous read fills it later): send, take a new buffer. */
  detach(): void {
    this.flush();
    this.buf = new Uint8Array(BATCH_SIZE);
  }

  /** Send what the batch holds. */
  flush(more = false): void {
    if (this.length === 0) return;
    const b = this.buf.subarray(0, this.length);
    this.length = 0;
    this.out(b, more);
  }

  /** Forget what the batch holds (the connection is being dropped). */
  clear(): void {
    this.length = 0;
  }
}
