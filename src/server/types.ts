// The shapes a session's parts share: the Transport it talks through, the ExportTable it selects
// from, who the client is (ClientIdentity), what the handshake settled (Negotiated), the
// SessionLink each part sees of the session that composes it, and one decoded request
// (PendingRequest; ExtendedRequest under extended headers).
import type { NbdError } from "../protocol/errors.ts";
import type { CheckedExport, ExportContext } from "../devices/checked.ts";
import type { ExportLease } from "./exports.ts";
import type { ClientIdentity } from "./identity.ts";

export type { ClientIdentity, TlsIdentity } from "./identity.ts";

/**
 * What a session needs from its connection. STARTTLS upgrades the byte stream under the same
 * Transport object (the session keeps talking to it); an encrypted transport still takes
 * sendFile, but reads the file in user space to encrypt it.
 */
export interface Transport {
  /** Queue bytes for sending; the transport may keep a view of `b` until it is sent. */
  send(b: Uint8Array): void;
  /** Like send(), but the caller reuses `b` at once: the transport copies whatever it must keep. */
  sendTransient(b: Uint8Array): void;
  /** Optional zero-copy path: `header`, then `length` bytes of file `fd` at `offset`. */
  sendFile?(header: Uint8Array, fd: number, offset: number, length: number, release?: (() => void) | null): void;
  /**
   * Optional in-place path for small replies: room for `length` bytes in the transport's own
   * output buffer (null when there is none now). The caller fills it, then commit() makes it
   * output; until then nothing else is sent. Abandon a reservation by not committing it; detach()
   * hands the region over for good (the transport takes a new buffer) when it must outlive the call.
   */
  reserve?(length: number): Uint8Array | null;
  commit?(length: number): void;
  detach?(): void;
  /**
   * Optional in-place receive: up to `len` bytes the socket holds now, read straight into
   * `dst[off, ...)` without waiting; returns the count (0: nothing there). Only called from the
   * data callback once its chunk is used up, so the bytes come in order. Always 0 once STARTTLS
   * was asked for: the socket's bytes are TLS records then, for the TLS layer alone.
   */
  recvInto?(dst: Uint8Array, off: number, len: number): number;
  /** Bytes queued but not yet taken by the kernel. */
  queued(): number;
  pause(): void;
  resume(): void;
  /** Close after everything queued has been sent. */
  end(): void;
  /** Close now, dropping anything queued. */
  destroy(): void;
  /**
   * STARTTLS (absent where the transport cannot encrypt): from now on bytes are TLS records.
   * `initial` holds what arrived after the option (possibly the ClientHello). The transport
   * reports to its session with onSecured(identity) or onTlsFailed(reason).
   */
  startTls?(initial: Uint8Array): void;
}

/** How the server treats STARTTLS: NOTLS ("off"), SELECTIVETLS ("on"), FORCEDTLS ("require"). */
export type TlsMode = "off" | "on" | "require";

/**
 * The exports a session may select: `(export name, client identity) -> device stack`, asked by the
 * handshake in one place (Handshake.resolve). ExportRegistry (exports.ts) is the implementation.
 */
export interface ExportTable {
  /** Resolve `name` ("" is the default export) for `client`; the lease is released once, when done. */
  resolve(name: string, client: ClientIdentity): ExportLease | undefined;
  /** The exports LIST shows `client`. */
  list(client: ClientIdentity): readonly { name: string; description: string }[];
  /** True while the server is shutting down: new options get ERR_SHUTDOWN, new requests ESHUTDOWN. */
  shuttingDown(): boolean;
}

/**
 * What option haggling settled, fixed for the whole transmission phase: read once when the
 * receiver and reply writer are built.
 */
export interface Negotiated {
  readonly exp: CheckedExport;
  /** What resolution handed out for `exp`: released when the session is done with it. */
  readonly lease: ExportLease;
  /** Replies are chunks: structured replies were agreed, or extended headers (which imply them). */
  readonly structured: boolean;
  /** Extended headers: 32-byte requests and replies (NBD_OPT_EXTENDED_HEADERS). */
  readonly extended: boolean;
  /**
   * The largest payload (WRITE data, or a READ's data) a request may carry: the advertised maximum
   * when the client asked for NBD_INFO_BLOCK_SIZE in GO (it agreed to the limits), else the
   * server's own hard limit (clients that never saw block sizes keep the legacy 64 MiB).
   */
  readonly maxPayload: number;
  /** Meta contexts selected with SET_META_CONTEXT for `exp` (empty if none), and their ids. */
  readonly contexts: readonly ExportContext[];
  readonly contextIds: readonly number[];
}

/** What the session's parts (handshake, transmission, replies) see of the session composing them. */
export interface SessionLink {
  readonly id: number;
  readonly peer: string;
  /** Who is connected (address, and the TLS identity once there is one), for export resolution. */
  readonly client: ClientIdentity;
  /** True once the connection is closing or closed: nothing more is read or sent. */
  readonly closed: boolean;
  /** Close after everything queued has been sent. */
  close(): void;
  /** The byte stream can no longer be trusted: log `code`, drop the connection. */
  protocolError(code: string, message: string): void;
}

/** One request, copied out of the receiver's reused header: its reply may come after the next request. */
export class PendingRequest {
  /** A validation error found while receiving (the payload is still consumed). */
  error: NbdError | null = null;
  /** performance.now() at dispatch, when metrics are on (for the latency histogram). */
  start = 0;
  constructor(
    readonly type: number, readonly flags: number, readonly cookieHi: number, readonly cookieLo: number,
    readonly offset: number, readonly offsetTooBig: boolean, readonly length: number,
  ) {}
}

/** A request of an extended-headers session: its replies echo the request's offset, exactly. */
export class ExtendedRequest extends PendingRequest {
  constructor(
    type: number, flags: number, cookieHi: number, cookieLo: number, offset: number, offsetTooBig: boolean, length: number,
    readonly offsetHi: number, readonly offsetLo: number,
  ) {
    super(type, flags, cookieHi, cookieLo, offset, offsetTooBig, length);
  }
}
