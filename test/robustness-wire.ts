// A deliberately dumb raw NBD client for the robustness tests: it writes exactly the bytes it is
// told to (including wrong ones) and reads replies field by field, so a test can send malformed
// input and check the server's answer byte for byte. No tests here; the robustness-*.ts files use it.
import { readFileSync } from "node:fs";
import { connect, type Socket } from "node:net";
import { ByteQueue } from "./helpers/byte-queue.ts";

export const NBDMAGIC = Buffer.from("NBDMAGIC");
export const IHAVEOPT = Buffer.from("IHAVEOPT");
export const OPT_REPLY_MAGIC = Buffer.from("0003e889045565a9", "hex");
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

export const OPT = { EXPORT_NAME: 1, ABORT: 2, LIST: 3, STARTTLS: 5, INFO: 6, GO: 7, STRUCTURED_REPLY: 8, LIST_META_CONTEXT: 9, SET_META_CONTEXT: 10 } as const;
export const REP = { ACK: 1, SERVER: 2, INFO: 3, META_CONTEXT: 4, ERR_UNSUP: 0x80000001, ERR_POLICY: 0x80000002, ERR_INVALID: 0x80000003, ERR_UNKNOWN: 0x80000006 } as const;
export const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7 } as const;
export const ERR = { EPERM: 1, EIO: 5, ENOMEM: 12, EINVAL: 22, ENOSPC: 28, EOVERFLOW: 75, ENOTSUP: 95, ESHUTDOWN: 108 } as const;

export type Target = { port: number } | { path: string };

export interface OptionReply { option: number; type: number; data: Buffer }
export interface SimpleReply { error: number; cookie: bigint; data?: Buffer }
export interface Chunk { flags: number; type: number; cookie: bigint; data: Buffer }

/** A raw connection with an exact-length reader. */
export class Wire {
  private readonly q = new ByteQueue();
  private waiter: (() => void) | null = null;
  closed = false;
  error: Error | null = null;

  private constructor(readonly sock: Socket) {
    sock.on("data", (d: Buffer) => { this.q.push(d); this.wake(); });
    sock.on("close", () => { this.closed = true; this.wake(); });
    sock.on("error", (e) => { this.error = e; });
  }

  static open(t: Target): Promise<Wire> {
    return new Promise((resolve, reject) => {
      const s = "port" in t ? connect({ host: "127.0.0.1", port: t.port }) : connect({ path: t.path });
      s.setNoDelay(true);
      s.once("connect", () => resolve(new Wire(s)));
      s.once("error", reject);
    });
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }

  write(b: Uint8Array): boolean {
    return this.sock.write(b);
  }

  /** Resolves when everything written so far has been handed to the kernel. */
  flushed(): Promise<void> {
    return new Promise((r) => this.sock.write(new Uint8Array(0), () => r()));
  }

