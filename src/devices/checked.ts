// The checked wrapper at the top of every export. It asks the device stack for its capabilities
// once, enforces the dependencies between them (no write => no trim/zero/fua; no zero => no fast
// zero), range-checks every request, and emulates what the stack lacks (zero via writes of a
// shared zero buffer, FUA via flush). Dispatch talks only to this.
import {
  DEFAULT_MAX_PAYLOAD, DEFAULT_MIN_BLOCK, DEFAULT_PREFERRED_BLOCK, MAX_SAFE_OFFSET,
  NBD_EINVAL, NBD_ENOSPC, NBD_ENOTSUP, NBD_EPERM,
  NBD_FLAG_CAN_MULTI_CONN, NBD_FLAG_HAS_FLAGS, NBD_FLAG_READ_ONLY, NBD_FLAG_ROTATIONAL, NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_FAST_ZERO, NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES,
  BASE_ALLOCATION,
} from "../protocol/constants.ts";
import { NbdError } from "../protocol/errors.ts";
import {
  type BlockDevice, type BlockSize, type Capabilities, type ExtentSink, type ExportSpec, type FileRange, type Maybe,
  type MetaContextProvider, FAST_ZERO, FUA, isPromise,
} from "./types.ts";

const ZERO_CHUNK = 1024 * 1024;
let zeroBuffer: Uint8Array | undefined;
function zeros(): Uint8Array {
  return (zeroBuffer ??= new Uint8Array(ZERO_CHUNK));
}

/** A metadata context as offered to clients: base:allocation or one the device provides. */
export interface ExportContext {
  name: string;
  extents(offset: number, length: number, flags: number, sink: ExtentSink): Maybe;
}

export class CheckedExport {
  readonly name: string;
  readonly description: string;
  readonly device: BlockDevice;
  readonly size: number;
  readonly caps: Readonly<Capabilities>;
  readonly blockSize: Readonly<BlockSize>;
  /** Transmission flags without SEND_DF (which depends on structured replies, per session). */
  readonly flags: number;
  readonly contexts: readonly ExportContext[];
  /** True if zero() is emulated with writes. */
  private readonly emulateZero: boolean;
  private readonly emulateFua: boolean;

  constructor(spec: ExportSpec, opts: { readOnly?: boolean } = {}) {
    const dev = spec.device;
    this.name = spec.name;
    this.description = spec.description ?? "";
    this.device = dev;
    const size = dev.size();
    if (!Number.isInteger(size) || size < 0 || size > MAX_SAFE_OFFSET) {
      throw new Error(`export ${spec.name}: size ${size} is not representable (max 2^53)`);
    }
    this.size = size;
    const c = { ...dev.capabilities() };
    if (opts.readOnly) c.canWrite = false;
    // Dependencies, enforced in one place.
    if (!c.canWrite) { c.canTrim = false; c.canZero = false; c.canFua = false; c.canFastZero = false; }
    if (!dev.pwrite) c.canWrite = false;
    if (!dev.trim) c.canTrim = false;
    if (!dev.zero) c.canZero = false;
    if (!dev.flush) { c.canFlush = false; c.canFua = false; }
    if (!c.canZero) c.canFastZero = false;
    if (!dev.extents) c.canExtents = false;
    this.caps = Object.freeze(c);
    this.emulateZero = c.canWrite && !c.canZero;
    this.emulateFua = c.canWrite && !c.canFua && c.canFlush;

    const bs = dev.blockSize?.();
    this.blockSize = Object.freeze(bs ?? { minimum: DEFAULT_MIN_BLOCK, preferred: DEFAULT_PREFERRED_BLOCK, maximum: DEFAULT_MAX_PAYLOAD });

    let f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_CACHE;
    if (!c.canWrite) f |= NBD_FLAG_READ_ONLY;
    else {
      f |= NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
      if (c.canFua || c.canFlush) f |= NBD_FLAG_SEND_FUA;
      if (c.canTrim) f |= NBD_FLAG_SEND_TRIM;
    }
    if (c.canFlush) f |= NBD_FLAG_SEND_FLUSH;
    if (c.canMultiConn) f |= NBD_FLAG_CAN_MULTI_CONN;
    if (c.isRotational) f |= NBD_FLAG_ROTATIONAL;
    this.flags = f;

    const base: ExportContext = {
      name: BASE_ALLOCATION,
      extents: c.canExtents
        ? (o, l, fl, sink) => dev.extents!(o, l, fl, sink)
        : (o, l, _fl, sink) => { sink.add(o, l, 0); },
    };
    const extra: MetaContextProvider[] = dev.metaContexts?.() ?? [];
    this.contexts = [base, ...extra];
  }

  // Range checks. `offset` < 2^53 and `length` < 2^32 are exact (the codec rejects larger
  // offsets), but their sum may not be: 2^53-1 + 2 rounds to 2^53. Subtract instead, which is
  // exact; once this passes, offset + length <= size <= 2^53 is exact too.
  private checkRange(offset: number, length: number, errno: number): void {
    if (offset > this.size || length > this.size - offset) {
      throw new NbdError(errno, `request [${offset}, +${length}) is beyond the export size ${this.size}`);
    }
  }
  private checkWritable(what: string): void {
    if (!this.caps.canWrite) throw new NbdError(NBD_EPERM, `${what} on a read-only export`);
  }

  /**
   * Where [offset, +length) lives verbatim in a file, for sendfile(2); false when the stack
   * transforms the bytes (or the range is out of bounds: read() reports that error).
   */
  fileRange(offset: number, length: number, out: FileRange): boolean {
    if (!this.device.fileRange || offset > this.size || length > this.size - offset) return false;
    out.release = null;
    return this.device.fileRange(offset, length, out);
  }

