// One client connection: greeting → option haggling → transmission → closing. The session owns
// the byte-stream receiver (a state machine asking for "N bytes", parsing headers in place and
// taking WRITE payloads as views of the incoming chunk when they fit), dispatch to the checked
// export, and reply encoding. It never touches the socket directly: it talks to a Transport, so
// the same code runs over Bun.listen TCP and unix sockets (and in tests over anything).
import {
  HARD_MAX_PAYLOAD, NBD_CMD_BLOCK_STATUS, NBD_CMD_CACHE, NBD_CMD_DISC, NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLUSH, NBD_CMD_READ,
  NBD_CMD_TRIM, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_EINVAL, NBD_ENOSPC, NBD_ESHUTDOWN, NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES, NBD_FLAG_SEND_DF, NBD_INFO_DESCRIPTION, NBD_INFO_NAME,
  NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_LIST, NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT, NBD_OPT_STARTTLS, NBD_OPT_STRUCTURED_REPLY, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_NONE, NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE, NBD_REP_ACK,
  NBD_REP_ERR_INVALID, NBD_REP_ERR_POLICY, NBD_REP_ERR_SHUTDOWN, NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_UNSUP, NBD_REP_INFO,
  NBD_REP_META_CONTEXT, NBD_REP_SERVER, NBD_REQUEST_SIZE, NBD_STATE_ZERO, commandName, errnoName, optionName,
} from "../protocol/constants.ts";
import {
  OptionFormatError, encodeExportNameReply, encodeGreeting, encodeInfoBlockSize, encodeInfoExport, encodeInfoString,
  encodeOptionReply, encodeRepMetaContext, encodeRepServer, getU32, newRequestHeader, parseInfoRequest,
  parseMetaContextRequest, parseOptionHeader, parseRequest, putChunkHeader, putSimpleReply, putU32, putU64, putU16,
  encodeString, decodeString,
} from "../protocol/codec.ts";
import { NbdError, toNbdErrno } from "../protocol/errors.ts";
import { type CheckedExport, type ExportContext, ExtentList } from "../devices/checked.ts";
import { type FileRange, FAST_ZERO, FUA, MAY_TRIM, REQ_ONE, isPromise } from "../devices/types.ts";
import type { Logger } from "./log.ts";

/** What a session needs from its connection. */
export interface Transport {
  /** Queue bytes for sending; the transport may keep a view of `b` until it is sent. */
  send(b: Uint8Array): void;
  /** Like send(), but the caller reuses `b` at once: the transport copies whatever it must keep. */
  sendTransient(b: Uint8Array): void;
  /** Optional zero-copy path: `header`, then `length` bytes of file `fd` at `offset`. */
  sendFile?(header: Uint8Array, fd: number, offset: number, length: number): void;
  /** Bytes queued but not yet taken by the kernel. */
  queued(): number;
  pause(): void;
  resume(): void;
  /** Close after everything queued has been sent. */
  end(): void;
  /** Close now, dropping anything queued. */
  destroy(): void;
}

export interface ExportTable {
  /** Look up by name; "" is the default export. */
  get(name: string): CheckedExport | undefined;
  list(): readonly CheckedExport[];
  /** True while the server is shutting down: new options get ERR_SHUTDOWN, new requests ESHUTDOWN. */
  shuttingDown(): boolean;
}

const enum Phase { ClientFlags, Options, Transmission, Closed }
const enum Rx { Header, Payload, Discard }

/** Output queued above this pauses reading from the client; reading resumes below LOW_WATER. */
const HIGH_WATER = 32 * 1024 * 1024;
const LOW_WATER = 8 * 1024 * 1024;
/** At most this many asynchronous requests in flight per connection. */
const MAX_IN_FLIGHT = 64;
/** Options longer than this are a denial of service: the connection closes. */
const MAX_OPTION_LENGTH = 1024 * 1024;
/** Reads at least this large consult extents to send holes as OFFSET_HOLE chunks. */
const HOLE_SCAN_MIN = 65536;
/** Reads at least this large from a plain file go out with sendfile(2) where the transport can. */
const SENDFILE_MIN = 32768;
const MAX_ERROR_MESSAGE = 4096;