  /** Exactly n bytes; throws if the connection closes first or `ms` passes. */
  async read(n: number, ms = 10_000): Promise<Buffer> {
    const limit = Date.now() + ms;
    while (this.q.have < n) {
      if (this.closed) throw new Error(`connection closed with ${this.q.have} of ${n} bytes read`);
      const left = limit - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${n} bytes (have ${this.q.have})`);
      await new Promise<void>((r) => {
        const t = setTimeout(r, left);
        this.waiter = () => { clearTimeout(t); r(); };
      });
    }
    return this.q.take(n);
  }

  /** Resolves true when the server closes the connection within `ms` (after any unread bytes). */
  async closedWithin(ms = 5000): Promise<boolean> {
    const limit = Date.now() + ms;
    while (!this.closed && Date.now() < limit) {
      await new Promise<void>((r) => {
        const t = setTimeout(r, Math.max(1, limit - Date.now()));
        this.waiter = () => { clearTimeout(t); r(); };
      });
    }
    return this.closed;
  }

  /** Bytes received but not yet read. */
  get pending(): number { return this.q.have; }

  destroy(): void { this.sock.destroy(); }

  // ---------------------------------------------------------------- handshake ----------

  /** Read the 18-byte fixed newstyle greeting; returns the handshake flags. */
  async greeting(): Promise<number> {
    const g = await this.read(18);
    if (!g.subarray(0, 8).equals(NBDMAGIC) || !g.subarray(8, 16).equals(IHAVEOPT)) throw new Error(`bad greeting ${g.toString("hex")}`);
    return g.readUInt16BE(16);
  }

  /** Greeting, then client flags FIXED_NEWSTYLE|NO_ZEROES. */
  async hello(): Promise<void> {
    await this.greeting();
    this.write(u32(3));
  }

  sendOption(option: number, data: Uint8Array = new Uint8Array(0), declaredLength = data.length): void {
    const h = Buffer.alloc(16);
    IHAVEOPT.copy(h, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(declaredLength, 12);
    this.write(Buffer.concat([h, data]));
  }

  optionReply(): Promise<OptionReply> {
    return readOptionReply((n) => this.read(n));
  }

  /** Option replies up to and including the first that is not REP_INFO/SERVER/META_CONTEXT. */
  optionReplies(): Promise<OptionReply[]> {
    return readOptionReplies((n) => this.read(n));
  }

  /** GO to `name`; returns export size and transmission flags. */
  async go(name = "", opts: { structured?: boolean; meta?: string[] } = {}): Promise<{ size: number; flags: number }> {
    if (opts.structured || opts.meta) {
      this.sendOption(OPT.STRUCTURED_REPLY);
      const r = await this.optionReply();
      if (r.type !== REP.ACK) throw new Error(`STRUCTURED_REPLY: ${r.type.toString(16)}`);
    }
    if (opts.meta) {
      this.sendOption(OPT.SET_META_CONTEXT, metaContextData(name, opts.meta));
      const rs = await this.optionReplies();
      if (rs.at(-1)!.type !== REP.ACK) throw new Error(`SET_META_CONTEXT: ${rs.at(-1)!.type.toString(16)}`);
    }
    this.sendOption(OPT.GO, infoData(name));
    const rs = await this.optionReplies();
    const last = rs.at(-1)!;
    if (last.type !== REP.ACK) throw new Error(`GO "${name}" failed: type 0x${last.type.toString(16)} ${last.data.toString()}`);
    const exp = rs.find((r) => r.type === REP.INFO && r.data.readUInt16BE(0) === 0);
    if (!exp) throw new Error("GO: no NBD_INFO_EXPORT");
    return { size: Number(exp.data.readBigUInt64BE(2)), flags: exp.data.readUInt16BE(10) };
  }

  // ---------------------------------------------------------------- transmission -------

  async simpleReply(readLength = 0): Promise<SimpleReply> {
    const h = await this.read(16);
    const magic = h.readUInt32BE(0);
    if (magic !== SIMPLE_REPLY_MAGIC) throw new Error(`expected a simple reply, got magic 0x${magic.toString(16)}`);
    const error = h.readUInt32BE(4);
    const cookie = h.readBigUInt64BE(8);
    if (error === 0 && readLength > 0) return { error, cookie, data: Buffer.from(await this.read(readLength)) };
    return { error, cookie };
  }

  async chunk(): Promise<Chunk> {
    const h = await this.read(20);
    const magic = h.readUInt32BE(0);
    if (magic !== STRUCTURED_REPLY_MAGIC) throw new Error(`expected a structured chunk, got magic 0x${magic.toString(16)}`);
    const len = h.readUInt32BE(16);
    return { flags: h.readUInt16BE(4), type: h.readUInt16BE(6), cookie: h.readBigUInt64BE(8), data: len ? Buffer.from(await this.read(len)) : Buffer.alloc(0) };
  }
}

/** One option reply, read field by field through `read` (a plain or a TLS stream). */
export async function readOptionReply(read: (n: number) => Promise<Buffer>): Promise<OptionReply> {
  const h = await read(20);
  if (!h.subarray(0, 8).equals(OPT_REPLY_MAGIC)) throw new Error(`bad option reply magic ${h.toString("hex")}`);
  const len = h.readUInt32BE(16);
  return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: len ? Buffer.from(await read(len)) : Buffer.alloc(0) };
}

/** Option replies up to and including the first that is not REP_INFO/SERVER/META_CONTEXT. */
export async function readOptionReplies(read: (n: number) => Promise<Buffer>): Promise<OptionReply[]> {
  const out: OptionReply[] = [];
  for (;;) {
    const r = await readOptionReply(read);
    out.push(r);
    if (r.type !== REP.INFO && r.type !== REP.SERVER && r.type !== REP.META_CONTEXT) return out;
  }
}

export function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
}

/** INFO/GO option data: name length, name, no info requests. */
export function infoData(name: string, requests: number[] = []): Buffer {
  const n = Buffer.from(name);
  const b = Buffer.alloc(4 + n.length + 2 + 2 * requests.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  b.writeUInt16BE(requests.length, 4 + n.length);
  requests.forEach((r, i) => b.writeUInt16BE(r, 6 + n.length + 2 * i));
  return b;
}

export function metaContextData(name: string, queries: string[]): Buffer {
  const parts = [u32(Buffer.byteLength(name)), Buffer.from(name), u32(queries.length)];
  for (const q of queries) parts.push(u32(Buffer.byteLength(q)), Buffer.from(q));
  return Buffer.concat(parts);
}

/** One 28-byte request header (plus payload). The cookie is a bigint so tests can use all 64 bits. */
export function request(type: number, cookie: bigint, offset: number, length: number, flags = 0, payload?: Uint8Array, magic = REQUEST_MAGIC): Buffer {
  const b = Buffer.alloc(28);
  b.writeUInt32BE(magic >>> 0, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(cookie, 8);
  b.writeBigUInt64BE(BigInt(offset), 16);
  b.writeUInt32BE(length >>> 0, 24);
  return payload ? Buffer.concat([b, payload]) : b;
}

/** Resident set size of a process in KiB (VmRSS from /proc/PID/status). */
export function rssKiB(pid: number): number {
  const s = readFileSync(`/proc/${pid}/status`, "utf8");
  const m = /VmRSS:\s+(\d+) kB/.exec(s);
  if (!m) throw new Error(`no VmRSS for ${pid}`);
  return Number(m[1]);
}

/** A deterministic pattern: byte i of the block at `offset` is a function of (offset + i, seed). */
export function pattern(length: number, offset: number, seed = 1): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) {
    const x = offset + i;
    b[i] = ((x * 31) ^ (x >>> 9) ^ (seed * 97)) & 0xff;
  }
  return b;
}
