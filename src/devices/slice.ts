// A read-only plugin over a byte range of a file stored verbatim (a stored zip member): reads are
// positional reads at an offset, and fileRange hands the range to sendfile(2).
import { closeSync, readSync } from "node:fs";
import { willNeed } from "../sys/libc.ts";
import { caps, type BlockDevice, type Capabilities, type FileRange } from "./types.ts";

/** Damaged or missing image data: logged by the server as an error (not a client mistake), answered with EIO. */
function damaged(msg: string): Error {
  return Object.assign(new Error(msg), { code: "EIO" });
}

const READ_ONLY: Capabilities = Object.freeze(caps({ canWrite: false, canFlush: false, canCache: true, canMultiConn: true }));

export class FileSlice implements BlockDevice {
  private closed = false;
  /** `fd` is owned (closed by close()). */
  constructor(readonly label: string, readonly fd: number, readonly offset: number, readonly length: number) {}

  size(): number { return this.length; }
  capabilities(): Capabilities { return READ_ONLY; }

  fileRange(offset: number, _length: number, out: FileRange): boolean {
    out.fd = this.fd;
    out.offset = this.offset + offset;
    return true;
  }

  pread(buf: Uint8Array, offset: number): void {
    let done = 0;
    while (done < buf.length) {
      const n = readSync(this.fd, buf, done, buf.length - done, this.offset + offset + done);
      if (n === 0) throw damaged(`${this.label}: file ends before byte ${this.offset + offset + done} (truncated?)`);
      done += n;
    }
  }

  cache(offset: number, length: number): void {
    willNeed(this.fd, this.offset + offset, length);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    closeSync(this.fd);
  }
}
