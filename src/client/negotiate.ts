// The handshake and option phase (cold path, written for clarity): the greeting, fixed newstyle
// option haggling (LIST, INFO, GO, STRUCTURED_REPLY, LIST/SET_META_CONTEXT, ABORT), the
// EXPORT_NAME fallback, and oldstyle servers. A Negotiation ends in go()/exportName(), which hand
// the socket to an NbdClient, or in abort().
import {
  IHAVEOPT_HI, IHAVEOPT_LO, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES, NBD_FLAG_READ_ONLY, NBD_FLAG_ROTATIONAL, NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_DF, NBD_FLAG_SEND_FAST_ZERO, NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA, NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES, NBD_INFO_BLOCK_SIZE, NBD_INFO_DESCRIPTION, NBD_INFO_EXPORT, NBD_INFO_NAME,
  NBD_MAX_STRING, NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, NBD_REP_ERR_UNSUP,
  NBD_REP_INFO, NBD_REP_META_CONTEXT, NBD_REP_SERVER, NBDMAGIC_HI, NBDMAGIC_LO, OPT_REPLY_MAGIC_HI,
  OPT_REPLY_MAGIC_LO, EXPORT_NAME_PADDING, optionName, replyTypeName,
} from "../protocol/constants.ts";
import {
  NbdClosedError, NbdDisconnectedError, NbdOptionError, NbdProtocolViolation, NbdTimeoutError, NbdUsageError,
} from "./errors.ts";
import type { Conn, Rx } from "./conn.ts";
import { openConn } from "./transport.ts";
import type { NbdTarget } from "./uri.ts";
import { put16, put32, u16, u32, u64 } from "./wire.ts";

/** Block size constraints advertised by the server (NBD_INFO_BLOCK_SIZE). */
export interface BlockSizeInfo {
  minimum: number;
  preferred: number;
  /** Largest payload; 0xffffffff means no limit. */
  maximum: number;
}

/** What the server says about one export (from INFO, GO, EXPORT_NAME or the oldstyle greeting). */
export interface ExportInfo {
  /** The name we asked for. */
  name: string;
  /** The canonical name, if the server sent NBD_INFO_NAME. */
  canonicalName?: string;
  /** The description, if the server sent NBD_INFO_DESCRIPTION. */
  description?: string;
  /** Size in bytes. */
  size: number;
  /** Raw 16-bit transmission flags. */
  flags: number;
  /** Block size constraints, if the server advertised them. */
  blockSize?: BlockSizeInfo;
  readOnly: boolean;
  rotational: boolean;
  canFlush: boolean;
  canFua: boolean;
  canTrim: boolean;
  canZero: boolean;
  canFastZero: boolean;
  canCache: boolean;
  /** DF needs both the flag and structured replies. */
  canDf: boolean;
  canMultiConn: boolean;
}

/** One entry of an NBD_OPT_LIST answer. */
export interface ExportListing {
  name: string;
  description: string;
}

/** The handshake style the server used. */
export type HandshakeStyle = "oldstyle" | "newstyle" | "newstyle-fixed";

/** Options shared by every way of opening a connection. */
export interface ConnectOptions {
  /** Deadline for the TCP/unix connect and for each handshake reply, in ms (default 10000). */
  connectTimeoutMs?: number;
  /** Deadline for each request in the transmission phase, in ms (default 60000). */
  requestTimeoutMs?: number;
  /**
   * Busy-poll for replies for up to this many microseconds before going back to the event loop
   * (default 0: never). Only where the transport receives in place (Bun with libc reachable). It
   * trades CPU for throughput when many requests are in flight: bytes that would otherwise wait
   * for the next loop turn (and an extra buffer and copy) go straight into the READ buffers.
   */
  busyPollMicros?: number;
}

// The oldstyle cliserv_magic 0x0000420281861253, split into 32-bit halves.
const CLISERV_MAGIC_HI = 0x00004202;
const CLISERV_MAGIC_LO = 0x81861253;

