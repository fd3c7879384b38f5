// The Transport of a connection served on a thread of its own (connection-thread.ts): a blocking
// socket. Replies gather in one buffer while the requests of one receive are handled and leave
// with one send at its end (flush), which waits for room; a READ payload from a file goes with
// sendfile(2) behind its header. Nothing stays queued after flush(), so there is no backpressure
// to report and no `drain`.
import { recvNow, sendfileWait, sendWait } from "../sys/libc.ts";
import type { Transport } from "./types.ts";

const BATCH_SIZE = 256 * 1024;
/** Sends up to this size are copied into the batch; larger ones go out at once (after the batch). */
const SMALL_SEND = 64 * 1024;
/** Replies up to this size are built in place in the batch (a 64 KiB read with its chunk header). */
const IN_PLACE_MAX = SMALL_SEND + 64;

export class BlockingTransport implements Transport {
  private batch = new Uint8Array(BATCH_SIZE);
  private batchLen = 0;
  /** The session paused reading (in-flight limit, disconnect): the thread does not receive. */
  paused = false;
  /** end() or destroy() was called: the thread closes the socket after the last flush. */
  ending = false;
  /** A send failed (the client went away): nothing more is sent. */
  broken = false;

  constructor(readonly fd: number) {}

  send(b: Uint8Array): void {
    if (b.length <= SMALL_SEND) {
      if (this.batchLen + b.length > BATCH_SIZE) this.flush();
      this.batch.set(b, this.batchLen);
      this.batchLen += b.length;
      return;
    }
    this.flush(true);
    this.out(b, false);
  }

  /** The same as send(): small sends are copied, large ones are sent before this returns. */
  sendTransient(b: Uint8Array): void {
    this.send(b);
  }

  sendFile(header: Uint8Array, fd: number, offset: number, length: number, release?: (() => void) | null): void {
    try {
      this.flush(true);
      this.out(header, true);
      if (this.broken) return;
      let sent = 0;
      try {
        sent = sendfileWait(this.fd, fd, offset, length);
      } catch (e) {
        // EPIPE, ECONNRESET: the client hung up; EIO from the file cannot be told apart mid-reply.
        // Either way the stream is cut short, so the connection ends (as the event loop's path does).
        this.broken = true;
        return;
      }
      // The file ended before the range did (it shrank under us): the rest reads as zeros.
      if (sent < length) this.out(new Uint8Array(length - sent), false);
    } finally {
      release?.();
    }
  }

  reserve(length: number): Uint8Array | null {
    if (length > IN_PLACE_MAX) return null;
    if (this.batchLen + length > BATCH_SIZE) this.flush();
    return this.batch.subarray(this.batchLen, this.batchLen + length);
  }

  commit(length: number): void {
    this.batchLen += length;
  }

  detach(): void {
    this.flush();
    this.batch = new Uint8Array(BATCH_SIZE);
  }

  recvInto(dst: Uint8Array, off: number, len: number): number {
    return recvNow(this.fd, dst, off, len);
  }

  queued(): number { return this.batchLen; }
  pause(): void { this.paused = true; }
  resume(): void { this.paused = false; }
  end(): void { this.ending = true; }
  destroy(): void {
    this.ending = true;
    this.broken = true;
    this.batchLen = 0;
  }

  /** Send what the batch holds (MSG_MORE with `more`: a payload follows at once). */
  flush(more = false): void {
    if (this.batchLen === 0) return;
    const n = this.batchLen;
    this.batchLen = 0;
    this.out(this.batch.subarray(0, n), more);
  }

  private out(b: Uint8Array, more: boolean): void {
    if (this.broken) return;
    try {
      sendWait(this.fd, b, 0, b.length, more);
    } catch {
      this.broken = true;
    }
  }
}