  /** See BlockDevice.whenInFile; null when the device does not fill a file, or out of bounds. */
  whenInFile(offset: number, length: number): Promise<void> | null {
    if (!this.device.whenInFile || offset > this.size || length > this.size - offset) return null;
    return this.device.whenInFile(offset, length);
  }

  read(buf: Uint8Array, offset: number): Maybe {
    this.checkRange(offset, buf.length, NBD_EINVAL);
    return this.device.pread(buf, offset, 0);
  }

  write(buf: Uint8Array, offset: number, flags: number): Maybe {
    this.checkWritable("write");
    this.checkRange(offset, buf.length, NBD_ENOSPC);
    if (this.emulateFua && flags & FUA) {
      return then(this.device.pwrite!(buf, offset, flags & ~FUA), () => this.device.flush!(0));
    }
    return this.device.pwrite!(buf, offset, flags);
  }

  flush(): Maybe {
    if (!this.caps.canFlush) return;
    return this.device.flush!(0);
  }

  trim(offset: number, length: number, flags: number): Maybe {
    this.checkWritable("trim");
    this.checkRange(offset, length, NBD_EINVAL);
    if (!this.caps.canTrim) return this.fua(flags);
    if (this.emulateFua && flags & FUA) {
      return then(this.device.trim!(offset, length, flags & ~FUA), () => this.device.flush!(0));
    }
    return this.device.trim!(offset, length, flags);
  }

  zero(offset: number, length: number, flags: number): Maybe {
    this.checkWritable("write zeroes");
    this.checkRange(offset, length, NBD_ENOSPC);
    if (this.emulateZero) {
      if (flags & FAST_ZERO) throw new NbdError(NBD_ENOTSUP, "fast zero is not supported by this export");
      return this.zeroByWriting(offset, length, flags);
    }
    if (this.emulateFua && flags & FUA) {
      return then(this.device.zero!(offset, length, flags & ~FUA), () => this.device.flush!(0));
    }
    return this.device.zero!(offset, length, flags);
  }

  private async zeroByWriting(offset: number, length: number, flags: number): Promise<void> {
    const z = zeros();
    const end = offset + length;
    for (let o = offset; o < end; o += ZERO_CHUNK) {
      const n = Math.min(ZERO_CHUNK, end - o);
      const r = this.device.pwrite!(n === ZERO_CHUNK ? z : z.subarray(0, n), o, 0);
      if (isPromise(r)) await r;
    }
    if (flags & FUA) {
      const r = this.device.flush?.(0);
      if (isPromise(r)) await r;
    }
  }

  private fua(flags: number): Maybe {
    if (flags & FUA && this.caps.canFlush) return this.device.flush!(0);
  }

  cache(offset: number, length: number): Maybe {
    this.checkRange(offset, length, NBD_EINVAL);
    if (this.device.cache) return this.device.cache(offset, length, 0);
  }

  /** Collect extents of context `ctx` for [offset, offset+length) into `out`. */
  extents(ctx: ExportContext, offset: number, length: number, flags: number, out: ExtentList): Maybe {
    this.checkRange(offset, length, NBD_EINVAL);
    out.reset(offset, length, (flags & 8) !== 0);
    const r = ctx.extents(offset, length, flags, out);
    if (isPromise(r)) return r.then(() => out.finish());
    out.finish();
  }

  close(): Maybe {
    return this.device.close?.();
  }
}

function then(r: Maybe, next: () => Maybe): Maybe {
  if (isPromise(r)) return r.then(next);
  return next();
}

/**
 * An ExtentSink that clips extents to the requested range, merges neighbours of the same type,
 * and stops after one extent with REQ_ONE or after `maxExtents`. Reused per session.
 */
export class ExtentList implements ExtentSink {
  lengths: number[] = [];
  types: number[] = [];
  private start = 0;
  private end = 0;
  private pos = 0;
  private one = false;
  private readonly maxExtents: number;
  constructor(maxExtents = 65536) {
    this.maxExtents = maxExtents;
  }
  reset(offset: number, length: number, reqOne: boolean): void {
    this.lengths.length = 0;
    this.types.length = 0;
    this.start = offset;
    this.pos = offset;
    this.end = offset + length;
    this.one = reqOne;
  }
  add(offset: number, length: number, type: number): boolean {
    if (length <= 0) return this.pos < this.end;
    let e = offset + length;
    if (e <= this.pos) return true; // before what we have
    if (offset > this.pos) {
      // a gap: the device skipped a range; report it as data (safe status 0)
      this.push(offset - this.pos, 0);
    }
    if (e > this.end) e = this.end;
    const s = Math.max(offset, this.pos);
    if (e > s) this.push(e - s, type >>> 0);
    return this.pos < this.end && !(this.one && this.lengths.length > 0) && this.lengths.length < this.maxExtents;
  }
  private push(len: number, type: number): void {
    const n = this.lengths.length;
    if (n > 0 && this.types[n - 1] === type) this.lengths[n - 1]! += len;
    else { this.lengths.push(len); this.types.push(type); }
    this.pos += len;
  }
  /** Guarantee at least one extent; with REQ_ONE exactly one. */
  finish(): void {
    if (this.lengths.length === 0) this.push(this.end - this.start, 0);
    if (this.one && this.lengths.length > 1) { this.lengths.length = 1; this.types.length = 1; }
  }
}
