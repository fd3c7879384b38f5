// Copying between NBD exports, files and a null sink, the way nbdcopy does: the source's
// base:allocation map splits the image into data and zero ranges; data is read in fixed-size
// requests by several workers (several connections when the server allows multi-conn), zero ranges
// are never read and become WRITE_ZEROES (or nothing, on a fresh sparse file); an all-zero data
// block is treated as a zero range too. Node APIs only (node:fs, node:crypto), so it runs under Node.
import { createHash, type Hash } from "node:crypto";
import { closeSync, fstatSync, fsyncSync, ftruncateSync, openSync, readSync, writeSync } from "node:fs";
import { BASE_ALLOCATION, NBD_STATE_ZERO } from "../protocol/constants.ts";
import type { Extent, NbdClient } from "./client.ts";
import { NbdUsageError } from "./errors.ts";

/** Something to copy from. `lane` picks one of several connections (any integer; taken modulo). */
export interface CopySource {
  readonly size: number;
  /** Preferred request size (a multiple of the source's minimum block size). */
  readonly blockSize: number;
  /** Extents covering the whole source in order; `flags & NBD_STATE_ZERO` means the range reads as zeros. */
  extents(): Promise<Extent[]>;
  read(buf: Uint8Array, offset: number, lane: number): Promise<void> | void;
  /**
   * Optional: reads [offset, offset+length) without copying, as consecutive views that stay valid
   * (e.g. of the socket's receive buffers). Returns null when not possible; then `read` is used.
   */
  readViews?(offset: number, length: number, lane: number): Promise<Uint8Array[]> | null;
  close(): Promise<void> | void;
}

/** Something to copy to. */
export interface CopyDestination {
  /** Size if fixed (an NBD export); undefined if the destination takes the source's size. */
  readonly size: number | undefined;
  /** Alignment the destination needs (its minimum block size). */
  readonly blockSize: number;
  /** Called once with the source size before anything is written. */
  prepare(size: number): Promise<void> | void;
  write(buf: Uint8Array, offset: number, lane: number): Promise<void> | void;
  /**
   * Optional: writes consecutive pieces (of any lengths, not aligned) starting at `offset`. Only
   * destinations that accept any alignment define it; the copy then reads by views, without copying.
   */
  writev?(views: Uint8Array[], offset: number, lane: number): Promise<void> | void;
  /** False when zero ranges cost nothing more than data (a null sink): skip looking for zero blocks. */
  readonly sparse?: boolean;
  /** Makes [offset, offset+length) read as zeros, deallocating it where possible. */
  zero(offset: number, length: number, lane: number): Promise<void> | void;
  flush(): Promise<void> | void;
  close(): Promise<void> | void;
}

/** Options of {@link copy}. */
export interface CopyOptions {
  /** Bytes per data request (default: 256 KiB, rounded to the endpoints' block sizes). */
  requestSize?: number;
  /** Workers (requests in flight) in total (default 16). */
  workers?: number;
  /** Flush the destination at the end. */
  flush?: boolean;
  /** Compute the SHA-256 of every byte of the source (zeros included), in order. */
  sha256?: boolean;
  /** Treat all-zero data blocks as zero ranges (default true). */
  detectZeroes?: boolean;
  /** Called after each unit of work with the bytes done so far. */
  onProgress?: (done: number, total: number) => void;
}

/** What {@link copy} did. */
export interface CopyResult {
  size: number;
  /** Bytes read and written as data. */
  dataBytes: number;
  /** Bytes handled as zero ranges (not read, or read and found to be zero). */
  zeroBytes: number;
  /** Hex SHA-256 of the whole source, if asked. */
  sha256?: string;
}

interface Unit {
  offset: number;
  length: number;
  zero: boolean;
}

const ZERO_CHUNK = 1024 * 1024;
let zeroes: Buffer | null = null;
function zeroBuffer(min: number): Buffer {
  if (!zeroes || zeroes.length < min) zeroes = Buffer.alloc(Math.max(min, ZERO_CHUNK));
  return zeroes;
}

function allZero(views: Uint8Array[]): boolean {
  for (const v of views) {
    const z = zeroBuffer(v.length);
    if (z.compare(v, 0, v.length, 0, v.length) !== 0) return false;
  }
  return true;
}

