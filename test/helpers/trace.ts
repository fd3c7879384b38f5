// Integrity traces: a seeded generator of pipelined WRITE, WRITE+FUA, FLUSH and READ requests
// (512-byte aligned, overlapping in a hot zone, some huge), a raw-socket NBD connection that runs
// them with up to 32 requests in flight (EXPORT_NAME with simple replies, or GO with structured
// replies and block sizes), and a model holding the last write to every 512-byte sector, against
// which every READ and a final read of the whole export are checked. Every sector's content names
// the write that made it (id and sector number), so a wrong sector says where it came from.
import { connect as netConnect, type Socket } from "node:net";
import { ByteQueue } from "./byte-queue.ts";

export const SECTOR = 512;
const MiB = 1024 * 1024;

export interface TraceOp { type: "write" | "read" | "flush"; fua: boolean; offset: number; length: number }

/** xorshift32 */
function prng(seed: number): (n: number) => number {
  let x = (seed >>> 0) || 0x2545f491;
  return (n) => { x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0; return x % n; };
}

/**
 * A trace of `ops` requests over an export of `size` bytes: 45% writes (a tenth with FUA), 45%
 * reads, 10% flushes; 70% of requests land in a 4 MiB hot zone so they overlap; one in `hugeEvery`
 * is `hugeLength` bytes (near the payload limit the connection may use).
 */
export function generateTrace(seed: number, o: { ops: number; size: number; hugeEvery: number; hugeLength: number }): TraceOp[] {
  const r = prng(seed);
  const sectors = o.size / SECTOR;
  const hot = r(Math.max(1, sectors - 8192));
  const out: TraceOp[] = [];
  for (let i = 0; i < o.ops; i++) {
    const huge = o.hugeEvery > 0 && i % o.hugeEvery === o.hugeEvery - 1;
    const k = huge ? 10 + r(90) : r(100); // a huge slot is a write or a read
    if (k < 10) { out.push({ type: "flush", fua: false, offset: 0, length: 0 }); continue; }
    let len: number;
    if (huge) len = Math.min(o.hugeLength, o.size) / SECTOR;
    else if (r(100) === 0) len = 2048 + r(14336); // 1-8 MiB
    else len = 1 + (r(4) === 0 ? r(512) : r(16));
    const start = r(10) < 7 ? Math.min(hot + r(8192), sectors - len) : r(sectors - len + 1);
    out.push({ type: k < 55 ? "write" : "read", fua: k < 55 && r(10) === 0, offset: start * SECTOR, length: len * SECTOR });
  }
  return out;
}

/** Fill `b` (at byte `at`) with the sectors [sector, +n) as written by write `id`. */
export function stamp(b: Uint8Array, at: number, id: number, sector: number, n: number): void {
  for (let k = 0; k < n; k++) {
    const p = at + k * SECTOR;
    const s = sector + k;
    b.fill((id * 7 + s) & 255, p, p + SECTOR);
    b[p] = id >>> 24; b[p + 1] = id >>> 16; b[p + 2] = id >>> 8; b[p + 3] = id;
    b[p + 4] = Math.floor(s / 2 ** 32) >>> 24; b[p + 5] = Math.floor(s / 2 ** 32) >>> 16; b[p + 6] = Math.floor(s / 2 ** 32) >>> 8; b[p + 7] = Math.floor(s / 2 ** 32);
    b[p + 8] = s >>> 24; b[p + 9] = s >>> 16; b[p + 10] = s >>> 8; b[p + 11] = s;
  }
}

/** The last write to every sector (id 0: the export's initial content, stamped the same way). */
export class SectorModel {
  readonly ids: Uint32Array;
  constructor(readonly size: number) { this.ids = new Uint32Array(size / SECTOR); }
  write(id: number, offset: number, length: number): void { this.ids.fill(id, offset / SECTOR, (offset + length) / SECTOR); }
  /** Throws naming the first sector of `b` (read at `offset`) that is not what the model says. */
  check(b: Uint8Array, offset: number, what: string): void {
    const first = offset / SECTOR;
    const want = new Uint8Array(SECTOR);
    for (let k = 0; k < b.length / SECTOR; k++) {
      const id = this.ids[first + k]!;
      stamp(want, 0, id, first + k, 1);
      const got = b.subarray(k * SECTOR, (k + 1) * SECTOR);
      if (Buffer.compare(Buffer.from(got.buffer, got.byteOffset, SECTOR), Buffer.from(want)) !== 0) {
        const gid = ((got[0]! << 24) | (got[1]! << 16) | (got[2]! << 8) | got[3]!) >>> 0;
        const gs = ((got[8]! << 24) | (got[9]! << 16) | (got[10]! << 8) | got[11]!) >>> 0;
        throw new Error(`${what}: sector ${first + k} (byte ${(first + k) * SECTOR}) holds write ${gid}'s sector ${gs}, expected write ${id}'s`);
      }
    }
  }
}

export type TraceTarget = { port: number } | { path: string };
export type HandshakePath = "export-name" | "go";

