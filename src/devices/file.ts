// The raw image file plugin: a regular file exported byte for byte. Reads and writes are
// synchronous positional I/O (fs.readSync/writeSync: 0.6 µs for a page-cached 4 KiB read against
// 32 µs for an awaited FileHandle.read, see DESIGN.md), except writes of 128 KiB and more, which go
// to the thread pool (see ASYNC_WRITE_MIN). FLUSH and FUA use fdatasync on the thread
// pool (a sync that writes back a GiB of dirty pages takes seconds: the event loop and every other
// connection go on meanwhile; close() waits for them and syncs once more); TRIM punches
// holes; WRITE_ZEROES uses FALLOC_FL_ZERO_RANGE or hole punching, with a write fallback; extents
// come from SEEK_DATA/SEEK_HOLE. Writes and syncs go through a RawIo seam (tests inject failures);
// after a failed fdatasync or write, writes and flushes fail with EIO (failure.ts).
import fs from "node:fs";
import { enotsup } from "../protocol/errors.ts";
import { FailureLatch } from "./failure.ts";
import {
  fallocate, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, haveLibc, seekData, seekHole, willNeed,
} from "../sys/libc.ts";
import {
  type BlockDevice, type Capabilities, type DeviceRecipe, type ExtentSink, type FileRange, type Maybe, caps, EXTENT_HOLE, EXTENT_ZERO, FAST_ZERO, FUA, MAY_TRIM,
} from "./types.ts";

const ZERO_CHUNK = 1024 * 1024;

/** The raw file's write-side system calls: the seam where tests inject failing writes and syncs. */
export interface RawIo {
  /** pwrite(2): returns the bytes written, throws an Error with a `code` like Node's. */
  pwrite(fd: number, buf: Uint8Array, off: number, len: number, pos: number): number;
  /** pwrite(2) on the thread pool (large writes); resolves to the bytes written. Without it every write is synchronous. */
  pwriteAsync?(fd: number, buf: Uint8Array, off: number, len: number, pos: number): Promise<number>;
  /** fdatasync(2) off the event loop (FLUSH, FUA); rejects with an Error with a `code`. */
  fdatasync(fd: number): Promise<void>;
  /** fdatasync(2) now (the last one, at close). */
  fdatasyncNow(fd: number): void;
  /** FLUSH and FUA call fdatasyncNow, here (a connection's own thread, where nothing else waits). */
  syncHere?: boolean;
}

const plainIo: RawIo = {
  pwrite: (fd, buf, off, len, pos) => fs.writeSync(fd, buf, off, len, pos),
  pwriteAsync: (fd, buf, off, len, pos) => new Promise((resolve, reject) => fs.write(fd, buf, off, len, pos, (e, n) => (e ? reject(e) : resolve(n)))),
  fdatasync: (fd) => new Promise((resolve, reject) => fs.fdatasync(fd, (e) => (e ? reject(e) : resolve()))),
  fdatasyncNow: (fd) => fs.fdatasyncSync(fd),
};

/** Everything synchronous: for a connection served on a thread of its own (RawFile.shared). */
const threadIo: RawIo = { pwrite: plainIo.pwrite, fdatasync: plainIo.fdatasync, fdatasyncNow: plainIo.fdatasyncNow, syncHere: true };

/**
 * Writes at least this large go to the thread pool. At its dirty limit the kernel puts a writer to
 * sleep in pwrite (balance_dirty_pages), and on the event loop that sleep stalls every connection
 * of the process: a QD1 4 KiB reader beside a 1 MiB writer that flushes every 64 MiB got 7.4-8.1k
 * IOPS with a p99 of 1.12-1.17 ms with synchronous writes, 12.6-15.8k IOPS and 0.78-0.95 ms with
 * these on the thread pool (bench/writeback-e2e.ts). The price: one writer alone at 1 MiB QD16
 * runs ~10% slower (2.1-2.3 against 2.2-2.6 GB/s) and at 128 KiB at the same speed, for 10-20%
 * more CPU. Sending only writes that had been slow there (more than 1-4 ms) kept the stalls: they
 * come from many writes slowed a little, not a few slowed a lot. Small writes stay synchronous.
 */
const ASYNC_WRITE_MIN = 128 * 1024;

/**
 * A RawFile's descriptor as another thread uses it (RawFile.shared): `failed` is its failure
 * latch's shared flag, so that a failed write or fdatasync on any thread fails them all.
 */
export type SharedFile = Extract<DeviceRecipe, { kind: "file" }>;

