// The option phase (cold path, written for clarity): the greeting, STARTTLS for nbds:// targets,
// fixed newstyle option haggling (LIST, INFO, GO, STRUCTURED_REPLY, EXTENDED_HEADERS,
// LIST/SET_META_CONTEXT, ABORT), the EXPORT_NAME fallback, and oldstyle servers. Ends in go(),
// which returns a plain `Negotiated`, or in abort().
import {
  EXPORT_NAME_PADDING, NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME, NBD_OPT_EXTENDED_HEADERS, NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT, NBD_OPT_STARTTLS, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO, NBD_REP_META_CONTEXT, NBD_REP_SERVER, optionName, replyTypeName,
} from "../protocol/constants.ts";
import { NbdClosedError, NbdDisconnectedError, NbdOptionError, NbdProtocolViolation, NbdUsageError } from "./errors.ts";
import { HandshakeChannel } from "./handshake-channel.ts";
import type { ConnectOptions, ExportInfo, ExportListing, HandshakeStyle, Negotiated } from "./negotiated.ts";
import {
  clientFlags, exportNameReply, greetingKind, infoRequest, InfoReplies, metaContextReply, metaRequest, nbdString,
  OLDSTYLE_HEADER, oldstyleExport, OPTION_REPLY_HEADER, optionReplyHeader, optionRequest, serverReply,
} from "./option-codec.ts";
import { type ClientTls, loadClientTls } from "./tls.ts";
import { openConn } from "./transport.ts";
import type { NbdTarget } from "./uri.ts";
import { u16 } from "./wire.ts";

/**
 * The option phase of one connection. Open it with {@link Negotiation.open}, ask LIST, INFO and
 * meta-context questions, then either {@link go} (enter transmission) or {@link abort}.
 * Only one option is in flight at a time, as the protocol requires.
 *
 * Every byte goes through one {@link HandshakeChannel}. For an nbds:// target STARTTLS comes
 * first: after its ACK the channel's transport is upgraded, and the options that follow do not
 * notice.
 */
export class Negotiation {
  /** "newstyle-fixed" normally; "newstyle" for servers without fixed newstyle (only EXPORT_NAME works); "oldstyle". */
  readonly style: HandshakeStyle;
  /** Whether STRUCTURED_REPLY was acknowledged. */
  structured = false;
  /** Whether EXTENDED_HEADERS was acknowledged (it implies chunked replies, and rules out EXPORT_NAME). */
  extended = false;
  /** Meta contexts selected by the last SET_META_CONTEXT: name → id. */
  metaContexts = new Map<string, number>();
  /** Whether the connection is encrypted (STARTTLS succeeded). */
  tls = false;
  private finished = false;

  private constructor(
    private readonly io: HandshakeChannel, style: HandshakeStyle, private readonly noZeroes: boolean,
    private readonly oldstyleInfo: ExportInfo | null,
  ) {
    this.style = style;
  }

  /** Connects (transport.ts picks Bun's or Node's transport) and reads the greeting. */
  static async open(target: NbdTarget, opts: ConnectOptions = {}): Promise<Negotiation> {
    const timeoutMs = opts.connectTimeoutMs ?? 10_000;
    const tls = target.tls ? loadClientTls(target) : null; // credential errors before connecting
    const io = new HandshakeChannel(await openConn(target, timeoutMs), timeoutMs);
    try {
      const g = await io.read(16, "the greeting");
      let neg: Negotiation;
      if (greetingKind(g) === "newstyle") {
        const f = clientFlags(u16(await io.read(2, "the handshake flags"), 0));
        io.write(f.bytes);
        neg = new Negotiation(io, f.fixed ? "newstyle-fixed" : "newstyle", f.noZeroes, null);
      } else {
        const header = await io.read(OLDSTYLE_HEADER, "the oldstyle export header");
        neg = new Negotiation(io, "oldstyle", false, oldstyleExport(header));
      }
      io.stage = "the handshake";
      if (tls) await neg.startTls(tls);
      return neg;
    } catch (e) {
      io.destroy();
      throw e;
    }
  }

