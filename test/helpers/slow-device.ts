// A deliberately slow, asynchronous, read-only block device for tests (the shape a remote HTTP/S3
// plugin will have): every pread and extents call answers after a seeded random delay of a few
// milliseconds, so requests complete out of order; reads of [failFrom, failTo) fail with EIO. It
// counts reads, concurrency and closes.
import { eio } from "../../src/protocol/errors.ts";
import { caps, EXTENT_HOLE, EXTENT_ZERO, type BlockDevice, type BlockSize, type Capabilities, type ExtentSink } from "../../src/devices/types.ts";

export class SlowDevice implements BlockDevice {
  reads = 0;
  inflight = 0;
  maxInflight = 0;
  closes = 0;
  private x: number;

  constructor(readonly data: Uint8Array, private readonly o: { maxDelayMs?: number; seed?: number; minimum?: number; failFrom?: number; failTo?: number } = {}) {
    this.x = (o.seed ?? 0x9e3779b9) >>> 0 || 1;
  }

  size(): number { return this.data.length; }
  blockSize(): BlockSize { return { minimum: this.o.minimum ?? 1, preferred: 4096, maximum: 8 * 1024 * 1024 }; }
  capabilities(): Capabilities { return caps({ canExtents: true }); }

  private delay(): number {
    let x = this.x;
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    this.x = x;
    return x % ((this.o.maxDelayMs ?? 3) + 1);
  }

  private later<T>(fn: () => T): Promise<T> {
    this.inflight++;
    this.maxInflight = Math.max(this.maxInflight, this.inflight);
    return new Promise((resolve, reject) => setTimeout(() => {
      this.inflight--;
      try { resolve(fn()); } catch (e) { reject(e); }
    }, this.delay()));
  }

  pread(buf: Uint8Array, offset: number, _flags: number): Promise<void> {
    if (this.closes > 0) return Promise.reject(new Error("SlowDevice: read after close"));
    const min = this.o.minimum ?? 1;
    if (offset % min !== 0 || buf.length % min !== 0) return Promise.reject(new Error(`SlowDevice: unaligned read ${offset}+${buf.length}`));
    if (offset + buf.length > this.data.length) return Promise.reject(new Error(`SlowDevice: read past the end ${offset}+${buf.length}`));
    this.reads++;
    const bad = this.o.failFrom !== undefined && offset < this.o.failTo! && offset + buf.length > this.o.failFrom;
    return this.later(() => {
      if (bad) throw eio(`SlowDevice: medium error at ${offset}+${buf.length}`);
      buf.set(this.data.subarray(offset, offset + buf.length));
    });
  }

  /** 64 KiB chunks of zeros are holes; reported from the chunk boundary before `offset`. */
  extents(offset: number, length: number, _flags: number, sink: ExtentSink): Promise<void> {
    return this.later(() => {
      const step = 65536;
      for (let p = Math.floor(offset / step) * step; p < offset + length; p += step) {
        const chunk = this.data.subarray(p, Math.min(p + step, this.data.length));
        const zero = chunk.every((b) => b === 0);
        if (!sink.add(p, chunk.length, zero ? EXTENT_HOLE | EXTENT_ZERO : 0)) return;
      }
    });
  }

  close(): void {
    this.closes++;
  }
}
