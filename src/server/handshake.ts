// The fixed-newstyle handshake (cold path): greeting, client flags, option haggling and its state
// (structured replies, extended headers, meta contexts), the TLS modes' option rules (STARTTLS,
// FORCEDTLS), and export selection at GO / EXPORT_NAME. It ends with a Negotiated result, or hands
// over to TLS.
import {
  HARD_MAX_PAYLOAD, NBD_FLAG_BLOCK_STATUS_PAYLOAD, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_FLAG_SEND_DF,
  NBD_INFO_BLOCK_SIZE, NBD_INFO_DESCRIPTION, NBD_INFO_NAME, NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME, NBD_OPT_EXTENDED_HEADERS,
  NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_LIST, NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT, NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, NBD_REP_ERR_EXT_HEADER_REQD, NBD_REP_ERR_INVALID, NBD_REP_ERR_POLICY,
  NBD_REP_ERR_SHUTDOWN, NBD_REP_ERR_TLS_REQD, NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_UNSUP, NBD_REP_INFO, NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
  optionName,
} from "../protocol/constants.ts";
import {
  OptionFormatError, decodeString, encodeExportNameReply, encodeGreeting, encodeInfoBlockSize, encodeInfoExport,
  encodeInfoString, encodeOptionReply, encodeRepMetaContext, encodeRepServer, encodeString, getU32,
  parseInfoRequest, parseMetaContextRequest, parseOptionHeader,
} from "../protocol/codec.ts";
import type { CheckedExport, ExportContext } from "../devices/checked.ts";
import type { ExportLease } from "./exports.ts";
import { clientFields } from "./identity.ts";
import type { Logger } from "./log.ts";
import type { ExportTable, Negotiated, SessionLink, TlsMode, Transport } from "./types.ts";

/** Options longer than this are a denial of service: the connection closes. */
const MAX_OPTION_LENGTH = 1024 * 1024;
const MAX_ERROR_MESSAGE = 4096;

/** How a handshake starts: its TLS mode, and whether it is the one restarted inside TLS. */
export interface HandshakeOptions {
  tls?: TlsMode;
  /** Haggling restarts inside TLS: no greeting, client flags already read (NO_ZEROES carried over). */
  encrypted?: { noZeroes: boolean };
}

/**
 * One connection's handshake. The session feeds it bytes until it returns what followed the
 * handshake; `result` then says what was chosen, or `startTls` that STARTTLS was acknowledged
 * (the bytes returned are then the start of the TLS handshake, and a new Handshake takes over
 * inside TLS). It closes the session itself on ABORT, on protocol errors and where EXPORT_NAME
 * cannot answer.
 */
export class Handshake {
  private buf: Uint8Array = new Uint8Array(256);
  private len = 0;
  private gotClientFlags = false;
  private noZeroes = false;
  private structured = false;
  /** Extended headers were agreed: they take precedence over (and imply) structured replies. */
  private extended = false;
  /** Meta contexts chosen by SET_META_CONTEXT, for the export named here (canonical name). */
  private metaExport: string | null = null;
  private metaSelected: ExportContext[] = [];
  private metaIds: number[] = [];
  private readonly debug: boolean;
  private readonly tls: TlsMode;
  private readonly encrypted: boolean;
  /** Leases taken while handling the current option; all but the chosen one are given back after it. */
  private leases: ExportLease[] = [];
  /** Set when GO or EXPORT_NAME chose an export: the handshake is over. */
  result: Negotiated | null = null;
  /** Set when STARTTLS was acknowledged: what follows is TLS. */
  startTls = false;

  constructor(
    private readonly s: SessionLink, private readonly t: Transport, private readonly exports: ExportTable,
    private readonly log: Logger, opts: HandshakeOptions = {},
  ) {
    this.debug = log.debugEnabled;
    this.tls = opts.tls ?? "off";
    this.encrypted = opts.encrypted !== undefined;
    if (opts.encrypted) {
      this.gotClientFlags = true;
      this.noZeroes = opts.encrypted.noZeroes;
    } else {
      t.send(encodeGreeting());
    }
  }

  /** Whether the client asked for NO_ZEROES (carried into the handshake restarted inside TLS). */
  get clientNoZeroes(): boolean { return this.noZeroes; }