const VALID_FLAGS: number[] = [];
VALID_FLAGS[NBD_CMD_READ] = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF;
VALID_FLAGS[NBD_CMD_WRITE] = NBD_CMD_FLAG_FUA;
VALID_FLAGS[NBD_CMD_DISC] = NBD_CMD_FLAG_FUA;
VALID_FLAGS[NBD_CMD_FLUSH] = NBD_CMD_FLAG_FUA;
VALID_FLAGS[NBD_CMD_TRIM] = NBD_CMD_FLAG_FUA;
VALID_FLAGS[NBD_CMD_CACHE] = NBD_CMD_FLAG_FUA;
VALID_FLAGS[NBD_CMD_WRITE_ZEROES] = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO;
VALID_FLAGS[NBD_CMD_BLOCK_STATUS] = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE;

const EMPTY = new Uint8Array(0);

let nextSessionId = 1;

export class Session {
  readonly id = nextSessionId++;
  private phase = Phase.ClientFlags;
  private readonly log: Logger;
  private readonly debug: boolean;

  // Handshake state (cold path).
  private hsBuf: Uint8Array = new Uint8Array(256);
  private hsLen = 0;
  private noZeroes = false;
  private structured = false;
  /** Meta contexts chosen by SET_META_CONTEXT, for the export named here (canonical name). */
  private metaExport: string | null = null;
  private metaSelected: ExportContext[] = [];
  private metaIds: number[] = [];

  // Transmission state (hot path).
  private exp: CheckedExport | null = null;
  private txFlags = 0;
  private rx = Rx.Header;
  private readonly hdr = newRequestHeader();
  private readonly hdrBuf = new Uint8Array(NBD_REQUEST_SIZE);
  /** Preallocated reply headers, sent with sendTransient (the transport copies if it must keep them). */
  private readonly rep16 = new Uint8Array(16);
  private readonly rep20 = new Uint8Array(20);
  private readonly rep28 = new Uint8Array(28);
  private readonly range: FileRange = { fd: -1, offset: 0 };
  private hdrFill = 0;
  private payload: Uint8Array = EMPTY;
  private payloadFill = 0;
  private discardLeft = 0;
  /** The request whose payload is being received (or discarded). */
  private pendingReq: PendingRequest | null = null;
  private inFlight = 0;
  private paused = false;
  private backlog: Uint8Array | null = null;
  /** Extents of the current large read (synchronous devices only; reused). */
  private readonly readExtents = new ExtentList();
  private disconnecting = false;

  constructor(private readonly t: Transport, private readonly exports: ExportTable, log: Logger, readonly peer: string) {
    this.log = log;
    this.debug = log.debugEnabled;
    t.send(encodeGreeting());
  }

  /** Feed bytes from the socket. */
  onData(chunk: Uint8Array): void {
    if (this.phase === Phase.Closed) return;
    if (this.phase !== Phase.Transmission) {
      this.onHandshakeData(chunk);
      return;
    }
    if (this.backlog || this.paused) {
      this.backlog = this.backlog ? concat(this.backlog, chunk) : chunk;
      return;
    }
    this.receive(chunk, 0);
  }

  /** The socket's output drained: maybe resume reading and finish a disconnect. */
  onDrain(): void {
    if (this.paused && this.t.queued() < LOW_WATER && this.inFlight < MAX_IN_FLIGHT) this.unpause();
    this.maybeFinishDisconnect();
  }

  /** The socket closed (either side). */
  onClose(): void {
    if (this.phase !== Phase.Closed) {
      if (this.inFlight > 0) this.log.info(`[${this.id}] ${this.peer}: connection closed with ${this.inFlight} request(s) in flight`);
      this.phase = Phase.Closed;
    }
  }

  /** Server shutdown: stop reading; close once in-flight requests have been answered. */
  shutdown(): void {
    if (this.phase === Phase.Closed) return;
    if (this.phase !== Phase.Transmission) {
      this.close();
      return;
    }
    this.disconnecting = true;
    this.t.pause();
    this.maybeFinishDisconnect();
  }

  get idle(): boolean {
    return this.phase === Phase.Closed;
  }

  private close(): void {
    if (this.phase === Phase.Closed) return;
    this.phase = Phase.Closed;
    this.t.end();
  }

  private protocolError(code: string, message: string): void {
    this.log.warn(`[${this.id}] ${this.peer}: protocol error ${code}: ${message}; closing the connection`);
    this.phase = Phase.Closed;
    this.t.destroy();
  }

