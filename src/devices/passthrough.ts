// Base class for filters: every callback forwards to `next` unless overridden. A filter that
// changes writability (or anything capabilities depend on) must override capabilities() and answer
// every dependent capability itself (the nbdkit cow-filter lesson in DESIGN.md).
import type { BlockDevice, BlockSize, Capabilities, ExtentSink, Maybe, MetaContextProvider } from "./types.ts";

export class Passthrough implements BlockDevice {
  constructor(protected readonly next: BlockDevice) {}
  size(): number { return this.next.size(); }
  blockSize(): BlockSize | undefined { return this.next.blockSize?.(); }
  capabilities(): Capabilities { return this.next.capabilities(); }
  pread(buf: Uint8Array, offset: number, flags: number): Maybe { return this.next.pread(buf, offset, flags); }
  pwrite(buf: Uint8Array, offset: number, flags: number): Maybe { return this.next.pwrite!(buf, offset, flags); }
  flush(flags: number): Maybe { return this.next.flush?.(flags); }
  trim(offset: number, length: number, flags: number): Maybe { return this.next.trim!(offset, length, flags); }
  zero(offset: number, length: number, flags: number): Maybe { return this.next.zero!(offset, length, flags); }
  extents(offset: number, length: number, flags: number, sink: ExtentSink): Maybe {
    if (this.next.extents) return this.next.extents(offset, length, flags, sink);
    sink.add(offset, length, 0);
  }
  cache(offset: number, length: number, flags: number): Maybe { return this.next.cache?.(offset, length, flags); }
  metaContexts(): MetaContextProvider[] { return this.next.metaContexts?.() ?? []; }
  close(): Maybe { return this.next.close?.(); }
}