/** Decodes transmission flags into booleans. */
export function describeExport(name: string, size: number, flags: number, structured: boolean): ExportInfo {
  return {
    name, size, flags,
    readOnly: (flags & NBD_FLAG_READ_ONLY) !== 0,
    rotational: (flags & NBD_FLAG_ROTATIONAL) !== 0,
    canFlush: (flags & NBD_FLAG_SEND_FLUSH) !== 0,
    canFua: (flags & NBD_FLAG_SEND_FUA) !== 0,
    canTrim: (flags & NBD_FLAG_SEND_TRIM) !== 0,
    canZero: (flags & NBD_FLAG_SEND_WRITE_ZEROES) !== 0,
    canFastZero: (flags & NBD_FLAG_SEND_FAST_ZERO) !== 0,
    canCache: (flags & NBD_FLAG_SEND_CACHE) !== 0,
    canDf: structured && (flags & NBD_FLAG_SEND_DF) !== 0,
    canMultiConn: (flags & NBD_FLAG_CAN_MULTI_CONN) !== 0,
  };
}

/** Buffers incoming bytes during the handshake and serves exact-length reads with a deadline. */
class ByteQueue {
  private chunks: Buffer[] = [];
  private total = 0;
  private waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void; timer: ReturnType<typeof setTimeout> } | null = null;
  failure: Error | null = null;

  push(chunk: Buffer): void {
    this.chunks.push(chunk);
    this.total += chunk.length;
    this.pump();
  }

  fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    const w = this.waiter;
    if (w) {
      this.waiter = null;
      clearTimeout(w.timer);
      w.reject(err);
    }
  }

  read(n: number, timeoutMs: number, what: string): Promise<Buffer> {
    if (this.waiter) return Promise.reject(new Error("internal: concurrent handshake reads"));
    if (this.total >= n) return Promise.resolve(this.take(n));
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiter = null;
        reject(new NbdTimeoutError(`no answer from the server within ${timeoutMs} ms (waiting for ${what})`));
      }, timeoutMs);
      this.waiter = { n, resolve, reject, timer };
    });
  }

  /** Whatever arrived beyond the handshake (handed to the transmission receiver). */
  rest(): Buffer[] {
    const r = this.chunks;
    this.chunks = [];
    this.total = 0;
    return r;
  }

  private pump(): void {
    const w = this.waiter;
    if (w && this.total >= w.n) {
      this.waiter = null;
      clearTimeout(w.timer);
      w.resolve(this.take(w.n));
    }
  }

  private take(n: number): Buffer {
    const all = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks, this.total);
    const out = all.subarray(0, n);
    const rest = all.subarray(n);
    this.chunks = rest.length ? [rest] : [];
    this.total = rest.length;
    return out;
  }
}

export type { Conn, Rx } from "./conn.ts";

/** Opens a connection to the target (transport-bun.ts under Bun, node:net elsewhere). */
export function openSocket(target: NbdTarget, timeoutMs: number): Promise<{ socket: Conn; rx: Rx }> {
  return openConn(target, timeoutMs);
}

/** The result of GO/EXPORT_NAME: everything the transmission phase needs. */
export interface Negotiated {
  socket: Conn;
  /** The socket's receive hook (absent: the client listens for "data" events instead). */
  rx?: Rx;
  info: ExportInfo;
  structured: boolean;
  /** Selected meta contexts: name → id. */
  metaContexts: Map<string, number>;
  /** Bytes that arrived after the handshake. */
  leftover: Buffer[];
  style: HandshakeStyle;
}

/**
 * The option phase of one connection. Open it with {@link Negotiation.open}, ask LIST, INFO and
 * meta-context questions, then either {@link go} (enter transmission) or {@link abort}.
 * Only one option is in flight at a time, as the protocol requires.
 */
export class Negotiation {
  /** "newstyle-fixed" normally; "newstyle" for servers without fixed newstyle (only EXPORT_NAME works); "oldstyle". */
  readonly style: HandshakeStyle;
  /** Whether STRUCTURED_REPLY was acknowledged. */
  structured = false;
  /** Meta contexts selected by the last SET_META_CONTEXT: name → id. */
  metaContexts = new Map<string, number>();
  private readonly noZeroes: boolean;
  private oldstyleInfo: ExportInfo | null;
  private finished = false;
  private readonly queue = new ByteQueue();
  private readonly onData = (b: Buffer, n: number) => this.queue.push(Buffer.from(b.subarray(0, n)));
  private readonly onError = (e: Error) => this.queue.fail(new NbdDisconnectedError(`connection error during the handshake: ${e.message}`, { cause: e }));
  private readonly onClose = () => this.queue.fail(new NbdDisconnectedError("the server closed the connection during the handshake"));