export class RawFile implements BlockDevice {
  readonly path: string;
  readonly fd: number;
  readonly readOnly: boolean;
  private readonly bytes: number;
  private canPunch = haveLibc;
  private canZeroRange = haveLibc;
  private canSeekHoles = haveLibc;
  private closed = false;
  /** False for RawFile.shared: the descriptor is another RawFile's, which syncs and closes it. */
  private owner = true;
  private readonly io: RawIo;
  /** The first failed write or sync: then writes and flushes are refused. */
  private readonly latch: FailureLatch;
  /**
   * The last run found to be data by SEEK_DATA/SEEK_HOLE. Large reads ask for extents (to send
   * holes as holes); inside this run the two lseek calls are skipped. Reporting data is always
   * safe (status 0), so writes need not touch it; trims and zeroes, which can make holes, reset it.
   */
  private dataStart = 0;
  private dataEnd = 0;
  /** Writes on the thread pool (and requests waiting behind them), by range: see overlapping(). */
  private readonly ordering = new Set<{ start: number; end: number; done: Promise<void> }>();
  /** fdatasyncs and large writes under way on the thread pool: close() waits for them before closing the fd. */
  private readonly syncs = new Set<Promise<unknown>>();

  private constructor(path: string, fd: number, size: number, readOnly: boolean, io: RawIo, log: (msg: string) => void, failed?: SharedArrayBuffer) {
    this.path = path;
    this.fd = fd;
    this.bytes = size;
    this.readOnly = readOnly;
    this.io = io;
    this.latch = new FailureLatch(path, log, failed);
  }

  /**
   * Open a regular file (read-only with `readOnly`). Throws a clear Error if it is missing or
   * unreadable. `size` exports only the file's first `size` bytes (a fixed VHD without its footer).
   * `log` gets warnings (a failed sync); `io` replaces the write-side system calls.
   */
  static open(path: string, opts: { readOnly?: boolean; size?: number; log?: (msg: string) => void; io?: RawIo } = {}): RawFile {
    const readOnly = opts.readOnly ?? false;
    let fd: number;
    try {
      fd = fs.openSync(path, readOnly ? "r" : "r+");
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      const why = code === "ENOENT" ? "no such file" : code === "EACCES" ? "permission denied"
        : code === "EISDIR" ? "is a directory" : code === "EROFS" ? "read-only file system (use -r)" : String(code ?? e);
      throw new Error(`cannot open ${path}: ${why}`);
    }
    const st = fs.fstatSync(fd);
    if (st.isDirectory()) {
      fs.closeSync(fd);
      throw new Error(`cannot open ${path}: is a directory`);
    }
    let size = st.size;
    if (st.isBlockDevice()) {
      // fstat reports 0 for block devices; the end of the device is where lseek(SEEK_END) lands.
      size = blockDeviceSize(fd);
    }
    if (opts.size !== undefined) {
      if (opts.size > size) { fs.closeSync(fd); throw new Error(`cannot open ${path}: ${opts.size} bytes wanted, the file has ${size}`); }
      size = opts.size;
    }
    return new RawFile(path, fd, size, readOnly, opts.io ?? plainIo, opts.log ?? ((m) => console.error(m)));
  }

  /**
   * The file another RawFile (`of`) has open, for a connection served on a thread of its own
   * (server/connection-thread.ts): the same descriptor, every call synchronous, and close() leaves
   * the descriptor to its owner. `of` may live in another thread: only plain data crosses.
   */
  static shared(of: SharedFile, log: (msg: string) => void): RawFile {
    const f = new RawFile(of.path, of.fd, of.size, of.readOnly, threadIo, log, of.failed);
    f.owner = false;
    return f;
  }

  /** What RawFile.shared needs, as plain data (null when writes go through a test's RawIo). */
  recipe(): SharedFile | null {
    if (this.io !== plainIo || this.closed) return null;
    return { kind: "file", path: this.path, fd: this.fd, size: this.bytes, readOnly: this.readOnly, failed: this.latch.shared.buffer as SharedArrayBuffer };
  }

  size(): number { return this.bytes; }

  capabilities(): Capabilities {
    return caps({
      canWrite: !this.readOnly, canFlush: !this.readOnly, canFua: !this.readOnly,
      canTrim: !this.readOnly, canZero: !this.readOnly, canFastZero: !this.readOnly && haveLibc,
      canCache: true, canExtents: haveLibc, canMultiConn: true,
    });
  }

  fileRange(offset: number, _length: number, out: FileRange): boolean {
    out.fd = this.fd;
    out.offset = offset;
    return true;
  }