  // ---------------------------------------------------------------- handshake (cold) ----------

  private onHandshakeData(chunk: Uint8Array): void {
    if (this.hsLen + chunk.length > this.hsBuf.length) {
      const grown = new Uint8Array(Math.max(this.hsBuf.length * 2, this.hsLen + chunk.length));
      grown.set(this.hsBuf.subarray(0, this.hsLen));
      this.hsBuf = grown;
    }
    this.hsBuf.set(chunk, this.hsLen);
    this.hsLen += chunk.length;
    let p = 0;
    while (this.phase === Phase.ClientFlags || this.phase === Phase.Options) {
      if (this.phase === Phase.ClientFlags) {
        if (this.hsLen - p < 4) break;
        const flags = getU32(this.hsBuf, p);
        p += 4;
        if (flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
          this.protocolError("BAD_CLIENT_FLAGS", `unknown client flags 0x${flags.toString(16)}`);
          return;
        }
        this.noZeroes = (flags & NBD_FLAG_C_NO_ZEROES) !== 0;
        this.phase = Phase.Options;
        continue;
      }
      if (this.hsLen - p < 16) break;
      const h = parseOptionHeader(this.hsBuf, p);
      if (!h.magicOk) {
        this.protocolError("BAD_OPTION_MAGIC", "option does not start with IHAVEOPT");
        return;
      }
      if (h.length > MAX_OPTION_LENGTH) {
        this.protocolError("OPTION_TOO_LARGE", `option ${optionName(h.option)} announces ${h.length} bytes of data`);
        return;
      }
      if (this.hsLen - p < 16 + h.length) break;
      const data = this.hsBuf.slice(p + 16, p + 16 + h.length);
      p += 16 + h.length;
      this.handleOption(h.option, data);
    }
    if (this.phase === Phase.Closed) return;
    // Keep what is left (an incomplete option, or requests pipelined after GO).
    const rest = this.hsBuf.slice(p, this.hsLen);
    this.hsLen = 0;
    if (this.phase === Phase.Transmission) {
      this.hsBuf = new Uint8Array(0);
      if (rest.length) this.receive(rest, 0);
    } else {
      this.hsBuf.set(rest, 0);
      this.hsLen = rest.length;
    }
  }

  private reply(option: number, type: number, data?: Uint8Array): void {
    this.t.send(encodeOptionReply(option, type, data));
  }
  private replyError(option: number, type: number, message: string): void {
    if (this.debug) this.log.debug(`[${this.id}] option ${optionName(option)}: error ${type.toString(16)} ${message}`);
    this.reply(option, type, encodeString(message.slice(0, MAX_ERROR_MESSAGE)));
  }

  private handleOption(option: number, data: Uint8Array): void {
    if (this.debug) this.log.debug(`[${this.id}] option ${optionName(option)} (${data.length} bytes)`);
    if (this.exports.shuttingDown() && option !== NBD_OPT_ABORT) {
      if (option === NBD_OPT_EXPORT_NAME) { this.close(); return; }
      this.replyError(option, NBD_REP_ERR_SHUTDOWN, "server is shutting down");
      return;
    }
    try {
      switch (option) {
        case NBD_OPT_EXPORT_NAME: return this.optExportName(data);
        case NBD_OPT_ABORT:
          this.reply(option, NBD_REP_ACK);
          this.close();
          return;
        case NBD_OPT_LIST: return this.optList(data);
        case NBD_OPT_STARTTLS:
          return this.replyError(option, NBD_REP_ERR_POLICY, "TLS is not available on this server");
        case NBD_OPT_INFO:
        case NBD_OPT_GO: return this.optInfoGo(option, data);
        case NBD_OPT_STRUCTURED_REPLY:
          if (data.length) return this.replyError(option, NBD_REP_ERR_INVALID, "STRUCTURED_REPLY takes no data");
          this.structured = true;
          return this.reply(option, NBD_REP_ACK);
        case NBD_OPT_LIST_META_CONTEXT:
        case NBD_OPT_SET_META_CONTEXT: return this.optMetaContext(option, data);
        default:
          return this.replyError(option, NBD_REP_ERR_UNSUP, `option ${optionName(option)} is not supported`);
      }
    } catch (e) {
      if (e instanceof OptionFormatError) return this.replyError(option, NBD_REP_ERR_INVALID, e.message);
      throw e;
    }
  }