  private constructor(private readonly socket: Conn, private readonly rx: Rx, private readonly timeoutMs: number, style: HandshakeStyle, noZeroes: boolean, oldstyleInfo: ExportInfo | null) {
    this.style = style;
    this.noZeroes = noZeroes;
    this.oldstyleInfo = oldstyleInfo;
  }

  /** Connects and reads the greeting. */
  static async open(target: NbdTarget, opts: ConnectOptions = {}): Promise<Negotiation> {
    const timeoutMs = opts.connectTimeoutMs ?? 10_000;
    const { socket, rx } = await openSocket(target, timeoutMs);
    const queue = new ByteQueue();
    rx.on = (b: Buffer, n: number) => queue.push(Buffer.from(b.subarray(0, n)));
    const onError = (e: Error) => queue.fail(new NbdDisconnectedError(`connection error during the handshake: ${e.message}`, { cause: e }));
    const onClose = () => queue.fail(new NbdDisconnectedError("the server closed the connection during the greeting"));
    socket.on("error", onError);
    socket.on("close", onClose);
    try {
      const g = await queue.read(16, timeoutMs, "the greeting");
      if (u32(g, 0) !== NBDMAGIC_HI || u32(g, 4) !== NBDMAGIC_LO) {
        throw new NbdProtocolViolation("BAD_GREETING", "the server did not greet with NBDMAGIC: not an NBD server?");
      }
      let neg: Negotiation;
      if (u32(g, 8) === IHAVEOPT_HI && u32(g, 12) === IHAVEOPT_LO) {
        const hf = u16(await queue.read(2, timeoutMs, "the handshake flags"), 0);
        const fixed = (hf & NBD_FLAG_FIXED_NEWSTYLE) !== 0;
        const noZeroes = (hf & NBD_FLAG_NO_ZEROES) !== 0;
        const cf = Buffer.alloc(4);
        put32(cf, 0, (fixed ? NBD_FLAG_C_FIXED_NEWSTYLE : 0) | (noZeroes ? NBD_FLAG_C_NO_ZEROES : 0));
        socket.write(cf);
        neg = new Negotiation(socket, rx, timeoutMs, fixed ? "newstyle-fixed" : "newstyle", noZeroes, null);
      } else if (u32(g, 8) === CLISERV_MAGIC_HI && u32(g, 12) === CLISERV_MAGIC_LO) {
        const b = await queue.read(8 + 4 + 124, timeoutMs, "the oldstyle export header");
        const size = u64(b, 0);
        if (!Number.isFinite(size)) throw new NbdProtocolViolation("SIZE_TOO_LARGE", "export size is 2^53 or more");
        neg = new Negotiation(socket, rx, timeoutMs, "oldstyle", false, describeExport("", size, u32(b, 8) & 0xffff, false));
      } else {
        throw new NbdProtocolViolation("BAD_GREETING", "unknown handshake magic after NBDMAGIC");
      }
      socket.off("error", onError);
      socket.off("close", onClose);
      neg.attach(queue.rest());
      return neg;
    } catch (e) {
      socket.destroy();
      throw e;
    }
  }

  private attach(early: Buffer[]): void {
    for (const c of early) this.queue.push(c);
    this.rx.on = this.onData;
    this.socket.on("error", this.onError);
    this.socket.on("close", this.onClose);
  }

  private detach(): Buffer[] {
    this.rx.on = () => {};
    this.socket.off("error", this.onError);
    this.socket.off("close", this.onClose);
    return this.queue.rest();
  }

  private checkOpen(option: number): void {
    if (this.finished) throw new NbdClosedError("this negotiation has already ended");
    if (this.style === "oldstyle") throw new NbdUsageError("UNSUPPORTED", `an oldstyle server takes no options (${optionName(option)})`);
    if (this.style === "newstyle" && option !== NBD_OPT_EXPORT_NAME) {
      throw new NbdUsageError("UNSUPPORTED", `the server does not speak fixed newstyle: only EXPORT_NAME is possible, not ${optionName(option)}`);
    }
  }

