// The remote cache's data writes: on Bun's thread pool, so that a write the kernel throttles
// (dirty pages) never stalls the event loop, except small ones while the pool is idle, which cost
// less written at once than handed over and back. Bounded: beyond MAX_PENDING bytes waiting for
// the disk, the cache is told to serve bytes without keeping them.
import { write as fsWrite, writeSync } from "node:fs";

/** Most bytes of data writes waiting for the disk; beyond, new blocks are served but not kept. */
const MAX_PENDING = 64 * 1024 * 1024;
/** Chunks up to this size are written synchronously while the pool is idle (see write()). */
const SYNC_WRITE_MAX = 16 * 1024;
/** A synchronous write slower than this sends small writes to the pool for SLOW_WRITE_HOLD_MS. */
const SLOW_WRITE_MS = 1;
const SLOW_WRITE_HOLD_MS = 10_000;

export class DataWriter {
  private inflight = 0;
  private pendingBytes = 0;
  private drained: (() => void) | null = null;
  /** When a small synchronous write last took longer than SLOW_WRITE_MS (Date.now()), or 0. */
  slowWriteAt = 0;

  constructor(private readonly fd: number) {}

  /** Data writes on the thread pool now. */
  get writesInFlight(): number { return this.inflight; }

  /** Whether `bytes` more may wait for the disk (MAX_PENDING). */
  hasRoom(bytes: number): boolean {
    return this.pendingBytes + bytes <= MAX_PENDING;
  }

  /**
   * Write `chunk` at `pos`. Returns true when it is done already (written at once); otherwise
   * `done` is called when it ends (with the error of a failed or short write), and `chunk` must
   * not change until then. Throws the error of a failed synchronous write.
   *
   * Small chunks (a piece GET's 4 KiB) go synchronously while nothing is in flight: handing one
   * to the pool and back costs two thread wake-ups, ~30 µs of CPU per cold 4 KiB read at QD1 on
   * the benchmark VM, against a few µs for the write. Unless a write like it was slow lately: the
   * kernel throttling dirty pages, which is what the pool is for.
   */
  write(chunk: Uint8Array, pos: number, done: (err: Error | null) => void): boolean {
    if (chunk.length <= SYNC_WRITE_MAX && this.inflight === 0 && Date.now() - this.slowWriteAt > SLOW_WRITE_HOLD_MS) {
      const t0 = performance.now();
      writeFull(this.fd, chunk, pos);
      if (performance.now() - t0 > SLOW_WRITE_MS) this.slowWriteAt = Date.now();
      return true;
    }
    this.inflight++;
    this.pendingBytes += chunk.length;
    fsWrite(this.fd, chunk, 0, chunk.length, pos, (err, n) => {
      this.inflight--;
      this.pendingBytes -= chunk.length;
      done(err ?? (n !== chunk.length ? new Error(`short write (${n} of ${chunk.length} bytes)`) : null));
      if (this.inflight === 0) this.drained?.();
    });
    return false;
  }

  /** Resolves once no write is in flight (a descriptor closed under one could be reused by another file). */
  idle(): Promise<void> {
    if (this.inflight === 0) return Promise.resolve();
    return new Promise<void>((resolve) => { this.drained = resolve; });
  }
}

export function writeFull(fd: number, buf: Uint8Array, pos: number): void {
  let done = 0;
  while (done < buf.length) done += writeSync(fd, buf, done, buf.length - done, pos + done);
}