  private checkOpen(option: number): void {
    if (this.finished) throw new NbdClosedError("this negotiation has already ended");
    if (this.style === "oldstyle") throw new NbdUsageError("UNSUPPORTED", `an oldstyle server takes no options (${optionName(option)})`);
    if (this.style === "newstyle" && option !== NBD_OPT_EXPORT_NAME) {
      throw new NbdUsageError("UNSUPPORTED", `the server does not speak fixed newstyle: only EXPORT_NAME is possible, not ${optionName(option)}`);
    }
  }

  /** Reads one option reply; checks its magic and that it answers `option`. */
  private async readReply(option: number): Promise<{ type: number; data: Buffer }> {
    const h = await this.io.read(OPTION_REPLY_HEADER, `the reply to ${optionName(option)}`);
    const { type, len } = this.decoded(() => optionReplyHeader(h, option));
    const data = len ? await this.io.read(len, `the reply to ${optionName(option)}`) : Buffer.alloc(0);
    return { type, data };
  }

  /** Runs a reply decoder; a malformed reply ends the negotiation (the stream cannot be trusted). */
  private decoded<T>(decode: () => T): T {
    try {
      return decode();
    } catch (e) {
      this.fatal();
      throw e;
    }
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
    this.io.destroy();
  }

  /** STARTTLS, then the TLS handshake: required for an nbds:// target (no fallback to plaintext). */
  private async startTls(tls: ClientTls): Promise<void> {
    if (this.style !== "newstyle-fixed") {
      throw new NbdOptionError("STARTTLS", NBD_REP_ERR_UNSUP, "ERR_UNSUP", `TLS was required, but a ${this.style} server cannot do STARTTLS`);
    }
    this.io.write(optionRequest(NBD_OPT_STARTTLS));
    const r = await this.readReply(NBD_OPT_STARTTLS);
    if (r.type & 0x80000000) throw this.refuse(NBD_OPT_STARTTLS, r.type, r.data, "TLS was required, but the server refused STARTTLS");
    if (r.type !== NBD_REP_ACK) throw this.unexpected(NBD_OPT_STARTTLS, r.type);
    await this.io.upgrade(tls);
    this.tls = true;
  }

  /** Sends an option without data that the server acknowledges or refuses; returns whether it agreed. */
  private async agreed(option: number): Promise<boolean> {
    this.checkOpen(option);
    this.io.write(optionRequest(option));
    const r = await this.readReply(option);
    if (r.type === NBD_REP_ACK) return true;
    if (r.type & 0x80000000) return false;
    throw this.unexpected(option, r.type);
  }

  /** Asks for structured replies; returns whether the server agreed. */
  async structuredReply(): Promise<boolean> {
    if (!(await this.agreed(NBD_OPT_STRUCTURED_REPLY))) return false;
    return (this.structured = true);
  }

  /**
   * Asks for extended headers (32-byte requests and replies, 64-bit lengths); returns whether the
   * server agreed. Once agreed they take precedence over structured replies: do not ask for those.
   */
  async extendedHeaders(): Promise<boolean> {
    if (!(await this.agreed(NBD_OPT_EXTENDED_HEADERS))) return false;
    return (this.extended = true);
  }

  /** Chunked replies: structured replies or extended headers. */
  private get chunked(): boolean {
    return this.structured || this.extended;
  }

  /** NBD_OPT_LIST: every export the server is willing to list. */
  async list(): Promise<ExportListing[]> {
    this.checkOpen(NBD_OPT_LIST);
    this.io.write(optionRequest(NBD_OPT_LIST));
    const out: ExportListing[] = [];
    for (;;) {
      const r = await this.readReply(NBD_OPT_LIST);
      if (r.type === NBD_REP_ACK) return out;
      if (r.type === NBD_REP_SERVER) {
        out.push(this.decoded(() => serverReply(r.data)));
        continue;
      }
      if (r.type & 0x80000000) throw this.refuse(NBD_OPT_LIST, r.type, r.data, "cannot list exports");
      throw this.unexpected(NBD_OPT_LIST, r.type);
    }
  }

  /** Runs INFO or GO; returns null if the server does not support the option (ERR_UNSUP). */
  private async infoOrGo(option: number, name: string): Promise<ExportInfo | null> {
    this.io.write(optionRequest(option, infoRequest(name)));
    const replies = new InfoReplies(option, name, this.chunked);
    for (;;) {
      const r = await this.readReply(option);
      if (r.type === NBD_REP_INFO) {
        this.decoded(() => replies.add(r.data));
        continue;
      }
      if (r.type === NBD_REP_ACK) return this.decoded(() => replies.finish());
      if (r.type === NBD_REP_ERR_UNSUP) return null;
      if (r.type & 0x80000000) {
        throw this.refuse(option, r.type, r.data, r.type === 0x80000006 ? `export "${name}" not found` : `cannot open export "${name}"`);
      }
      throw this.unexpected(option, r.type);
    }
  }