  private sendOption(option: number, data: Uint8Array = new Uint8Array(0)): void {
    const b = Buffer.allocUnsafe(16 + data.length);
    put32(b, 0, IHAVEOPT_HI);
    put32(b, 4, IHAVEOPT_LO);
    put32(b, 8, option);
    put32(b, 12, data.length);
    b.set(data, 16);
    this.socket.write(b);
  }

  /** Reads one option reply; checks its magic and that it answers `option`. */
  private async readReply(option: number): Promise<{ type: number; data: Buffer }> {
    const h = await this.queue.read(20, this.timeoutMs, `the reply to ${optionName(option)}`);
    if (u32(h, 0) !== OPT_REPLY_MAGIC_HI || u32(h, 4) !== OPT_REPLY_MAGIC_LO) {
      this.fatal();
      throw new NbdProtocolViolation("BAD_OPTION_REPLY_MAGIC", `bad option reply magic in the reply to ${optionName(option)}`);
    }
    if (u32(h, 8) !== option) {
      this.fatal();
      throw new NbdProtocolViolation("OPTION_MISMATCH", `the server answered option ${optionName(u32(h, 8))} while we asked ${optionName(option)}`);
    }
    const type = u32(h, 12);
    const len = u32(h, 16);
    if (len > 16 * 1024 * 1024) {
      this.fatal();
      throw new NbdProtocolViolation("OPTION_REPLY_TOO_LARGE", `option reply of ${len} bytes to ${optionName(option)}`);
    }
    const data = len ? await this.queue.read(len, this.timeoutMs, `the reply to ${optionName(option)}`) : Buffer.alloc(0);
    return { type, data };
  }

  private refuse(option: number, type: number, data: Buffer, what: string): NbdOptionError {
    const msg = data.length ? `: ${data.toString("utf8")}` : "";
    return new NbdOptionError(optionName(option), type, replyTypeName(type), `${what}: the server answered ${optionName(option)} with ${replyTypeName(type)}${msg}`);
  }

  private unexpected(option: number, type: number): NbdProtocolViolation {
    this.fatal();
    return new NbdProtocolViolation("UNEXPECTED_OPTION_REPLY", `unexpected reply ${replyTypeName(type)} to ${optionName(option)}`);
  }

  private fatal(): void {
    this.finished = true;
    this.socket.destroy();
  }

  /** Asks for structured replies; returns whether the server agreed. */
  async structuredReply(): Promise<boolean> {
    this.checkOpen(NBD_OPT_STRUCTURED_REPLY);
    this.sendOption(NBD_OPT_STRUCTURED_REPLY);
    const r = await this.readReply(NBD_OPT_STRUCTURED_REPLY);
    if (r.type === NBD_REP_ACK) return (this.structured = true);
    if (r.type & 0x80000000) return false;
    throw this.unexpected(NBD_OPT_STRUCTURED_REPLY, r.type);
  }

  /** NBD_OPT_LIST: every export the server is willing to list. */
  async list(): Promise<ExportListing[]> {
    this.checkOpen(NBD_OPT_LIST);
    this.sendOption(NBD_OPT_LIST);
    const out: ExportListing[] = [];
    for (;;) {
      const r = await this.readReply(NBD_OPT_LIST);
      if (r.type === NBD_REP_ACK) return out;
      if (r.type === NBD_REP_SERVER) {
        const n = r.data.length >= 4 ? u32(r.data, 0) : -1;
        if (n < 0 || n > r.data.length - 4) {
          this.fatal();
          throw new NbdProtocolViolation("BAD_OPTION_REPLY", "malformed NBD_REP_SERVER reply");
        }
        out.push({ name: r.data.toString("utf8", 4, 4 + n), description: r.data.toString("utf8", 4 + n) });
        continue;
      }
      if (r.type & 0x80000000) throw this.refuse(NBD_OPT_LIST, r.type, r.data, "cannot list exports");
      throw this.unexpected(NBD_OPT_LIST, r.type);
    }
  }