  private optExportName(data: Uint8Array): void {
    const name = decodeString(data);
    const exp = this.exports.get(name);
    if (!exp) {
      // EXPORT_NAME cannot carry an error: the only answer is to close.
      this.log.info(`[${this.id}] ${this.peer}: unknown export "${name}" requested with EXPORT_NAME; closing`);
      this.close();
      return;
    }
    if (this.metaExport !== exp.name) this.metaSelected = [];
    this.startTransmission(exp);
    this.t.send(encodeExportNameReply(exp.size, this.txFlags, this.noZeroes));
  }

  private optList(data: Uint8Array): void {
    if (data.length) return this.replyError(NBD_OPT_LIST, NBD_REP_ERR_INVALID, "LIST takes no data");
    for (const e of this.exports.list()) this.reply(NBD_OPT_LIST, NBD_REP_SERVER, encodeRepServer(e.name, e.description));
    this.reply(NBD_OPT_LIST, NBD_REP_ACK);
  }

  private optInfoGo(option: number, data: Uint8Array): void {
    const req = parseInfoRequest(data);
    const exp = this.exports.get(req.name);
    if (!exp) return this.replyError(option, NBD_REP_ERR_UNKNOWN, `no export named "${req.name}"`);
    const flags = this.transmissionFlags(exp);
    this.reply(option, NBD_REP_INFO, encodeInfoExport(exp.size, flags));
    // Name and description are cheap: send them whether asked or not (clients ignore what they did not ask for).
    this.reply(option, NBD_REP_INFO, encodeInfoString(NBD_INFO_NAME, exp.name));
    if (exp.description) this.reply(option, NBD_REP_INFO, encodeInfoString(NBD_INFO_DESCRIPTION, exp.description));
    const bs = exp.blockSize;
    this.reply(option, NBD_REP_INFO, encodeInfoBlockSize(bs.minimum, bs.preferred, bs.maximum));
    this.reply(option, NBD_REP_ACK);
    if (option === NBD_OPT_GO) {
      if (this.metaExport !== exp.name) this.metaSelected = [];
      this.startTransmission(exp);
    }
  }

  private transmissionFlags(exp: CheckedExport): number {
    return exp.flags | (this.structured ? NBD_FLAG_SEND_DF : 0);
  }

  private optMetaContext(option: number, data: Uint8Array): void {
    const set = option === NBD_OPT_SET_META_CONTEXT;
    if (set) { this.metaSelected = []; this.metaIds = []; this.metaExport = null; }
    const req = parseMetaContextRequest(data);
    if (!this.structured) return this.replyError(option, NBD_REP_ERR_INVALID, "meta contexts need structured replies first");
    const exp = this.exports.get(req.name);
    if (!exp) return this.replyError(option, NBD_REP_ERR_UNKNOWN, `no export named "${req.name}"`);
    const chosen: number[] = [];
    const add = (i: number) => { if (!chosen.includes(i)) chosen.push(i); };
    if (req.queries.length === 0) {
      if (!set) exp.contexts.forEach((_, i) => add(i));
    } else {
      for (const q of req.queries) {
        exp.contexts.forEach((c, i) => {
          if (c.name === q) add(i);
          // Namespace wildcards ("base:", "qemu:") are for LIST only.
          else if (!set && q.endsWith(":") && c.name.startsWith(q)) add(i);
        });
      }
    }
    for (const i of chosen) {
      const c = exp.contexts[i]!;
      this.reply(option, NBD_REP_META_CONTEXT, encodeRepMetaContext(set ? i + 1 : 0, c.name));
    }
    if (set) {
      this.metaExport = exp.name;
      this.metaSelected = chosen.map((i) => exp.contexts[i]!);
      this.metaIds = chosen.map((i) => i + 1);
    }
    this.reply(option, NBD_REP_ACK);
  }

  private startTransmission(exp: CheckedExport): void {
    this.exp = exp;
    this.txFlags = this.transmissionFlags(exp);
    this.phase = Phase.Transmission;
    this.log.info(`[${this.id}] ${this.peer}: export "${exp.name}" (${exp.size} bytes, ${this.structured ? "structured" : "simple"} replies${this.metaSelected.length ? `, contexts ${this.metaSelected.map((c) => c.name).join(",")}` : ""})`);
  }

