// Cold-path reads of container metadata (headers, footers, directories): `len` bytes at `pos`,
// fewer only at the end of the file.
import { readSync } from "node:fs";

export function readAt(fd: number, len: number, pos: number): Uint8Array {
  const b = new Uint8Array(len);
  let done = 0;
  while (done < len) {
    const r = readSync(fd, b, done, len - done, pos + done);
    if (r === 0) break;
    done += r;
  }
  return b.subarray(0, done);
}