  private infoRequest(name: string): Buffer {
    const nb = encodeString(name, "export name");
    const wanted = [NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE];
    const b = Buffer.alloc(4 + nb.length + 2 + 2 * wanted.length);
    put32(b, 0, nb.length);
    b.set(nb, 4);
    put16(b, 4 + nb.length, wanted.length);
    wanted.forEach((w, i) => put16(b, 6 + nb.length + 2 * i, w));
    return b;
  }

  /** Runs INFO or GO; returns null if the server does not support the option (ERR_UNSUP). */
  private async infoOrGo(option: number, name: string): Promise<ExportInfo | null> {
    this.sendOption(option, this.infoRequest(name));
    let info: ExportInfo | null = null;
    let canonicalName: string | undefined;
    let description: string | undefined;
    let blockSize: BlockSizeInfo | undefined;
    for (;;) {
      const r = await this.readReply(option);
      if (r.type === NBD_REP_INFO) {
        if (r.data.length < 2) throw this.malformed(option);
        const it = u16(r.data, 0);
        if (it === NBD_INFO_EXPORT) {
          if (r.data.length !== 12) throw this.malformed(option);
          const size = u64(r.data, 2);
          if (!Number.isFinite(size)) {
            this.fatal();
            throw new NbdProtocolViolation("SIZE_TOO_LARGE", `export "${name}" is 2^53 bytes or larger`);
          }
          info = describeExport(name, size, u16(r.data, 10), this.structured);
        } else if (it === NBD_INFO_NAME) {
          canonicalName = r.data.toString("utf8", 2);
        } else if (it === NBD_INFO_DESCRIPTION) {
          description = r.data.toString("utf8", 2);
        } else if (it === NBD_INFO_BLOCK_SIZE) {
          if (r.data.length !== 14) throw this.malformed(option);
          blockSize = { minimum: u32(r.data, 2), preferred: u32(r.data, 6), maximum: u32(r.data, 10) };
          const { minimum: mn, preferred: pf, maximum: mx } = blockSize;
          if (mn < 1 || mn > 65536 || (mn & (mn - 1)) !== 0 || pf < mn || (pf & (pf - 1)) !== 0 || mx < pf) {
            this.fatal();
            throw new NbdProtocolViolation("BAD_BLOCK_SIZE", `impossible block sizes ${mn}/${pf}/${mx}`);
          }
        }
        continue;
      }
      if (r.type === NBD_REP_ACK) {
        if (!info) {
          this.fatal();
          throw new NbdProtocolViolation("MISSING_INFO_EXPORT", `the server acknowledged ${optionName(option)} without NBD_INFO_EXPORT`);
        }
        if (canonicalName !== undefined) info.canonicalName = canonicalName;
        if (description !== undefined) info.description = description;
        if (blockSize) info.blockSize = blockSize;
        return info;
      }
      if (r.type === NBD_REP_ERR_UNSUP) return null;
      if (r.type & 0x80000000) {
        throw this.refuse(option, r.type, r.data, r.type === 0x80000006 ? `export "${name}" not found` : `cannot open export "${name}"`);
      }
      throw this.unexpected(option, r.type);
    }
  }

  private malformed(option: number): NbdProtocolViolation {
    this.fatal();
    return new NbdProtocolViolation("BAD_OPTION_REPLY", `malformed NBD_REP_INFO in the reply to ${optionName(option)}`);
  }

  /** NBD_OPT_INFO: what GO would report for `name`, without entering transmission. */
  async info(name: string): Promise<ExportInfo> {
    this.checkOpen(NBD_OPT_INFO);
    const info = await this.infoOrGo(NBD_OPT_INFO, name);
    if (!info) throw new NbdOptionError("INFO", NBD_REP_ERR_UNSUP, "ERR_UNSUP", "the server does not support NBD_OPT_INFO");
    return info;
  }

  private metaRequest(name: string, queries: readonly string[]): Buffer {
    const nb = encodeString(name, "export name");
    const qs = queries.map((q) => encodeString(q, "meta context"));
    const b = Buffer.alloc(4 + nb.length + 4 + qs.reduce((s, q) => s + 4 + q.length, 0));
    put32(b, 0, nb.length);
    b.set(nb, 4);
    let o = 4 + nb.length;
    put32(b, o, qs.length);
    o += 4;
    for (const q of qs) {
      put32(b, o, q.length);
      b.set(q, o + 4);
      o += 4 + q.length;
    }
    return b;
  }