interface Pending { resolve: (b: Uint8Array | null) => void; reject: (e: Error) => void; readLength: number; offset: number; data?: Uint8Array }

/** A raw pipelined NBD connection: just what traces need, and nothing the client library would smooth over. */
export class TraceConnection {
  private readonly q = new ByteQueue();
  private waiter: (() => void) | null = null;
  private closed: Error | null = null;
  private cookie = 1;
  private readonly pending = new Map<number, Pending>();
  structured = false;
  size = 0;
  /** Largest payload this connection may send: the advertised maximum after GO, 64 MiB after EXPORT_NAME. */
  maxPayload = 64 * MiB;

  private constructor(private readonly sock: Socket) {
    sock.on("data", (d: Buffer) => { this.q.push(d); this.wake(); });
    sock.on("close", () => { this.closed ??= new Error("connection closed"); this.wake(); this.failAll(this.closed); });
    sock.on("error", (e) => { this.closed ??= e; });
  }

  /** Connect and negotiate `exportName` ("" is the default export) by EXPORT_NAME or GO. */
  static async open(t: TraceTarget, path: HandshakePath, exportName = ""): Promise<TraceConnection> {
    const sock = await new Promise<Socket>((resolve, reject) => {
      const s = "port" in t ? netConnect({ host: "127.0.0.1", port: t.port }) : netConnect({ path: t.path });
      s.setNoDelay(true);
      s.once("connect", () => resolve(s));
      s.once("error", reject);
    });
    const c = new TraceConnection(sock);
    await c.handshake(path, exportName);
    void c.receiveLoop();
    return c;
  }

  private wake(): void { const w = this.waiter; this.waiter = null; w?.(); }

  private async read(n: number): Promise<Buffer> {
    while (this.q.have < n) {
      if (this.closed) throw this.closed;
      await new Promise<void>((r) => { this.waiter = r; });
    }
    return this.q.take(n);
  }

  private option(code: number, data: Uint8Array = new Uint8Array(0)): void {
    const h = Buffer.alloc(16);
    h.write("IHAVEOPT", 0);
    h.writeUInt32BE(code, 8);
    h.writeUInt32BE(data.length, 12);
    this.sock.write(Buffer.concat([h, data]));
  }

  private async optionReply(): Promise<{ type: number; data: Buffer }> {
    const h = await this.read(20);
    const len = h.readUInt32BE(16);
    return { type: h.readUInt32BE(12), data: Buffer.from(await this.read(len)) };
  }

  private async handshake(path: HandshakePath, exportName: string): Promise<void> {
    const g = await this.read(18);
    if (g.subarray(0, 8).toString() !== "NBDMAGIC") throw new Error("no NBDMAGIC");
    this.sock.write(Buffer.from([0, 0, 0, 3])); // FIXED_NEWSTYLE | NO_ZEROES
    const name = Buffer.from(exportName);
    if (path === "export-name") {
      this.option(1, name);
      const r = await this.read(10);
      this.size = Number(r.readBigUInt64BE(0));
      return;
    }
    this.option(8);
    if ((await this.optionReply()).type !== 1) throw new Error("STRUCTURED_REPLY refused");
    this.structured = true;
    const d = Buffer.alloc(4 + name.length + 2 + 2);
    d.writeUInt32BE(name.length, 0);
    name.copy(d, 4);
    d.writeUInt16BE(1, 4 + name.length);
    d.writeUInt16BE(3, 6 + name.length); // NBD_INFO_BLOCK_SIZE
    this.option(7, d);
    for (;;) {
      const r = await this.optionReply();
      if (r.type === 1) break;
      if (r.type !== 3) throw new Error(`GO failed: reply type 0x${r.type.toString(16)} ${r.data.toString()}`);
      const info = r.data.readUInt16BE(0);
      if (info === 0) this.size = Number(r.data.readBigUInt64BE(2));
      if (info === 3) this.maxPayload = r.data.readUInt32BE(10);
    }
  }