  pread(buf: Uint8Array, offset: number): void {
    let done = 0;
    while (done < buf.length) {
      const n = fs.readSync(this.fd, buf, done, buf.length - done, offset + done);
      if (n === 0) {
        // Past the end of file (the file shrank under us): the rest reads as zeros.
        buf.fill(0, done);
        return;
      }
      done += n;
    }
  }

  pwrite(buf: Uint8Array, offset: number, flags: number): Maybe {
    const pool = buf.length >= ASYNC_WRITE_MIN && this.io.pwriteAsync !== undefined;
    const before = this.overlapping(offset, buf.length);
    if (pool || before !== null) return this.ordered(offset, buf.length, before, () => this.writeNow(buf, offset, flags, pool));
    return this.writeNow(buf, offset, flags, false);
  }

  /** The write itself: on the thread pool (`pool`, see ASYNC_WRITE_MIN) or here; `buf` is the caller's until it is done. */
  private writeNow(buf: Uint8Array, offset: number, flags: number, pool: boolean): Maybe {
    if (this.latch.failed) this.latch.refuse(); // (checked here: also after waiting behind an earlier write)
    if (!pool) {
      this.writeAll(buf, offset);
      return flags & FUA ? this.sync() : undefined;
    }
    const io = this.io, fd = this.fd;
    return (async () => {
      let done = 0;
      try {
        while (done < buf.length) done += await io.pwriteAsync!(fd, buf, done, buf.length - done, offset + done);
      } catch (e) {
        throw this.latch.note(e, "write");
      }
      if (flags & FUA) await this.sync();
    })();
  }

  private writeAll(buf: Uint8Array, offset: number): void {
    let done = 0;
    try {
      while (done < buf.length) done += this.io.pwrite(this.fd, buf, done, buf.length - done, offset + done);
    } catch (e) {
      throw this.latch.note(e, "write");
    }
  }

  /**
   * What a request over [offset, offset+length) must wait for: the writes on the thread pool it
   * overlaps, so that requests apply in the order they came (as they did when every write was
   * synchronous); null when it overlaps none.
   */
  private overlapping(offset: number, length: number): Promise<unknown> | null {
    if (this.ordering.size === 0) return null;
    const end = offset + length;
    let deps: Promise<void>[] | null = null;
    for (const w of this.ordering) if (w.start < end && offset < w.end) (deps ??= []).push(w.done);
    return deps === null ? null : Promise.all(deps);
  }

  /** Run `op` after `before`, holding [offset, offset+length) for later requests until it ends. */
  private ordered(offset: number, length: number, before: Promise<unknown> | null, op: () => Maybe): Promise<void> {
    const p = (async () => {
      if (before !== null) await before;
      await op();
    })();
    const w = { start: offset, end: offset + length, done: p.then(() => {}, () => {}) };
    this.ordering.add(w);
    void w.done.then(() => this.ordering.delete(w));
    this.track(p);
    return p;
  }

  flush(): Maybe {
    this.latch.refuse();
    return this.sync();
  }

  /** fdatasync on the thread pool (or here, see RawIo.syncHere); a failure is latched (see FailureLatch). */
  private sync(): Maybe {
    if (this.io.syncHere) {
      try { this.io.fdatasyncNow(this.fd); } catch (e) { throw this.latch.note(e, "fdatasync"); }
      return;
    }
    const p = this.io.fdatasync(this.fd);
    this.track(p);
    return p.catch((e: unknown) => { throw this.latch.note(e, "fdatasync"); });
  }

  /** Work on the thread pool that close() must wait for (the descriptor stays open until it ends). */
  private track(p: Promise<void>): void {
    const done = p.then(() => {}, () => {});
    this.syncs.add(done);
    void done.then(() => this.syncs.delete(done));
  }

  trim(offset: number, length: number, flags: number): Maybe {
    const before = this.overlapping(offset, length);
    if (before !== null) return this.ordered(offset, length, before, () => this.trimNow(offset, length, flags));
    return this.trimNow(offset, length, flags);
  }