  private async metaContext(option: number, name: string, queries: readonly string[]): Promise<Map<string, number>> {
    this.checkOpen(option);
    this.sendOption(option, this.metaRequest(name, queries));
    const out = new Map<string, number>();
    for (;;) {
      const r = await this.readReply(option);
      if (r.type === NBD_REP_META_CONTEXT) {
        if (r.data.length < 5) throw this.malformed(option);
        out.set(r.data.toString("utf8", 4), u32(r.data, 0));
        continue;
      }
      if (r.type === NBD_REP_ACK) return out;
      if (r.type & 0x80000000) throw this.refuse(option, r.type, r.data, "meta context negotiation failed");
      throw this.unexpected(option, r.type);
    }
  }

  /** NBD_OPT_LIST_META_CONTEXT: the contexts matching `queries` (every context when empty). */
  async listMetaContexts(name: string, queries: readonly string[] = []): Promise<string[]> {
    return [...(await this.metaContext(NBD_OPT_LIST_META_CONTEXT, name, queries)).keys()];
  }

  /** NBD_OPT_SET_META_CONTEXT: selects contexts for `name`; returns name → id. Needs structured replies. */
  async setMetaContexts(name: string, queries: readonly string[]): Promise<Map<string, number>> {
    if (!this.structured) throw new NbdUsageError("UNSUPPORTED", "meta contexts need structured replies");
    this.metaContexts = new Map();
    this.metaContexts = await this.metaContext(NBD_OPT_SET_META_CONTEXT, name, queries);
    return this.metaContexts;
  }

  /**
   * Enters the transmission phase on export `name`: GO, or EXPORT_NAME on servers without GO
   * (and on plain newstyle servers). For oldstyle servers the export is the one greeted with.
   */
  async go(name: string): Promise<Negotiated> {
    if (this.finished) throw new NbdClosedError("this negotiation has already ended");
    let info: ExportInfo | null = this.oldstyleInfo;
    if (!info && this.style === "newstyle-fixed") info = await this.infoOrGo(NBD_OPT_GO, name);
    if (!info) info = await this.exportName(name);
    this.finished = true;
    return { socket: this.socket, rx: this.rx, info, structured: this.structured, metaContexts: this.metaContexts, leftover: this.detach(), style: this.style };
  }

  private async exportName(name: string): Promise<ExportInfo> {
    this.sendOption(NBD_OPT_EXPORT_NAME, encodeString(name, "export name"));
    let b: Buffer;
    try {
      b = await this.queue.read(10 + (this.noZeroes ? 0 : EXPORT_NAME_PADDING), this.timeoutMs, "the EXPORT_NAME reply");
    } catch (e) {
      if (e instanceof NbdDisconnectedError) {
        throw new NbdOptionError("EXPORT_NAME", 0x80000006, "ERR_UNKNOWN", `export "${name}" not found (the server closed the connection after EXPORT_NAME)`);
      }
      throw e;
    }
    const size = u64(b, 0);
    if (!Number.isFinite(size)) {
      this.fatal();
      throw new NbdProtocolViolation("SIZE_TOO_LARGE", `export "${name}" is 2^53 bytes or larger`);
    }
    return describeExport(name, size, u16(b, 8), this.structured);
  }

  /** Ends the option phase politely (NBD_OPT_ABORT) and closes the socket. */
  async abort(): Promise<void> {
    if (this.finished) return;
    this.finished = true;
    if (this.style === "newstyle-fixed") {
      try {
        this.sendOption(NBD_OPT_ABORT);
        await this.readReply(NBD_OPT_ABORT);
      } catch {
        // The server may close without acknowledging ABORT; either way we are done.
      }
    }
    this.detach();
    this.socket.destroy();
  }
}

function encodeString(s: string, what: string): Buffer {
  const b = Buffer.from(s, "utf8");
  if (b.length > NBD_MAX_STRING) throw new NbdUsageError("BAD_ARGUMENT", `${what} is longer than ${NBD_MAX_STRING} bytes`);
  return b;
}
