// The Transport of a connection served on a thread of its own (connection-thread.ts): a blocking
// socket. Replies gather in one buffer while the requests of one receive are handled and leave
// with one send at its end (flush), which waits for room; a READ payload from a file goes with
// sendfile(2) behind its header (or read and sent from a buffer while other threads do the same,
// see copySend). Nothing stays queued after flush(), so there is no backpressure
// to report and no `drain`.
import { readSync } from "node:fs";
import { recvNow, sendfileWait, sendWait } from "../sys/libc.ts";
import { OutputBatch } from "./output-batch.ts";
import type { Transport } from "./types.ts";

/** copySend's buffer (per thread), as the event loop's (socket-transport.ts SCRATCH). */
const COPY_SIZE = 512 * 1024;

export class BlockingTransport implements Transport {
  private readonly batch = new OutputBatch((b, more) => this.out(b, more));
  /** The session paused reading (in-flight limit, disconnect): the thread does not receive. */
  paused = false;
  /** end() or destroy() was called: the thread closes the socket after the last flush. */
  ending = false;
  /** A send failed (the client went away): nothing more is sent. */
  broken = false;

  /** This connection has sent a file range (it counts in `readers`). */
  private bulk = false;
  private scratch: Uint8Array | null = null;

  /**
   * `readers`: how many threaded connections of this process have sent file ranges (one Int32,
   * shared by every thread; see sendFile).
   */
  constructor(readonly fd: number, private readonly readers: Int32Array) {}

  /** The connection ends: it no longer counts as a reader. */
  closed(): void {
    if (this.bulk) Atomics.sub(this.readers, 0, 1);
    this.bulk = false;
  }

  /**
   * pread into a buffer of this thread's and send from there: with two or more threads sending
   * file ranges at once, nbdcopy's two connections ran at 1714-1856 MB/s this way against
   * 1547-1598 with sendfile (alternating runs); one fio reader did better with sendfile.
   * Returns the bytes sent (less than `length` only when the file ended first).
   */
  private copySend(fd: number, offset: number, length: number): number {
    const b = (this.scratch ??= new Uint8Array(COPY_SIZE));
    let sent = 0;
    while (sent < length) {
      const n = readSync(fd, b, 0, Math.min(b.length, length - sent), offset + sent);
      if (n === 0) break;
      sendWait(this.fd, b, 0, n);
      sent += n;
    }
    return sent;
  }

  send(b: Uint8Array): void {
    if (this.batch.add(b)) return;
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
      if (!this.bulk) {
        this.bulk = true;
        Atomics.add(this.readers, 0, 1);
      }
      let sent = 0;
      try {
        sent = Atomics.load(this.readers, 0) > 1 ? this.copySend(fd, offset, length) : sendfileWait(this.fd, fd, offset, length);
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
    return this.batch.reserve(length);
  }

  commit(length: number): void {
    this.batch.commit(length);
  }

  detach(): void {
    this.batch.detach();
  }

  recvInto(dst: Uint8Array, off: number, len: number): number {
    return recvNow(this.fd, dst, off, len);
  }

  queued(): number { return this.batch.length; }
  pause(): void { this.paused = true; }
  resume(): void { this.paused = false; }
  end(): void { this.ending = true; }
  destroy(): void {
    this.ending = true;
    this.broken = true;
    this.batch.clear();
  }

  /** Send what the batch holds (MSG_MORE with `more`: a payload follows at once). */
  flush(more = false): void {
    this.batch.flush(more);
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