  /** NBD_OPT_INFO: what GO would report for `name`, without entering transmission. */
  async info(name: string): Promise<ExportInfo> {
    this.checkOpen(NBD_OPT_INFO);
    const info = await this.infoOrGo(NBD_OPT_INFO, name);
    if (!info) throw new NbdOptionError("INFO", NBD_REP_ERR_UNSUP, "ERR_UNSUP", "the server does not support NBD_OPT_INFO");
    return info;
  }

  private async metaContext(option: number, name: string, queries: readonly string[]): Promise<Map<string, number>> {
    this.checkOpen(option);
    this.io.write(optionRequest(option, metaRequest(name, queries)));
    const out = new Map<string, number>();
    for (;;) {
      const r = await this.readReply(option);
      if (r.type === NBD_REP_META_CONTEXT) {
        const [context, id] = this.decoded(() => metaContextReply(r.data, option));
        out.set(context, id);
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

  /** NBD_OPT_SET_META_CONTEXT: selects contexts for `name`; returns name → id. Needs structured replies or extended headers. */
  async setMetaContexts(name: string, queries: readonly string[]): Promise<Map<string, number>> {
    if (!this.chunked) throw new NbdUsageError("UNSUPPORTED", "meta contexts need structured replies or extended headers");
    this.metaContexts = new Map();
    this.metaContexts = await this.metaContext(NBD_OPT_SET_META_CONTEXT, name, queries);
    return this.metaContexts;
  }

  /**
   * Enters the transmission phase on export `name`: GO, or EXPORT_NAME on servers without GO
   * (and on plain newstyle servers). For oldstyle servers the export is the one greeted with.
   * The result is plain data owning the connection; the negotiation is over.
   */
  async go(name: string): Promise<Negotiated> {
    if (this.finished) throw new NbdClosedError("this negotiation has already ended");
    let info: ExportInfo | null = this.oldstyleInfo;
    if (!info && this.style === "newstyle-fixed") info = await this.infoOrGo(NBD_OPT_GO, name);
    if (!info && this.extended) {
      // EXPORT_NAME is forbidden once extended headers are agreed (and such a server must support GO).
      this.fatal();
      throw new NbdOptionError("GO", NBD_REP_ERR_UNSUP, "ERR_UNSUP", "the server agreed to extended headers but does not support NBD_OPT_GO");
    }
    if (!info) info = await this.exportName(name);
    this.finished = true;
    const { socket, rx, leftover } = this.io.detach();
    const metaContexts = new Map(this.metaContexts);
    return { socket, rx, info, structured: this.chunked, extended: this.extended, metaContexts, leftover, style: this.style };
  }

  private async exportName(name: string): Promise<ExportInfo> {
    this.io.write(optionRequest(NBD_OPT_EXPORT_NAME, nbdString(name, "export name")));
    let b: Buffer;
    try {
      b = await this.io.read(10 + (this.noZeroes ? 0 : EXPORT_NAME_PADDING), "the EXPORT_NAME reply");
    } catch (e) {
      if (e instanceof NbdDisconnectedError) {
        throw new NbdOptionError("EXPORT_NAME", 0x80000006, "ERR_UNKNOWN", `export "${name}" not found (the server closed the connection after EXPORT_NAME)`);
      }
      throw e;
    }
    return this.decoded(() => exportNameReply(b, name, this.structured));
  }

  /** Ends the option phase politely (NBD_OPT_ABORT) and closes the socket. */
  async abort(): Promise<void> {
    if (this.finished) return;
    this.finished = true;
    if (this.style === "newstyle-fixed") {
      try {
        this.io.write(optionRequest(NBD_OPT_ABORT));
        await this.readReply(NBD_OPT_ABORT);
      } catch {
        // The server may close without acknowledging ABORT; either way we are done.
      }
    }
    this.io.detach();
    this.io.destroy();
  }
}
