// The partition filter: a bounded view [start, start+length) of the device below, like nbdkit's
// partition filter. Reads, writes, trims, zeroes and cache hints are shifted by `start` (the
// checked wrapper above has already confined them to the view), block status is shifted back and
// clipped to the view, and zero-copy file ranges pass through (the bytes are not transformed).
// The disk's device is shared by its own export and its partition views (shareDevice): it is
// closed when the last of them closes, so the server may flush and close them in any order.
import { Passthrough } from "./passthrough.ts";
import type { BlockDevice, DeviceRecipe, ExtentSink, FileRange, Maybe, MetaContextProvider } from "./types.ts";

/** A sink that moves extents from the device's offsets to the view's, clipped to [0, length). */
function shifted(sink: ExtentSink, start: number, length: number): ExtentSink {
  return {
    add(offset: number, len: number, type: number): boolean {
      let from = offset - start;
      let to = from + len;
      if (from < 0) from = 0;
      if (to > length) to = length;
      if (to <= from) return to < length; // before the view: keep going; past it: stop
      return sink.add(from, to - from, type) && to < length;
    },
  };
}

export class PartitionView extends Passthrough {
  constructor(next: BlockDevice, private readonly start: number, private readonly length: number) {
    super(next);
    const total = next.size();
    if (!Number.isSafeInteger(start) || !Number.isSafeInteger(length) || start < 0 || length <= 0 || start + length > total) {
      throw new Error(`partition [${start}, +${length}) does not fit in a device of ${total} bytes`);
    }
  }

  override size(): number { return this.length; }
  override pread(buf: Uint8Array, offset: number, flags: number): Maybe { return this.next.pread(buf, offset + this.start, flags); }
  override pwrite(buf: Uint8Array, offset: number, flags: number): Maybe { return this.next.pwrite!(buf, offset + this.start, flags); }
  override trim(offset: number, length: number, flags: number): Maybe { return this.next.trim!(offset + this.start, length, flags); }
  override zero(offset: number, length: number, flags: number): Maybe { return this.next.zero!(offset + this.start, length, flags); }
  override cache(offset: number, length: number, flags: number): Maybe { return this.next.cache?.(offset + this.start, length, flags); }

  override extents(offset: number, length: number, flags: number, sink: ExtentSink): Maybe {
    if (!this.next.extents) { sink.add(offset, length, 0); return; }
    return this.next.extents(offset + this.start, length, flags, shifted(sink, this.start, this.length));
  }

  fileRange(offset: number, length: number, out: FileRange): boolean {
    return this.next.fileRange?.(offset + this.start, length, out) ?? false;
  }

  recipe(): DeviceRecipe | null {
    const inner = this.next.recipe?.() ?? null;
    return inner && { kind: "partition", start: this.start, length: this.length, inner };
  }

  override metaContexts(): MetaContextProvider[] {
    return (this.next.metaContexts?.() ?? []).map((p) => ({
      name: p.name,
      extents: (offset: number, length: number, flags: number, sink: ExtentSink) =>
        p.extents(offset + this.start, length, flags, shifted(sink, this.start, this.length)),
    }));
  }

}

/** One holder's handle on a shared device: bytes pass unchanged, close releases this holder only. */
class SharedHandle extends Passthrough {
  private released = false;
  constructor(next: BlockDevice, private readonly owner: { refs: number }) { super(next); }
  fileRange(offset: number, length: number, out: FileRange): boolean {
    return this.next.fileRange?.(offset, length, out) ?? false;
  }
  recipe(): DeviceRecipe | null {
    return this.next.recipe?.() ?? null;
  }
  override close(): Maybe {
    if (this.released) return;
    this.released = true;
    if (--this.owner.refs === 0) return this.next.close?.();
  }
}

/** `n` handles on `dev`; the device is closed when the last handle is. */
export function shareDevice(dev: BlockDevice, n: number): BlockDevice[] {
  const owner = { refs: n };
  return Array.from({ length: n }, () => new SharedHandle(dev, owner));
}
