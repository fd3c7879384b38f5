// The overlay file's I/O seam: every read, write, sync, truncate and hole punch an open overlay does
// on its qcow2 file goes through an ImageFile (plain positional I/O here; recording or failing ones
// in tests), watched for the first failed sync or write (fsyncgate). The base is read in base.ts.
import { closeSync, fdatasync, fdatasyncSync, fstatSync, ftruncateSync, writeSync } from "node:fs";
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate } from "../../sys/libc.ts";
import { eio } from "../../protocol/errors.ts";
import type { FailureLatch } from "../failure.ts";
import { readFull, writeAll } from "./format.ts";

export interface ImageFile {
  /** Read exactly `len` bytes at `pos` into buf[off..], zero-filling past the end of the file. */
  read(buf: Uint8Array, off: number, len: number, pos: number): void;
  /** Write guest data buf[off, off+len) at `pos` (a short write is an NbdError EIO). */
  write(buf: Uint8Array, off: number, len: number, pos: number): void;
  /** Write metadata: all of `buf` at `pos` (a short write is an Error with code EIO). */
  writeAll(buf: Uint8Array, pos: number): void;
  /** fdatasync, blocking: for the few steps that must be durable before the next one starts. */
  syncNow(): void;
  /** fdatasync off the event loop: the flush's two barriers. */
  sync(): Promise<void>;
  size(): number;
  truncate(len: number): void;
  /** Deallocate [pos, pos+len) keeping the file size; throws where the file system cannot. */
  punch(pos: number, len: number): void;
  close(): void;
}

/** Synchronous positional I/O on a file descriptor (page-cached reads and writes are fastest so). */
export class FdFile implements ImageFile {
  constructor(readonly fd: number) {}

  read(buf: Uint8Array, off: number, len: number, pos: number): void {
    readFull(this.fd, buf, off, len, pos);
  }

  write(buf: Uint8Array, off: number, len: number, pos: number): void {
    let done = 0;
    while (done < len) {
      const n = writeSync(this.fd, buf, off + done, len - done, pos + done);
      if (n <= 0) throw eio("short write to the overlay");
      done += n;
    }
  }

  writeAll(buf: Uint8Array, pos: number): void {
    writeAll(this.fd, buf, pos);
  }

  syncNow(): void {
    fdatasyncSync(this.fd);
  }

  sync(): Promise<void> {
    return new Promise((resolve, reject) => fdatasync(this.fd, (err) => (err ? reject(err) : resolve())));
  }

  size(): number {
    return fstatSync(this.fd).size;
  }

  truncate(len: number): void {
    ftruncateSync(this.fd, len);
  }

  punch(pos: number, len: number): void {
    fallocate(this.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, pos, len);
  }

  close(): void {
    closeSync(this.fd);
  }
}

/** Passes every call through, noting failed writes and syncs in the overlay's latch (fsyncgate). */
export class WatchedFile implements ImageFile {
  constructor(private readonly inner: ImageFile, private readonly latch: FailureLatch) {}

  read(buf: Uint8Array, off: number, len: number, pos: number): void {
    this.inner.read(buf, off, len, pos);
  }

  write(buf: Uint8Array, off: number, len: number, pos: number): void {
    try {
      this.inner.write(buf, off, len, pos);
    } catch (e) {
      throw this.latch.note(e, "write");
    }
  }

  writeAll(buf: Uint8Array, pos: number): void {
    try {
      this.inner.writeAll(buf, pos);
    } catch (e) {
      throw this.latch.note(e, "write");
    }
  }

  syncNow(): void {
    try {
      this.inner.syncNow();
    } catch (e) {
      throw this.latch.note(e, "fdatasync");
    }
  }

  sync(): Promise<void> {
    return this.inner.sync().catch((e: unknown) => { throw this.latch.note(e, "fdatasync"); });
  }

  size(): number { return this.inner.size(); }

  truncate(len: number): void {
    try {
      this.inner.truncate(len);
    } catch (e) {
      throw this.latch.note(e, "truncate");
    }
  }

  /** Optional space reclamation: callers ignore its errors. */
  punch(pos: number, len: number): void { this.inner.punch(pos, len); }

  close(): void { this.inner.close(); }
}