  /** One request; resolves with the READ data (null for others) or rejects with the server's errno. */
  request(type: number, flags: number, offset: number, length: number, payload?: Uint8Array): Promise<Uint8Array | null> {
    if (this.closed) return Promise.reject(this.closed);
    const cookie = this.cookie++;
    const h = Buffer.alloc(28);
    h.writeUInt32BE(0x25609513, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    h.writeUInt32BE(cookie, 12);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(length, 24);
    const p = new Promise<Uint8Array | null>((resolve, reject) => {
      this.pending.set(cookie, { resolve, reject, readLength: type === 0 ? length : 0, offset });
    });
    this.sock.write(h);
    if (payload) this.sock.write(payload);
    return p;
  }

  private async receiveLoop(): Promise<void> {
    try {
      for (;;) {
        const m = (await this.read(4)).readUInt32BE(0);
        if (m === 0x67446698) {
          const h = await this.read(12);
          const error = h.readUInt32BE(0), cookie = h.readUInt32BE(8);
          const p = this.take(cookie);
          if (error) { p.reject(new Error(`errno ${error}`)); continue; }
          p.resolve(p.readLength ? new Uint8Array(await this.read(p.readLength)) : null);
        } else if (m === 0x668e33ef) {
          const h = await this.read(16);
          const flags = h.readUInt16BE(0), type = h.readUInt16BE(2), cookie = h.readUInt32BE(8), len = h.readUInt32BE(12);
          const p = this.pending.get(cookie);
          if (!p) throw new Error(`a chunk for unknown cookie ${cookie}`);
          const body = await this.read(len);
          if (p.readLength && !p.data) p.data = new Uint8Array(p.readLength);
          if (type === 1) p.data!.set(body.subarray(8), Number(body.readBigUInt64BE(0)) - p.offset);
          else if (type === 2) p.data!.fill(0, Number(body.readBigUInt64BE(0)) - p.offset, Number(body.readBigUInt64BE(0)) - p.offset + body.readUInt32BE(8));
          else if (type >= 0x8000) { this.take(cookie).reject(new Error(`errno ${body.readUInt32BE(0)}: ${body.subarray(6).toString()}`)); continue; }
          if (flags & 1) this.take(cookie).resolve(p.data ?? null);
        } else {
          throw new Error(`bad reply magic 0x${m.toString(16)}`);
        }
      }
    } catch (e) {
      this.failAll(e as Error);
    }
  }

  private take(cookie: number): Pending {
    const p = this.pending.get(cookie);
    if (!p) throw new Error(`a reply for unknown cookie ${cookie}`);
    this.pending.delete(cookie);
    return p;
  }

  private failAll(e: Error): void {
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
  }

  async close(): Promise<void> {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(0x25609513, 0);
    h.writeUInt16BE(2, 6); // DISC
    this.sock.write(h);
    await new Promise<void>((r) => { if (this.sock.closed) r(); else this.sock.once("close", () => r()); });
  }
}

export interface TraceResult { ops: number; writes: number; reads: number; flushes: number; bytesWritten: number; bytesRead: number; largest: number }

/**
 * Run `trace` on `c` with up to `window` requests in flight. A request waits for any in-flight one
 * it overlaps (unless both are reads), so every read has one right answer: the model's. Write ids
 * continue from `model`'s `nextId` so several runs can share one export and model.
 */
export async function runTrace(c: TraceConnection, trace: TraceOp[], model: SectorModel, ids: { next: number }, window = 32): Promise<TraceResult> {
  const res: TraceResult = { ops: 0, writes: 0, reads: 0, flushes: 0, bytesWritten: 0, bytesRead: 0, largest: 0 };
  const inflight = new Set<{ op: TraceOp; done: Promise<unknown> }>();
  const overlaps = (a: TraceOp, b: TraceOp) => a.offset < b.offset + b.length && b.offset < a.offset + a.length && (a.type === "write" || b.type === "write");
  let failure: Error | null = null;
  for (const op of trace) {
    if (failure) break;
    let len = op.length;
    if (len > c.maxPayload) len = Math.floor(c.maxPayload / SECTOR) * SECTOR;
    const o = { ...op, length: len };
    for (;;) {
      const blockers = [...inflight].filter((x) => o.type === "flush" ? false : overlaps(o, x.op));
      if (blockers.length === 0 && inflight.size < window) break;
      await Promise.race(blockers.length ? blockers.map((x) => x.done) : [...inflight].map((x) => x.done));
    }
    let done: Promise<unknown>;
    if (o.type === "write") {
      const id = ids.next++;
      const buf = new Uint8Array(o.length);
      stamp(buf, 0, id, o.offset / SECTOR, o.length / SECTOR);
      done = c.request(1, o.fua ? 1 : 0, o.offset, o.length, buf).then(() => { model.write(id, o.offset, o.length); });
      res.writes++;
      res.bytesWritten += o.length;
    } else if (o.type === "read") {
      done = c.request(0, 0, o.offset, o.length).then((b) => { model.check(b!, o.offset, `READ [${o.offset}, +${o.length})`); });
      res.reads++;
      res.bytesRead += o.length;
    } else {
      done = c.request(3, 0, 0, 0);
      res.flushes++;
    }
    res.largest = Math.max(res.largest, o.length);
    res.ops++;
    const entry = { op: o, done: done.catch((e: Error) => { failure ??= e; }) };
    inflight.add(entry);
    void entry.done.then(() => inflight.delete(entry));
  }
  await Promise.all([...inflight].map((x) => x.done));
  if (failure) throw failure;
  return res;
}

/** Read the whole export back in 8 MiB pieces and check every sector against the model. */
export async function verifyAll(c: TraceConnection, model: SectorModel): Promise<void> {
  const step = Math.min(8 * MiB, c.maxPayload);
  for (let off = 0; off < model.size; off += step) {
    const n = Math.min(step, model.size - off);
    model.check((await c.request(0, 0, off, n))!, off, `final read [${off}, +${n})`);
  }
}