  // ---------------------------------------------------------------- receiver (hot) -------------

  private receive(chunk: Uint8Array, pos: number): void {
    const len = chunk.length;
    while (pos < len) {
      if (this.phase !== Phase.Transmission || this.disconnecting) return;
      if (this.paused) {
        this.backlog = pos === 0 ? chunk : chunk.subarray(pos);
        return;
      }
      switch (this.rx) {
        case Rx.Header: {
          if (this.hdrFill === 0 && len - pos >= NBD_REQUEST_SIZE) {
            if (!parseRequest(chunk, pos, this.hdr)) return this.badMagic();
            pos += NBD_REQUEST_SIZE;
          } else {
            const n = Math.min(NBD_REQUEST_SIZE - this.hdrFill, len - pos);
            this.hdrBuf.set(chunk.subarray(pos, pos + n), this.hdrFill);
            this.hdrFill += n;
            pos += n;
            if (this.hdrFill < NBD_REQUEST_SIZE) return;
            this.hdrFill = 0;
            if (!parseRequest(this.hdrBuf, 0, this.hdr)) return this.badMagic();
          }
          const h = this.hdr;
          if (h.type === NBD_CMD_WRITE && h.length > 0) {
            const req = this.newRequest();
            if (h.length > HARD_MAX_PAYLOAD) {
              req.error = new NbdError(NBD_EINVAL, `write payload of ${h.length} bytes exceeds the maximum ${HARD_MAX_PAYLOAD}`);
              this.pendingReq = req;
              this.discardLeft = h.length;
              this.rx = Rx.Discard;
              continue;
            }
            if (len - pos >= h.length) {
              // The whole payload is in this chunk: take a view (each chunk is its own buffer).
              pos += h.length;
              this.dispatch(req, chunk.subarray(pos - h.length, pos));
              continue;
            }
            this.pendingReq = req;
            this.payload = new Uint8Array(h.length);
            this.payloadFill = 0;
            this.rx = Rx.Payload;
            continue;
          }
          this.dispatch(this.newRequest(), EMPTY);
          continue;
        }
        case Rx.Payload: {
          const n = Math.min(this.payload.length - this.payloadFill, len - pos);
          this.payload.set(chunk.subarray(pos, pos + n), this.payloadFill);
          this.payloadFill += n;
          pos += n;
          if (this.payloadFill === this.payload.length) {
            const req = this.pendingReq!;
            const payload = this.payload;
            this.pendingReq = null;
            this.payload = EMPTY;
            this.rx = Rx.Header;
            this.dispatch(req, payload);
          }
          continue;
        }
        case Rx.Discard: {
          const n = Math.min(this.discardLeft, len - pos);
          this.discardLeft -= n;
          pos += n;
          if (this.discardLeft === 0) {
            const req = this.pendingReq!;
            this.pendingReq = null;
            this.rx = Rx.Header;
            this.dispatch(req, EMPTY);
          }
          continue;
        }
      }
    }
  }

  private badMagic(): void {
    this.protocolError("BAD_REQUEST_MAGIC", "request does not start with NBD_REQUEST_MAGIC");
  }

  private newRequest(): PendingRequest {
    const h = this.hdr;
    return new PendingRequest(h.type, h.flags, h.cookieHi, h.cookieLo, h.offset, h.offsetTooBig, h.length);
  }

  // ---------------------------------------------------------------- dispatch (hot) -------------

  private dispatch(req: PendingRequest, payload: Uint8Array): void {
    if (this.debug) this.log.debug(`[${this.id}] ${commandName(req.type)} flags=0x${req.flags.toString(16)} offset=${req.offset} length=${req.length}`);
    if (req.type === NBD_CMD_DISC) {
      this.disconnecting = true;
      this.t.pause();
      this.log.info(`[${this.id}] ${this.peer}: disconnect requested`);
      this.maybeFinishDisconnect();
      return;
    }
    let r: unknown;
    try {
      if (req.error) throw req.error;
      r = this.execute(req, payload);
    } catch (e) {
      this.fail(req, e);
      return;
    }
    if (isPromise(r)) {
      this.inFlight++;
      if (this.inFlight >= MAX_IN_FLIGHT) this.pauseReading();
      r.then(() => this.asyncDone(req, null), (e: unknown) => this.asyncDone(req, e));
    }
  }