  private trimNow(offset: number, length: number, flags: number): Maybe {
    this.latch.refuse();
    this.dataEnd = 0;
    // TRIM is a hint: where the filesystem cannot punch holes we do nothing.
    if (this.canPunch) {
      try {
        fallocate(this.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
      } catch (e) {
        if (!notSupported(e)) throw this.latch.note(e, "fallocate");
        this.canPunch = false;
      }
    }
    if (flags & FUA) return this.sync();
  }

  zero(offset: number, length: number, flags: number): Maybe {
    const before = this.overlapping(offset, length);
    if (before !== null) return this.ordered(offset, length, before, () => this.zeroNow(offset, length, flags));
    return this.zeroNow(offset, length, flags);
  }

  private zeroNow(offset: number, length: number, flags: number): Maybe {
    this.latch.refuse();
    this.dataEnd = 0;
    if (this.zeroFast(offset, length, flags)) {
      if (flags & FUA) return this.sync();
      return;
    }
    if (flags & FAST_ZERO) throw enotsup("this file system cannot zero a range quickly");
    const z = new Uint8Array(Math.min(ZERO_CHUNK, length));
    for (let o = offset, end = offset + length; o < end; o += z.length) {
      const n = Math.min(z.length, end - o);
      this.writeAll(n === z.length ? z : z.subarray(0, n), o);
    }
    if (flags & FUA) return this.sync();
  }

  private zeroFast(offset: number, length: number, flags: number): boolean {
    if (flags & MAY_TRIM && this.canPunch) {
      try {
        fallocate(this.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
        return true;
      } catch (e) {
        if (!notSupported(e)) throw this.latch.note(e, "fallocate");
        this.canPunch = false;
      }
    }
    if (this.canZeroRange) {
      try {
        fallocate(this.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length);
        return true;
      } catch (e) {
        if (!notSupported(e)) throw this.latch.note(e, "fallocate");
        this.canZeroRange = false;
      }
    }
    return false;
  }

  extents(offset: number, length: number, _flags: number, sink: ExtentSink): void {
    const end = offset + length;
    if (!this.canSeekHoles) {
      sink.add(offset, length, 0);
      return;
    }
    if (offset >= this.dataStart && end <= this.dataEnd) {
      sink.add(offset, length, 0);
      return;
    }
    const at = { pos: offset };
    try {
      seekExtents(this.fd, at, end, sink, (data, hole) => { this.dataStart = data; this.dataEnd = hole; });
    } catch (e) {
      if (!notSupported(e)) throw e;
      this.canSeekHoles = false;
      sink.add(at.pos, end - at.pos, 0);
    }
  }

  cache(offset: number, length: number): void {
    // Advisory prefetch: ask the kernel to read the range ahead, without blocking the event loop.
    willNeed(this.fd, offset, length);
  }

  close(): Maybe {
    if (this.closed) return;
    this.closed = true;
    if (!this.owner) return;
    if (this.syncs.size > 0) return Promise.all(this.syncs).then(() => this.closeNow());
    this.closeNow();
  }

  private closeNow(): void {
    // After a failure nothing more is synced (the latch said so in the log); a failing final sync is logged.
    if (!this.readOnly && !this.latch.failed) {
      try { this.io.fdatasyncNow(this.fd); } catch (e) { this.latch.note(e, "fdatasync"); }
    }
    fs.closeSync(this.fd);
  }

}

function notSupported(e: unknown): boolean {
  const code = (e as { code?: string }).code;
  return code === "EOPNOTSUPP" || code === "ENOTSUP" || code === "ENOSYS" || code === "EINVAL";
}

function blockDeviceSize(fd: number): number {
  // Read backwards in powers of two to find the device end without an ioctl.
  const b = new Uint8Array(1);
  let lo = 0;
  let hi = 1;
  while (fs.readSync(fd, b, 0, 1, hi * 512 - 1) === 1) { lo = hi; hi *= 2; }
  while (hi - lo > 1) {
    const mid = Math.floor((lo + hi) / 2);
    if (fs.readSync(fd, b, 0, 1, mid * 512 - 1) === 1) lo = mid; else hi = mid;
  }
  return lo * 512;
}

/**
 * Extents of [at.pos, end) of file `fd` from SEEK_DATA/SEEK_HOLE (holes read as zeros), with
 * `at.pos` moved past what was added: to `end`, or to where the sink wanted no more (then false is
 * returned). Throws what
 * lseek throws, with `at.pos` where it got to (the caller may report the rest as data when the file
 * system cannot tell). `found` hears of each data run.
 */
export function seekExtents(fd: number, at: { pos: number }, end: number, sink: ExtentSink, found?: (data: number, hole: number) => void): boolean {
  while (at.pos < end) {
    const pos = at.pos;
    const data = seekData(fd, pos);
    if (data < 0 || data >= end) { // hole to the end of the range (or of the file)
      at.pos = end;
      return sink.add(pos, end - pos, EXTENT_HOLE | EXTENT_ZERO);
    }
    if (data > pos) {
      at.pos = data;
      if (!sink.add(pos, data - pos, EXTENT_HOLE | EXTENT_ZERO)) return false;
    }
    let hole = seekHole(fd, data);
    if (hole >= 0) found?.(data, hole);
    if (hole < 0 || hole > end) hole = end;
    at.pos = hole;
    if (!sink.add(data, hole - data, 0)) return false;
  }
  return true;
}