  /**
   * Feed bytes from the socket. Returns the bytes that followed the handshake (requests pipelined
   * after GO, possibly none) once an export is chosen; null while haggling goes on or once closed.
   */
  feed(chunk: Uint8Array): Uint8Array | null {
    if (this.len + chunk.length > this.buf.length) {
      const grown = new Uint8Array(Math.max(this.buf.length * 2, this.len + chunk.length));
      grown.set(this.buf.subarray(0, this.len));
      this.buf = grown;
    }
    this.buf.set(chunk, this.len);
    this.len += chunk.length;
    let p = 0;
    while (this.result === null && !this.startTls && !this.s.closed) {
      if (!this.gotClientFlags) {
        if (this.len - p < 4) break;
        const flags = getU32(this.buf, p);
        p += 4;
        if (flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
          this.s.protocolError("BAD_CLIENT_FLAGS", `unknown client flags 0x${flags.toString(16)}`);
          return null;
        }
        this.noZeroes = (flags & NBD_FLAG_C_NO_ZEROES) !== 0;
        this.gotClientFlags = true;
        continue;
      }
      if (this.len - p < 16) break;
      const h = parseOptionHeader(this.buf, p);
      if (!h.magicOk) {
        this.s.protocolError("BAD_OPTION_MAGIC", "option does not start with IHAVEOPT");
        return null;
      }
      if (h.length > MAX_OPTION_LENGTH) {
        this.s.protocolError("OPTION_TOO_LARGE", `option ${optionName(h.option)} announces ${h.length} bytes of data`);
        return null;
      }
      if (this.len - p < 16 + h.length) break;
      const data = this.buf.slice(p + 16, p + 16 + h.length);
      p += 16 + h.length;
      try {
        this.handleOption(h.option, data);
      } finally {
        this.releaseLeases();
      }
    }
    if (this.s.closed) return null;
    if (this.result !== null || this.startTls) {
      // Requests pipelined after GO go to the transmission phase; bytes after STARTTLS to TLS.
      const rest = this.buf.slice(p, this.len);
      this.buf = new Uint8Array(0);
      this.len = 0;
      return rest;
    }
    // Keep an incomplete option where it is: move it only when something before it was consumed,
    // so an option dribbled in one byte at a time costs linear time, not a copy per byte.
    if (p > 0) {
      this.buf.copyWithin(0, p, this.len);
      this.len -= p;
    }
    return null;
  }

  /**
   * The one place the handshake asks for an export (GO, INFO, EXPORT_NAME, meta contexts), with
   * the client's identity (address, and the TLS identity once encrypted).
   */
  private resolve(name: string): CheckedExport | undefined {
    const l = this.exports.resolve(name, this.s.client);
    if (l === undefined) return undefined;
    this.leases.push(l);
    return l.exp;
  }

  private releaseLeases(): void {
    const keep = this.result?.lease;
    for (const l of this.leases) if (l !== keep) l.release();
    this.leases = [];
  }

  private reply(option: number, type: number, data?: Uint8Array): void {
    this.t.send(encodeOptionReply(option, type, data));
  }
  private replyError(option: number, type: number, message: string): void {
    if (this.debug) this.log.debug(`[${this.s.id}] option ${optionName(option)}: error ${type.toString(16)} ${message}`);
    this.reply(option, type, encodeString(message.slice(0, MAX_ERROR_MESSAGE)));
  }