  private asyncDone(req: PendingRequest, err: unknown): void {
    this.inFlight--;
    if (err !== null) this.fail(req, err);
    if (this.paused && this.inFlight < MAX_IN_FLIGHT && this.t.queued() < LOW_WATER) this.unpause();
    this.maybeFinishDisconnect();
  }

  /** Run one request. Returns a Promise when the device answered asynchronously; the reply is sent by then. */
  private execute(req: PendingRequest, payload: Uint8Array): unknown {
    const exp = this.exp!;
    const type = req.type;
    if (type > NBD_CMD_BLOCK_STATUS) throw new NbdError(NBD_EINVAL, `unknown command ${type}`);
    const badFlags = req.flags & ~VALID_FLAGS[type]!;
    if (badFlags) throw new NbdError(NBD_EINVAL, `flags 0x${badFlags.toString(16)} are not valid for ${commandName(type)}`);
    if (req.offsetTooBig) throw new NbdError(type === NBD_CMD_WRITE || type === NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL, `offset ${req.offset} is beyond 2^53`);
    if (this.exports.shuttingDown()) throw new NbdError(NBD_ESHUTDOWN, "server is shutting down");
    const fua = req.flags & NBD_CMD_FLAG_FUA ? FUA : 0;
    switch (type) {
      case NBD_CMD_READ: return this.read(req);
      case NBD_CMD_WRITE: {
        if (payload.length !== req.length) payload = EMPTY; // zero-length write
        return this.after(req, exp.write(payload, req.offset, fua));
      }
      case NBD_CMD_FLUSH: return this.after(req, exp.flush());
      case NBD_CMD_TRIM: return this.after(req, exp.trim(req.offset, req.length, fua));
      case NBD_CMD_CACHE: return this.after(req, exp.cache(req.offset, req.length));
      case NBD_CMD_WRITE_ZEROES: {
        let f = fua;
        if (!(req.flags & NBD_CMD_FLAG_NO_HOLE)) f |= MAY_TRIM;
        if (req.flags & NBD_CMD_FLAG_FAST_ZERO) f |= FAST_ZERO;
        return this.after(req, exp.zero(req.offset, req.length, f));
      }
      case NBD_CMD_BLOCK_STATUS: return this.blockStatus(req);
    }
  }

  /** Send the success reply now, or when `r` resolves. */
  private after(req: PendingRequest, r: unknown): unknown {
    if (isPromise(r)) return r.then(() => this.ok(req));
    this.ok(req);
  }

  private ok(req: PendingRequest): void {
    if (this.phase === Phase.Closed) return;
    if (this.structured) {
      putChunkHeader(this.rep20, 0, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, req.cookieHi, req.cookieLo, 0);
      this.t.sendTransient(this.rep20);
    } else {
      putSimpleReply(this.rep16, 0, 0, req.cookieHi, req.cookieLo);
      this.t.sendTransient(this.rep16);
    }
  }

  private fail(req: PendingRequest, e: unknown): void {
    const errno = toNbdErrno(e);
    const msg = e instanceof Error ? e.message : String(e);
    if (e instanceof NbdError) {
      if (this.debug) this.log.debug(`[${this.id}] ${commandName(req.type)} offset=${req.offset} length=${req.length}: ${errnoName(errno)}: ${msg}`);
    } else {
      this.log.error(`[${this.id}] ${commandName(req.type)} offset=${req.offset} length=${req.length} failed: ${msg} (replying ${errnoName(errno)})`);
    }
    if (this.phase === Phase.Closed) return;
    if (this.structured) {
      const m = encodeString(msg.slice(0, 512));
      const b = new Uint8Array(20 + 6 + m.length);
      putChunkHeader(b, 0, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, req.cookieHi, req.cookieLo, 6 + m.length);
      putU32(b, 20, errno);
      putU16(b, 24, m.length);
      b.set(m, 26);
      this.t.send(b);
    } else {
      const b = new Uint8Array(16);
      putSimpleReply(b, 0, errno, req.cookieHi, req.cookieLo);
      this.t.send(b);
    }
  }

