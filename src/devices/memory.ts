// A sparse in-memory device: pages are allocated on first write, so exports of any size up to
// 2^53 bytes cost only what is written. Used by tests (sizes around 2^31, 2^32, 2^53) and by
// `serve --memory SIZE`.
import { type BlockDevice, type Capabilities, type ExtentSink, caps, EXTENT_HOLE, EXTENT_ZERO, MAY_TRIM } from "./types.ts";

const PAGE = 4096;

export class MemoryDevice implements BlockDevice {
  private readonly pages = new Map<number, Uint8Array>();
  constructor(private readonly bytes: number) {
    if (!Number.isInteger(bytes) || bytes < 0 || bytes > 2 ** 53) throw new Error(`invalid memory device size ${bytes}`);
  }
  size(): number { return this.bytes; }
  capabilities(): Capabilities {
    return caps({ canWrite: true, canFlush: true, canFua: true, canTrim: true, canZero: true, canFastZero: true, canCache: true, canExtents: true });
  }
  /** Bytes of memory in use (pages allocated). */
  allocated(): number { return this.pages.size * PAGE; }

  pread(buf: Uint8Array, offset: number): void {
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const idx = Math.floor(pos / PAGE);
      const within = pos - idx * PAGE;
      const n = Math.min(PAGE - within, buf.length - done);
      const page = this.pages.get(idx);
      if (page) buf.set(page.subarray(within, within + n), done);
      else buf.fill(0, done, done + n);
      done += n;
    }
  }

  pwrite(buf: Uint8Array, offset: number): void {
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const idx = Math.floor(pos / PAGE);
      const within = pos - idx * PAGE;
      const n = Math.min(PAGE - within, buf.length - done);
      let page = this.pages.get(idx);
      if (!page) this.pages.set(idx, (page = new Uint8Array(PAGE)));
      page.set(buf.subarray(done, done + n), within);
      done += n;
    }
  }

  flush(): void {}

  trim(offset: number, length: number): void {
    this.zero(offset, length, MAY_TRIM);
  }

  zero(offset: number, length: number, _flags: number): void {
    const end = offset + length;
    const first = Math.ceil(offset / PAGE);   // first whole page in the range
    const last = Math.floor(end / PAGE);      // one past the last whole page
    if (first >= last) { this.zeroPartial(offset, end); return; }
    this.zeroPartial(offset, first * PAGE);
    this.zeroPartial(last * PAGE, end);
    // Whole pages: walk whichever is smaller, the range or the allocated pages, so zeroing a
    // huge sparse export (one extended-header request may cover all of it) costs what is stored.
    if (last - first <= this.pages.size) {
      for (let i = first; i < last; i++) this.pages.delete(i);
    } else {
      for (const k of [...this.pages.keys()]) if (k >= first && k < last) this.pages.delete(k);
    }
  }

  private zeroPartial(from: number, to: number): void {
    if (from >= to) return;
    const idx = Math.floor(from / PAGE);
    this.pages.get(idx)?.fill(0, from - idx * PAGE, to - idx * PAGE);
  }

  extents(offset: number, length: number, _flags: number, sink: ExtentSink): void {
    const end = offset + length;
    let pos = Math.floor(offset / PAGE) * PAGE;
    // Walk allocated pages in order; for huge sparse ranges jump over holes using the sorted keys.
    const keys = [...this.pages.keys()].filter((k) => k * PAGE + PAGE > offset && k * PAGE < end).sort((a, b) => a - b);
    for (const k of keys) {
      const start = k * PAGE;
      if (start > pos && !sink.add(pos, start - pos, EXTENT_HOLE | EXTENT_ZERO)) return;
      if (!sink.add(start, PAGE, 0)) return;
      pos = start + PAGE;
    }
    if (pos < end) sink.add(pos, end - pos, EXTENT_HOLE | EXTENT_ZERO);
  }

  cache(): void {}
}