/** Copies every byte of `src` to `dst`. Closes neither endpoint. */
export async function copy(src: CopySource, dst: CopyDestination, opts: CopyOptions = {}): Promise<CopyResult> {
  const size = src.size;
  if (dst.size !== undefined && dst.size < size) {
    throw new NbdUsageError("OUT_OF_RANGE", `the destination (${dst.size} bytes) is smaller than the source (${size} bytes)`);
  }
  const align = lcm(src.blockSize, dst.blockSize);
  let requestSize = opts.requestSize ?? 256 * 1024;
  requestSize = Math.max(align, requestSize - (requestSize % align));
  const workers = Math.max(1, opts.workers ?? 16);
  const detect = opts.detectZeroes !== false && dst.sparse !== false;
  const byViews = typeof src.readViews === "function" && typeof dst.writev === "function";
  await dst.prepare(size);

  const units: Unit[] = [];
  for (const e of await src.extents()) {
    const zero = (e.flags & NBD_STATE_ZERO) !== 0;
    if (zero) {
      units.push({ offset: e.offset, length: e.length, zero });
      continue;
    }
    let pos = e.offset;
    const end = e.offset + e.length;
    while (pos < end) {
      // Cut at multiples of requestSize so requests stay aligned.
      const n = Math.min(end - pos, requestSize - (pos % requestSize));
      units.push({ offset: pos, length: n, zero: false });
      pos += n;
    }
  }

  const hash: Hash | null = opts.sha256 ? createHash("sha256") : null;
  let hashTurn = 0;
  const hashWaiters = new Map<number, () => void>();
  const hashUnit = (i: number, data: Uint8Array | Uint8Array[] | null, length: number) => {
    if (data instanceof Uint8Array) hash!.update(data);
    else if (data) for (const d of data) hash!.update(d);
    else {
      const z = zeroBuffer(ZERO_CHUNK);
      for (let left = length; left > 0; left -= ZERO_CHUNK) hash!.update(left >= ZERO_CHUNK ? z : z.subarray(0, left));
    }
    hashTurn = i + 1;
    const w = hashWaiters.get(hashTurn);
    if (w) {
      hashWaiters.delete(hashTurn);
      w();
    }
  };

  let next = 0;
  let done = 0;
  let dataBytes = 0;
  let zeroBytes = 0;
  let failed: unknown = null;

  const worker = async (lane: number) => {
    let buffer: Buffer | null = null;
    while (failed === null && next < units.length) {
      const i = next++;
      const u = units[i]!;
      let isZero = u.zero;
      let view: Uint8Array | null = null;
      let views: Uint8Array[] | null = null;
      if (!isZero && byViews) {
        const r = src.readViews!(u.offset, u.length, lane);
        if (r) {
          views = await r;
          if (detect && allZero(views)) isZero = true;
        }
      }
      if (!isZero && !views) {
        const buf = (buffer ??= Buffer.allocUnsafe(requestSize));
        view = u.length === requestSize ? buf : buf.subarray(0, u.length);
        const r = src.read(view, u.offset, lane);
        if (r) await r;
        if (detect && zeroBuffer(u.length).compare(view, 0, u.length, 0, u.length) === 0) isZero = true;
      }
      if (hash) {
        if (hashTurn !== i) await new Promise<void>((res) => hashWaiters.set(i, res));
        if (failed !== null) return;
        hashUnit(i, isZero ? null : views ?? view, u.length);
      }
      const w = isZero ? dst.zero(u.offset, u.length, lane) : views ? dst.writev!(views, u.offset, lane) : dst.write(view!, u.offset, lane);
      if (w) await w;
      if (isZero) zeroBytes += u.length;
      else dataBytes += u.length;
      done += u.length;
      opts.onProgress?.(done, size);
    }
  };

  const run = async (lane: number) => {
    try {
      await worker(lane);
    } catch (e) {
      if (failed === null) failed = e;
      // Release workers waiting for their hash turn so everything winds down.
      for (const w of hashWaiters.values()) w();
      hashWaiters.clear();
    }
  };
  await Promise.all(Array.from({ length: Math.min(workers, Math.max(1, units.length)) }, (_, lane) => run(lane)));
  if (failed !== null) throw failed;
  if (opts.flush) await dst.flush();
  const result: CopyResult = { size, dataBytes, zeroBytes };
  if (hash) result.sha256 = hash.digest("hex");
  return result;
}

function gcd(a: number, b: number): number {
  while (b) [a, b] = [b, a % b];
  return a;
}
function lcm(a: number, b: number): number {
  return (a / gcd(a, b)) * b;
}