  private read(req: PendingRequest): unknown {
    const exp = this.exp!;
    const len = req.length;
    if (len > HARD_MAX_PAYLOAD) throw new NbdError(NBD_EINVAL, `read of ${len} bytes exceeds the maximum ${HARD_MAX_PAYLOAD}`);
    const zeroCopy = len >= SENDFILE_MIN && this.t.sendFile !== undefined;
    if (!this.structured) {
      if (zeroCopy && exp.fileRange(req.offset, len, this.range)) {
        putSimpleReply(this.rep16, 0, 0, req.cookieHi, req.cookieLo);
        this.t.sendFile!(this.rep16, this.range.fd, this.range.offset, len);
        return;
      }
      const b = Buffer.allocUnsafe(16 + len);
      const r = exp.read(b.subarray(16), req.offset);
      if (isPromise(r)) return r.then(() => this.sendSimpleRead(req, b));
      this.sendSimpleRead(req, b);
      return;
    }
    if (len === 0) {
      exp.read(EMPTY, req.offset);
      this.ok(req);
      return;
    }
    if (len >= HOLE_SCAN_MIN && exp.caps.canExtents && !(req.flags & NBD_CMD_FLAG_DF)) {
      const list = this.readExtents;
      const r = exp.extents(exp.contexts[0]!, req.offset, len, 0, list);
      if (isPromise(r)) return this.sparseRead(req, r, list);
      if (list.lengths.length > 1 || list.types[0]! & NBD_STATE_ZERO) return this.sparseRead(req, undefined, list);
    }
    if (zeroCopy && exp.fileRange(req.offset, len, this.range)) {
      putChunkHeader(this.rep28, 0, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, req.cookieHi, req.cookieLo, 8 + len);
      putU64(this.rep28, 20, req.offset);
      this.t.sendFile!(this.rep28, this.range.fd, this.range.offset, len);
      return;
    }
    const b = Buffer.allocUnsafe(28 + len);
    const r = exp.read(b.subarray(28), req.offset);
    if (isPromise(r)) return r.then(() => this.sendDataChunk(req, b));
    this.sendDataChunk(req, b);
  }

  private sendSimpleRead(req: PendingRequest, b: Uint8Array): void {
    if (this.phase === Phase.Closed) return;
    putSimpleReply(b, 0, 0, req.cookieHi, req.cookieLo);
    this.t.send(b);
  }

  private sendDataChunk(req: PendingRequest, b: Uint8Array): void {
    if (this.phase === Phase.Closed) return;
    putChunkHeader(b, 0, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, req.cookieHi, req.cookieLo, 8 + req.length);
    putU64(b, 20, req.offset);
    this.t.send(b);
  }

  /** A large structured read: zero extents become OFFSET_HOLE chunks, the rest OFFSET_DATA. */
  private async sparseRead(req: PendingRequest, pending: Promise<unknown> | undefined, shared: ExtentList): Promise<void> {
    const exp = this.exp!;
    if (pending) await pending;
    // Copy the extents: the shared list is reused by the next request while we await reads.
    const list = { lengths: shared.lengths.slice(), types: shared.types.slice() };
    const n = list.lengths.length;
    let off = req.offset;
    const end = req.offset + req.length;
    // Read all data first, so an error can be reported before any chunk is sent.
    const chunks: Uint8Array[] = [];
    for (let i = 0; i < n && off < end; i++) {
      const l = Math.min(list.lengths[i]!, end - off);
      const last = off + l >= end;
      if (list.types[i]! & NBD_STATE_ZERO) {
        const b = new Uint8Array(32);
        putChunkHeader(b, 0, last ? NBD_REPLY_FLAG_DONE : 0, NBD_REPLY_TYPE_OFFSET_HOLE, req.cookieHi, req.cookieLo, 12);
        putU64(b, 20, off);
        putU32(b, 28, l);
        chunks.push(b);
      } else {
        const b = Buffer.allocUnsafe(28 + l);
        const rr = exp.read(b.subarray(28), off);
        if (isPromise(rr)) await rr;
        putChunkHeader(b, 0, last ? NBD_REPLY_FLAG_DONE : 0, NBD_REPLY_TYPE_OFFSET_DATA, req.cookieHi, req.cookieLo, 8 + l);
        putU64(b, 20, off);
        chunks.push(b);
      }
      off += l;
    }
    if (off < end) {
      // Extents did not cover the range (should not happen): read the rest as data.
      const b = Buffer.allocUnsafe(28 + end - off);
      const rr = exp.read(b.subarray(28), off);
      if (isPromise(rr)) await rr;
      putChunkHeader(b, 0, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, req.cookieHi, req.cookieLo, 8 + end - off);
      putU64(b, 20, off);
      chunks.push(b);
    }
    if (this.phase === Phase.Closed) return;
    for (const c of chunks) this.t.send(c);
  }