  private handleOption(option: number, data: Uint8Array): void {
    if (this.debug) this.log.debug(`[${this.s.id}] option ${optionName(option)} (${data.length} bytes)`);
    if (this.exports.shuttingDown() && option !== NBD_OPT_ABORT) {
      if (option === NBD_OPT_EXPORT_NAME) { this.s.close(); return; }
      this.replyError(option, NBD_REP_ERR_SHUTDOWN, "server is shutting down");
      return;
    }
    if (this.tls === "require" && !this.encrypted && option !== NBD_OPT_STARTTLS && option !== NBD_OPT_ABORT) {
      // FORCEDTLS: nothing but STARTTLS and ABORT before TLS; EXPORT_NAME cannot carry the error.
      if (option === NBD_OPT_EXPORT_NAME) {
        this.log.info(`[${this.s.id}] ${this.s.peer}: EXPORT_NAME before STARTTLS on a server that requires TLS; closing`);
        this.s.close();
        return;
      }
      return this.replyError(option, NBD_REP_ERR_TLS_REQD, "this server requires TLS: send NBD_OPT_STARTTLS first");
    }
    try {
      switch (option) {
        case NBD_OPT_EXPORT_NAME: return this.optExportName(data);
        case NBD_OPT_ABORT:
          this.reply(option, NBD_REP_ACK);
          this.s.close();
          return;
        case NBD_OPT_LIST: return this.optList(data);
        case NBD_OPT_STARTTLS: return this.optStartTls(data);
        case NBD_OPT_INFO:
        case NBD_OPT_GO: return this.optInfoGo(option, data);
        case NBD_OPT_STRUCTURED_REPLY:
          if (data.length) return this.replyError(option, NBD_REP_ERR_INVALID, "STRUCTURED_REPLY takes no data");
          if (this.extended) return this.replyError(option, NBD_REP_ERR_EXT_HEADER_REQD, "extended headers are already in use");
          this.structured = true;
          return this.reply(option, NBD_REP_ACK);
        case NBD_OPT_EXTENDED_HEADERS:
          if (data.length) return this.replyError(option, NBD_REP_ERR_INVALID, "EXTENDED_HEADERS takes no data");
          this.extended = true;
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

  /** ACK, then stop parsing: the session hands what follows to the transport's TLS upgrade. */
  private optStartTls(data: Uint8Array): void {
    const o = NBD_OPT_STARTTLS;
    if (this.tls === "off") return this.replyError(o, NBD_REP_ERR_POLICY, "TLS is not enabled on this server");
    if (data.length) return this.replyError(o, NBD_REP_ERR_INVALID, "STARTTLS takes no data");
    if (this.encrypted) return this.replyError(o, NBD_REP_ERR_INVALID, "TLS is already on");
    this.reply(o, NBD_REP_ACK);
    this.startTls = true;
  }

  private optExportName(data: Uint8Array): void {
    const name = decodeString(data);
    if (this.extended) {
      // A client that agreed to extended headers MUST NOT use EXPORT_NAME, which cannot carry an error.
      this.log.info(`[${this.s.id}] ${this.s.peer}: EXPORT_NAME after extended headers were agreed; closing`);
      this.s.close();
      return;
    }
    const exp = this.resolve(name);
    if (!exp) {
      // EXPORT_NAME cannot carry an error: the only answer is to close.
      this.log.info(`[${this.s.id}] ${this.s.peer}: unknown export "${name}" requested with EXPORT_NAME; closing`);
      this.s.close();
      return;
    }
    this.choose(exp, false);
    this.t.send(encodeExportNameReply(exp.size, this.transmissionFlags(exp), this.noZeroes));
  }

  private optList(data: Uint8Array): void {
    if (data.length) return this.replyError(NBD_OPT_LIST, NBD_REP_ERR_INVALID, "LIST takes no data");
    for (const e of this.exports.list(this.s.client)) this.reply(NBD_OPT_LIST, NBD_REP_SERVER, encodeRepServer(e.name, e.description));
    this.reply(NBD_OPT_LIST, NBD_REP_ACK);
  }

  private optInfoGo(option: number, data: Uint8Array): void {
    const req = parseInfoRequest(data);
    const exp = this.resolve(req.name);
    if (!exp) return this.replyError(option, NBD_REP_ERR_UNKNOWN, `no export named "${req.name}"`);
    const flags = this.transmissionFlags(exp);
    this.reply(option, NBD_REP_INFO, encodeInfoExport(exp.size, flags));
    // Name and description are cheap: send them whether asked or not (clients ignore what they did not ask for).
    this.reply(option, NBD_REP_INFO, encodeInfoString(NBD_INFO_NAME, exp.name));
    if (exp.description) this.reply(option, NBD_REP_INFO, encodeInfoString(NBD_INFO_DESCRIPTION, exp.description));
    // Sent whether asked or not (a server MAY send unrequested information); but only a GO that
    // asked for it commits the client to the limits (see choose).
    const bs = exp.blockSize;
    this.reply(option, NBD_REP_INFO, encodeInfoBlockSize(bs.minimum, bs.preferred, bs.maximum));
    this.reply(option, NBD_REP_ACK);
    if (option === NBD_OPT_GO) this.choose(exp, req.infos.includes(NBD_INFO_BLOCK_SIZE));
  }

  private transmissionFlags(exp: CheckedExport): number {
    let f = exp.flags;
    if (this.structured || this.extended) f |= NBD_FLAG_SEND_DF;
    // The payload form of BLOCK_STATUS: only with extended headers and contexts selected for `exp`.
    if (this.extended && this.metaExport === exp.name && this.metaSelected.length > 0) f |= NBD_FLAG_BLOCK_STATUS_PAYLOAD;
    return f;
  }

  private optMetaContext(option: number, data: Uint8Array): void {
    const set = option === NBD_OPT_SET_META_CONTEXT;
    if (set) { this.metaSelected = []; this.metaIds = []; this.metaExport = null; }
    const req = parseMetaContextRequest(data);
    if (!this.structured && !this.extended) {
      return this.replyError(option, NBD_REP_ERR_INVALID, "meta contexts need structured replies or extended headers first");
    }
    const exp = this.resolve(req.name);
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

  /**
   * GO or EXPORT_NAME chose `exp`: the handshake is over. `agreedSizes`: the GO asked for
   * NBD_INFO_BLOCK_SIZE, so the client promised to obey the limits it was sent (an INFO that
   * asked, or a GO that did not, promises nothing): its payloads are held to the advertised maximum.
   */
  private choose(exp: CheckedExport, agreedSizes: boolean): void {
    if (this.metaExport !== exp.name) this.metaSelected = [];
    const lease = this.leases.find((l) => l.exp === exp)!;
    const maxPayload = agreedSizes ? Math.min(exp.blockSize.maximum, HARD_MAX_PAYLOAD) : HARD_MAX_PAYLOAD;
    const structured = this.structured || this.extended;
    this.result = { exp, lease, structured, extended: this.extended, maxPayload, contexts: this.metaSelected, contextIds: this.metaIds };
    const replies = this.extended ? "extended headers" : structured ? "structured replies" : "simple replies";
    this.log.info(`[${this.s.id}] ${this.s.peer}: export "${exp.name}" (${exp.size} bytes, ${replies}, payloads up to ${maxPayload}${this.metaSelected.length ? `, contexts ${this.metaSelected.map((c) => c.name).join(",")}` : ""})`,
      { conn: this.s.id, ...clientFields(this.s.client), export: exp.name });
  }
}