/** Copy endpoints over one or more connections to the same export (several only with multi-conn). */
export class NbdEndpoint implements CopySource, CopyDestination {
  readonly size: number;
  readonly blockSize: number;
  constructor(private readonly clients: NbdClient[]) {
    if (clients.length === 0) throw new NbdUsageError("BAD_ARGUMENT", "NbdEndpoint needs at least one connection");
    const c = clients[0]!;
    this.size = c.size;
    this.blockSize = c.limits.minimum;
  }
  /** How many connections this endpoint spreads requests over. */
  get connections(): number {
    return this.clients.length;
  }
  private pick(lane: number): NbdClient {
    return this.clients[lane % this.clients.length]!;
  }
  async extents(): Promise<Extent[]> {
    const c = this.clients[0]!;
    if (!c.metaContexts.has(BASE_ALLOCATION)) return this.size ? [{ offset: 0, length: this.size, flags: 0 }] : [];
    return c.extents(0, this.size, BASE_ALLOCATION);
  }
  read(buf: Uint8Array, offset: number, lane: number): Promise<void> {
    return this.pick(lane).pread(buf, offset);
  }
  readViews(offset: number, length: number, lane: number): Promise<Uint8Array[]> | null {
    const c = this.pick(lane);
    return c.receivesInPlace ? null : c.readViews(offset, length);
  }
  prepare(): void {
    if (this.clients[0]!.info.readOnly) throw new NbdUsageError("READ_ONLY", "the destination export is read-only");
  }
  write(buf: Uint8Array, offset: number, lane: number): Promise<void> {
    return this.pick(lane).pwrite(buf, offset);
  }
  async zero(offset: number, length: number, lane: number): Promise<void> {
    const c = this.pick(lane);
    if (c.info.canZero) return c.zero(offset, length);
    const max = c.limits.maxPayload;
    const z = zeroBuffer(Math.min(max, length));
    const parts: Promise<void>[] = [];
    for (let pos = 0; pos < length; pos += max) {
      const n = Math.min(max, length - pos);
      parts.push(c.pwrite(z.subarray(0, n), offset + pos));
    }
    await Promise.all(parts);
  }
  async flush(): Promise<void> {
    await Promise.all(this.clients.filter((c) => c.info.canFlush).map((c) => c.flush()));
  }
  async close(): Promise<void> {
    await Promise.all(this.clients.map((c) => c.close()));
  }
}

/** Returns the data/hole extents of an open file (e.g. via SEEK_DATA/SEEK_HOLE), or null if unknown. */
export type FileExtentProbe = (fd: number, size: number) => Extent[] | null;

/** A regular file as a copy source; `probe` finds its holes (without it, zero detection still finds them). */
export class FileSource implements CopySource {
  readonly size: number;
  readonly blockSize = 1;
  private fd: number;
  constructor(readonly path: string, private readonly probe: FileExtentProbe | null = null) {
    this.fd = openSync(path, "r");
    const st = fstatSync(this.fd);
    if (!st.isFile()) {
      closeSync(this.fd);
      throw new NbdUsageError("BAD_ARGUMENT", `${path} is not a regular file`);
    }
    this.size = st.size;
  }
  extents(): Promise<Extent[]> {
    const found = this.probe?.(this.fd, this.size) ?? null;
    return Promise.resolve(found ?? (this.size ? [{ offset: 0, length: this.size, flags: 0 }] : []));
  }
  read(buf: Uint8Array, offset: number): void {
    let got = 0;
    while (got < buf.length) {
      const n = readSync(this.fd, buf, got, buf.length - got, offset + got);
      if (n === 0) throw new Error(`${this.path}: unexpected end of file at ${offset + got}`);
      got += n;
    }
  }
  close(): void {
    if (this.fd >= 0) closeSync(this.fd);
    this.fd = -1;
  }
}

/**
 * A local file as copy destination. A regular file is truncated and sized to the source, so zero
 * ranges are simply left as holes; other files (devices) get zeros written.
 */
export class FileDestination implements CopyDestination {
  readonly size = undefined;
  readonly blockSize = 1;
  private fd: number;
  private fresh = false;
  private readonly regular: boolean;
  constructor(readonly path: string) {
    this.fd = openSync(path, "w");
    this.regular = fstatSync(this.fd).isFile();
  }
  prepare(size: number): void {
    if (this.regular) {
      ftruncateSync(this.fd, 0);
      ftruncateSync(this.fd, size);
      this.fresh = true;
    }
  }
  write(buf: Uint8Array, offset: number): void {
    let put = 0;
    while (put < buf.length) put += writeSync(this.fd, buf, put, buf.length - put, offset + put);
  }
  writev(views: Uint8Array[], offset: number): void {
    let pos = offset;
    for (const v of views) {
      this.write(v, pos);
      pos += v.length;
    }
  }
  zero(offset: number, length: number): void {
    if (this.fresh) return;
    const z = zeroBuffer(Math.min(length, ZERO_CHUNK));
    for (let pos = 0; pos < length; pos += ZERO_CHUNK) this.write(z.subarray(0, Math.min(ZERO_CHUNK, length - pos)), offset + pos);
  }
  flush(): void {
    fsyncSync(this.fd);
  }
  close(): void {
    if (this.fd >= 0) closeSync(this.fd);
    this.fd = -1;
  }
}

/** A destination that discards everything (`null:`), for benchmarks and verification with sha256. */
export class NullEndpoint implements CopyDestination {
  readonly size = undefined;
  readonly sparse = false;
  readonly blockSize = 1;
  prepare(): void {}
  write(): void {}
  writev(): void {}
  zero(): void {}
  flush(): void {}
  close(): void {}
}