  private blockStatus(req: PendingRequest): unknown {
    const exp = this.exp!;
    if (!this.structured || this.metaSelected.length === 0) {
      throw new NbdError(NBD_EINVAL, "BLOCK_STATUS needs structured replies and a selected meta context");
    }
    if (req.length === 0) throw new NbdError(NBD_EINVAL, "BLOCK_STATUS of zero length");
    const flags = req.flags & NBD_CMD_FLAG_REQ_ONE ? REQ_ONE : 0;
    // One BLOCK_STATUS chunk per selected context, DONE on the last.
    const n = this.metaSelected.length;
    const lists: ExtentList[] = [];
    let pending: Promise<unknown>[] | null = null;
    for (let i = 0; i < n; i++) {
      const list = new ExtentList();
      lists.push(list);
      const r = exp.extents(this.metaSelected[i]!, req.offset, req.length, flags, list);
      if (isPromise(r)) (pending ??= []).push(r);
    }
    const ids = this.metaIds;
    const send = () => {
      if (this.phase === Phase.Closed) return;
      for (let i = 0; i < n; i++) this.t.send(this.encodeStatusChunk(req, ids[i]!, lists[i]!, i === n - 1));
    };
    if (pending) return Promise.all(pending).then(send);
    send();
  }

  private encodeStatusChunk(req: PendingRequest, id: number, list: ExtentList, last: boolean): Uint8Array {
    const n = list.lengths.length;
    const b = new Uint8Array(20 + 4 + 8 * n);
    putChunkHeader(b, 0, last ? NBD_REPLY_FLAG_DONE : 0, NBD_REPLY_TYPE_BLOCK_STATUS, req.cookieHi, req.cookieLo, 4 + 8 * n);
    putU32(b, 20, id);
    for (let i = 0; i < n; i++) {
      putU32(b, 24 + 8 * i, list.lengths[i]!);
      putU32(b, 28 + 8 * i, list.types[i]!);
    }
    return b;
  }

  // ---------------------------------------------------------------- flow control ---------------

  /** Called by the transport after send() when output is piling up. */
  checkBackpressure(): void {
    if (!this.paused && this.t.queued() > HIGH_WATER) this.pauseReading();
  }

  private pauseReading(): void {
    if (this.paused) return;
    this.paused = true;
    this.t.pause();
  }

  private unpause(): void {
    this.paused = false;
    if (!this.disconnecting) this.t.resume();
    const b = this.backlog;
    if (b) {
      this.backlog = null;
      this.receive(b, 0);
    }
  }

  private maybeFinishDisconnect(): void {
    if (!this.disconnecting || this.inFlight > 0 || this.phase === Phase.Closed) return;
    // Everything answered: make writes durable, then close once the output has drained.
    const exp = this.exp;
    if (exp && exp.caps.canFlush) {
      try {
        const r = exp.flush();
        if (isPromise(r)) {
          this.inFlight++;
          r.then(() => { this.inFlight--; this.close(); }, (e: unknown) => {
            this.inFlight--;
            this.log.error(`[${this.id}] flush at disconnect failed: ${(e as Error).message}`);
            this.close();
          });
          return;
        }
      } catch (e) {
        this.log.error(`[${this.id}] flush at disconnect failed: ${(e as Error).message}`);
      }
    }
    this.close();
  }
}

class PendingRequest {
  error: NbdError | null = null;
  constructor(
    readonly type: number, readonly flags: number, readonly cookieHi: number, readonly cookieLo: number,
    readonly offset: number, readonly offsetTooBig: boolean, readonly length: number,
  ) {}
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  const c = new Uint8Array(a.length + b.length);
  c.set(a, 0);
  c.set(b, a.length);
  return c;
}
