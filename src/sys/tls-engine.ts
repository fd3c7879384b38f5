// A TLS engine on the system OpenSSL with memory BIOs that only transforms bytes (the socket stays
// the caller's): TLS 1.3 PSK through the find/use-session callbacks, TLS 1.2 PSK suites, X.509 where
// wanted. Every SSL* is freed by free(); liveSessions() counts them for leak checks.
import {
  cstr, fail, ffiApi, NID_commonName, ossl, opensslUnavailable, SSL_CTRL_SET_DH_AUTO,
  SSL_CTRL_SET_MIN_PROTO_VERSION, SSL_CTRL_SET_TLSEXT_HOSTNAME, SSL_ERROR_WANT_READ, SSL_ERROR_ZERO_RETURN,
  SSL_FILETYPE_PEM, SSL_OP_CIPHER_SERVER_PREFERENCE, SSL_OP_NO_RENEGOTIATION, SSL_OP_NO_TICKET,
  SSL_VERIFY_FAIL_IF_NO_PEER_CERT, SSL_VERIFY_NONE, SSL_VERIFY_PEER, takeErrors, TLS1_2_VERSION, TLS1_3_VERSION,
  X509_FILETYPE_PEM, X509_V_FLAG_CRL_CHECK, type Ossl,
} from "./openssl.ts";

/** TLS 1.3 suites, AES-GCM first (AES-NI makes it 2-3x cheaper than ChaCha20 here). */
const TLS13_SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";
/** TLS 1.2 suites for PSK (GnuTLS offers ECDHE-PSK, DHE-PSK and plain PSK). */
const TLS12_PSK = "ECDHE-PSK-CHACHA20-POLY1305:DHE-PSK-AES128-GCM-SHA256:DHE-PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384:ECDHE-PSK-AES128-CBC-SHA256";
const TLS12_CERT = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305";
/** TLS_AES_128_GCM_SHA256: the cipher a PSK session is made with (its SHA-256 is the binder hash). */
const PSK_CIPHER_ID = Buffer.from([0x13, 0x01]);

export interface EngineConfig {
  role: "server" | "client";
  /** PEM files: this side's certificate chain and key, the CA that signs the peer, revoked certificates. */
  certFile?: string;
  keyFile?: string;
  caFile?: string;
  crlFile?: string;
  /** Server: require a client certificate signed by `caFile`. Client: verify the server's. */
  verifyPeer?: boolean;
  /** Server: PSK identities (usernames) and their keys. */
  pskUsers?: ReadonlyMap<string, Uint8Array>;
  /** Client: the PSK identity to offer, and its key. */
  pskIdentity?: string;
  pskKey?: Uint8Array;
}

/** Who the peer turned out to be. */
export interface EnginePeer {
  /** Subject CN of the peer's certificate, if it sent one. */
  certCN?: string;
  /** The PSK identity the peer used (server side). */
  pskIdentity?: string;
}

export class TlsError extends Error {
  constructor(message: string, readonly reasons: string[]) { super(message); }
}

type Ptr = import("bun:ffi").Pointer;

function lib(): Ossl {
  if (!ossl) throw new Error(opensslUnavailable());
  return ossl;
}

const sessions = new Map<Ptr, TlsSession>();
/** SSL objects allocated and not yet freed (for leak checks). */
export function liveSessions(): number { return sessions.size; }

/** An SSL_CTX with its credentials; shared by every connection made from it. */
export class TlsContext {
  readonly ctx: Ptr;
  private readonly keep: unknown[] = [];
  private freed = false;

  constructor(readonly config: EngineConfig) {
    const o = lib();
    const f = ffiApi!;
    const server = config.role === "server";
    const ctx = o.SSL_CTX_new(server ? o.TLS_server_method() : o.TLS_client_method());
    if (!ctx) fail("SSL_CTX_new");
    this.ctx = ctx as Ptr;
    try {
      o.SSL_CTX_ctrl(ctx, SSL_CTRL_SET_MIN_PROTO_VERSION, TLS1_2_VERSION, null);
      o.SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE | SSL_OP_NO_TICKET);
      if (server) o.SSL_CTX_set_num_tickets(ctx, 0); // nobody resumes: tickets would be wasted bytes
      const psk = server ? !!config.pskUsers : !!config.pskIdentity;
      this.check(o.SSL_CTX_set_ciphersuites(ctx, f.ptr(cstr(TLS13_SUITES))), "setting the TLS 1.3 suites");
      this.check(o.SSL_CTX_set_cipher_list(ctx, f.ptr(cstr(psk ? TLS12_PSK : TLS12_CERT))), "setting the TLS 1.2 suites");
      if (psk) o.SSL_CTX_ctrl(ctx, SSL_CTRL_SET_DH_AUTO, 1, null);
      if (config.certFile) this.check(o.SSL_CTX_use_certificate_chain_file(ctx, f.ptr(cstr(config.certFile))), `reading ${config.certFile}`);
      if (config.keyFile) {
        this.check(o.SSL_CTX_use_PrivateKey_file(ctx, f.ptr(cstr(config.keyFile)), SSL_FILETYPE_PEM), `reading ${config.keyFile}`);
        this.check(o.SSL_CTX_check_private_key(ctx), `${config.keyFile} does not match ${config.certFile}`);
      }
      if (config.caFile) this.check(o.SSL_CTX_load_verify_locations(ctx, f.ptr(cstr(config.caFile)), null), `reading ${config.caFile}`);
      if (config.crlFile) {
        const store = o.SSL_CTX_get_cert_store(ctx);
        const lookup = o.X509_STORE_add_lookup(store, o.X509_LOOKUP_file());
        if (o.X509_load_cert_crl_file(lookup, f.ptr(cstr(config.crlFile)), X509_FILETYPE_PEM) <= 0) fail(`reading ${config.crlFile}`);
        o.X509_STORE_set_flags(store, X509_V_FLAG_CRL_CHECK);
      }
      const verify = config.verifyPeer ? SSL_VERIFY_PEER | (server ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0) : SSL_VERIFY_NONE;
      o.SSL_CTX_set_verify(ctx, verify, null);
      if (server && config.pskUsers) this.serverPsk(o, config.pskUsers);
      if (!server && config.pskIdentity) this.clientPsk(o, config.pskIdentity, config.pskKey!);
    } catch (e) {
      o.SSL_CTX_free(ctx);
      throw e;
    }
  }

  private check(r: number, what: string): void {
    if (r !== 1) fail(what);
  }

  /** TLS 1.3: find_session builds a session from the key; TLS 1.2: the server callback copies the key. */
  private serverPsk(o: Ossl, users: ReadonlyMap<string, Uint8Array>): void {
    const f = ffiApi!;
    const T = f.FFIType;
    const find = new f.JSCallback((ssl: Ptr, id: Ptr, idLen: number | bigint, out: Ptr) => {
      const name = Buffer.from(f.toArrayBuffer(id, 0, Number(idLen))).toString("utf8");
      const s = sessions.get(ssl);
      if (s) s.peer.pskIdentity = name;
      const key = users.get(name);
      setPointer(out, 0);
      if (!key) {
        if (s) s.unknownIdentity = name;
        return 0; // fail the handshake now rather than fall back to certificates we do not have
      }
      const sess = makePskSession(o, ssl, key);
      if (!sess) return 0;
      setPointer(out, sess);
      return 1;
    }, { args: [T.ptr, T.ptr, T.u64_fast, T.ptr], returns: T.i32 });
    const legacy = new f.JSCallback((ssl: Ptr, id: Ptr | null, psk: Ptr, max: number) => {
      const name = id ? String(new f.CString(id)) : "";
      const s = sessions.get(ssl);
      if (s) s.peer.pskIdentity = name;
      const key = users.get(name);
      if (!key || key.length > max) {
        if (s && !key) s.unknownIdentity = name;
        return 0;
      }
      new Uint8Array(f.toArrayBuffer(psk, 0, key.length)).set(key);
      return key.length;
    }, { args: [T.ptr, T.ptr, T.ptr, T.u32], returns: T.u32 });
    this.keep.push(find, legacy);
    o.SSL_CTX_set_psk_find_session_callback(this.ctx, find.ptr!);
    o.SSL_CTX_set_psk_server_callback(this.ctx, legacy.ptr!);
  }

  private clientPsk(o: Ossl, identity: string, key: Uint8Array): void {
    const f = ffiApi!;
    const T = f.FFIType;
    const idBytes = cstr(identity);
    const idLen = idBytes.length - 1;
    const use = new f.JSCallback((ssl: Ptr, _md: Ptr, idOut: Ptr, idLenOut: Ptr, sessOut: Ptr) => {
      const sess = makePskSession(o, ssl, key);
      if (!sess) return 0;
      setPointer(idOut, f.ptr(idBytes));
      setPointer(idLenOut, idLen);
      setPointer(sessOut, sess);
      return 1;
    }, { args: [T.ptr, T.ptr, T.ptr, T.ptr, T.ptr], returns: T.i32 });
    const legacy = new f.JSCallback((_ssl: Ptr, _hint: Ptr, id: Ptr, maxId: number, psk: Ptr, maxPsk: number) => {
      if (idBytes.length > maxId || key.length > maxPsk) return 0;
      new Uint8Array(f.toArrayBuffer(id, 0, idBytes.length)).set(idBytes);
      new Uint8Array(f.toArrayBuffer(psk, 0, key.length)).set(key);
      return key.length;
    }, { args: [T.ptr, T.ptr, T.ptr, T.u32, T.ptr, T.u32], returns: T.u32 });
    this.keep.push(use, legacy, idBytes);
    o.SSL_CTX_set_psk_use_session_callback(this.ctx, use.ptr!);
    o.SSL_CTX_set_psk_client_callback(this.ctx, legacy.ptr!);
  }

  /** One connection's engine. `hostname`: (client) the name to send (SNI) and to check the certificate against. */
  session(hostname?: string): TlsSession {
    if (this.freed) throw new Error("TLS context already freed");
    return new TlsSession(this, hostname);
  }

  /** Frees the SSL_CTX (sessions made from it hold their own reference and may outlive it). */
  free(): void {
    if (this.freed) return;
    this.freed = true;
    lib().SSL_CTX_free(this.ctx);
  }
}

/** Writes a pointer-sized value at address `at`. */
function setPointer(at: Ptr, value: number | Ptr): void {
  new BigUint64Array(ffiApi!.toArrayBuffer(at, 0, 8))[0] = BigInt(value);
}

function makePskSession(o: Ossl, ssl: Ptr, key: Uint8Array): Ptr | null {
  const f = ffiApi!;
  const cipher = o.SSL_CIPHER_find(ssl, f.ptr(PSK_CIPHER_ID));
  const sess = o.SSL_SESSION_new();
  if (!cipher || !sess) return null;
  const k = Buffer.from(key);
  if (o.SSL_SESSION_set1_master_key(sess, f.ptr(k), k.length) !== 1 || o.SSL_SESSION_set_cipher(sess, cipher) !== 1 ||
      o.SSL_SESSION_set_protocol_version(sess, TLS1_3_VERSION) !== 1) {
    o.SSL_SESSION_free(sess);
    return null;
  }
  k.fill(0);
  return sess as Ptr;
}

/** Most plaintext one write() of a server session takes: its ciphertext, records and all, fits OUT_RING. */
export const MAX_WRITE = 256 * 1024;
const OUT_RING = 2 * MAX_WRITE;

/** Largest TLS record plaintext, plus slack: the most one partly received record can still yield. */
const RECORD = 16384 + 256;
/** Where small arrivals are decrypted (shared: read() copies out before returning). */
const READ_SCRATCH = Buffer.allocUnsafe(4 * RECORD);

/**
 * One connection: feed ciphertext with receive(), drive handshake() until it returns true, then
 * read() plaintext and write() plaintext; takeOutput() hands over ciphertext to send. Not thread-safe,
 * not reentrant; every call is synchronous.
 */
export class TlsSession {
  private ssl: Ptr | null;
  private readonly rbio: Ptr;
  private readonly wbio: Ptr;
  /** Ciphertext given to receive() and not yet decrypted (an upper bound on the plaintext to come). */
  private unread = 0;
  readonly peer: EnginePeer = {};
  /** Set by the server's PSK callback when the client named an identity we do not know. */
  unknownIdentity: string | null = null;
  /** The peer sent close_notify. */
  peerClosed = false;

  /** Our end of the output BIO pair (server sessions), freed by us; null: a memory BIO the SSL owns. */
  private readonly pairEnd: Ptr | null = null;
  private readonly view = { addr: 0, length: 0 };
  private readonly addrOut = new BigUint64Array(1);
  /** Keeps the context (and its PSK callbacks) alive while this connection may still call them. */
  private readonly ctx: TlsContext;

  constructor(ctx: TlsContext, hostname?: string) {
    this.ctx = ctx;
    const o = lib();
    const f = ffiApi!;
    const ssl = o.SSL_new(ctx.ctx);
    if (!ssl) fail("SSL_new");
    this.ssl = ssl as Ptr;
    const mem = o.BIO_s_mem();
    this.rbio = o.BIO_new(mem) as Ptr;
    if (this.ctx.config.role === "server") {
      // Ciphertext out goes through a BIO pair: a memory BIO clears and copies every byte it takes
      // and copies it again when read, while the pair's ring can be sent to the socket from where
      // it lies (outputView/consumeOutput). It holds one write() of up to MAX_WRITE bytes.
      const pair = new BigUint64Array(2);
      if (o.BIO_new_bio_pair(f.ptr(pair), OUT_RING, f.ptr(pair, 8), OUT_RING) !== 1) fail("BIO_new_bio_pair");
      this.wbio = Number(pair[1]) as unknown as Ptr; // our end: ciphertext is read from it
      this.pairEnd = this.wbio;
      o.SSL_set_bio(ssl, this.rbio, Number(pair[0]) as unknown as Ptr); // the SSL owns the memory BIO and its end
    } else {
      this.wbio = o.BIO_new(mem) as Ptr;
      o.SSL_set_bio(ssl, this.rbio, this.wbio); // the SSL owns both BIOs from here on
    }
    sessions.set(this.ssl!, this);
    if (this.ctx.config.role === "server") {
      o.SSL_set_accept_state(ssl);
    } else {
      o.SSL_set_connect_state(ssl);
      if (hostname && !/^[\d.]+$|:/.test(hostname)) o.SSL_ctrl(ssl, SSL_CTRL_SET_TLSEXT_HOSTNAME, 0, f.ptr(cstr(hostname)));
      if (hostname && ctx.config.verifyPeer) o.SSL_set1_host(ssl, f.ptr(cstr(hostname)));
    }
  }

  get freed(): boolean { return this.ssl === null; }

  /** Ciphertext from the peer. */
  receive(b: Uint8Array): void {
    if (this.ssl === null || b.length === 0) return;
    const o = lib();
    const n = o.BIO_write(this.rbio, ffiApi!.ptr(b), b.length);
    if (n !== b.length) fail("BIO_write");
    this.unread += n;
  }

  /** Advances the handshake: true once it is complete. Throws a TlsError when it failed. */
  handshake(): boolean {
    const o = lib();
    o.ERR_clear_error();
    const r = o.SSL_do_handshake(this.ssl);
    if (r === 1) {
      this.readPeerCertificate(o);
      return true;
    }
    const e = o.SSL_get_error(this.ssl, r);
    if (e === SSL_ERROR_WANT_READ) return false;
    throw this.error(o, "TLS handshake failed");
  }

  private readPeerCertificate(o: Ossl): void {
    const x = o.SSL_get1_peer_certificate(this.ssl);
    if (!x) return;
    const buf = Buffer.alloc(256);
    const n = o.X509_NAME_get_text_by_NID(o.X509_get_subject_name(x), NID_commonName, ffiApi!.ptr(buf), buf.length);
    if (n > 0) this.peer.certCN = buf.toString("utf8", 0, n);
    o.X509_free(x);
  }

  private error(o: Ossl, what: string): TlsError {
    const reasons = takeErrors();
    if (reasons.includes("certificate verify failed")) {
      reasons.push(String(o.X509_verify_cert_error_string(o.SSL_get_verify_result(this.ssl))));
    }
    if (this.unknownIdentity !== null) reasons.splice(0, reasons.length, `unknown PSK identity "${this.unknownIdentity}"`);
    return new TlsError(`${what}${reasons.length ? `: ${reasons.join("; ")}` : ""}`, reasons);
  }

  /**
   * Decrypts what has arrived. Returns a fresh buffer (never reused) or null when no complete
   * record is there yet; sets `peerClosed` on close_notify. Throws a TlsError on a bad record.
   */
  read(): Uint8Array | null {
    if (this.ssl === null) return null;
    const o = lib();
    // Small arrivals (requests) are decrypted into a shared buffer and copied out exactly; large
    // ones (WRITE payloads) straight into a buffer of their own, which the receiver may keep.
    const small = this.unread + RECORD <= READ_SCRATCH.length;
    let out = small ? READ_SCRATCH : Buffer.allocUnsafe(this.unread + RECORD);
    const cap = out.length;
    let got = 0;
    o.ERR_clear_error();
    while (cap - got >= RECORD) {
      const r = o.SSL_read(this.ssl, ffiApi!.ptr(out, got), cap - got);
      if (r > 0) { got += r; continue; }
      const e = o.SSL_get_error(this.ssl, r);
      if (e === SSL_ERROR_WANT_READ) break;
      if (e === SSL_ERROR_ZERO_RETURN) { this.peerClosed = true; break; }
      throw this.error(o, "TLS read failed");
    }
    this.unread = Number(o.BIO_ctrl_pending(this.rbio));
    if (got === 0) return null;
    // A copy when the result lives in the shared buffer, or would pin a much bigger one.
    if (small || got < cap >>> 2) out = Buffer.from(out.subarray(0, got));
    return out.subarray(0, got);
  }

  /**
   * Encrypts all of `b` (the ciphertext waits in takeOutput()). A server session holds one write's
   * ciphertext: `b` at most MAX_WRITE bytes, and what earlier writes made taken first.
   */
  write(b: Uint8Array): void {
    if (this.ssl === null || b.length === 0) return;
    const o = lib();
    o.ERR_clear_error();
    const r = o.SSL_write(this.ssl, ffiApi!.ptr(b), b.length);
    if (r !== b.length) throw this.error(o, "TLS write failed");
  }

  /** (Server sessions) address and length of the next contiguous run of waiting ciphertext; length 0: none. */
  outputView(): { addr: number; length: number } {
    const view = this.view;
    view.length = 0;
    if (this.ssl === null || this.pairEnd === null) return view;
    const n = lib().BIO_nread0(this.pairEnd, ffiApi!.ptr(this.addrOut));
    if (n > 0) {
      view.addr = Number(this.addrOut[0]);
      view.length = n;
    }
    return view;
  }

  /** The first `n` bytes of outputView() were sent: drop them. */
  consumeOutput(n: number): void {
    if (this.ssl !== null && this.pairEnd !== null && n > 0) lib().BIO_nread(this.pairEnd, ffiApi!.ptr(this.addrOut), n);
  }

  /** Bytes of ciphertext waiting to be sent. */
  pendingOutput(): number {
    return this.ssl === null ? 0 : Number(lib().BIO_ctrl_pending(this.wbio));
  }

  /** Moves up to `dst.length` bytes of waiting ciphertext into `dst` (a reused buffer); returns the count. */
  readOutput(dst: Uint8Array): number {
    if (this.ssl === null || dst.length === 0) return 0;
    const r = lib().BIO_read(this.wbio, ffiApi!.ptr(dst), dst.length);
    return r > 0 ? r : 0;
  }

  /** Ciphertext waiting to be sent (a fresh buffer), or null. */
  takeOutput(): Uint8Array | null {
    if (this.ssl === null) return null;
    const o = lib();
    const n = Number(o.BIO_ctrl_pending(this.wbio));
    if (n === 0) return null;
    const out = Buffer.allocUnsafe(n);
    const r = o.BIO_read(this.wbio, ffiApi!.ptr(out), n);
    return r > 0 ? out.subarray(0, r) : null;
  }

  /** Queues close_notify (send takeOutput() afterwards). */
  shutdown(): void {
    if (this.ssl === null) return;
    const o = lib();
    o.ERR_clear_error();
    o.SSL_shutdown(this.ssl);
    takeErrors();
  }

  /** "TLSv1.3 TLS_AES_128_GCM_SHA256" */
  describe(): string {
    if (this.ssl === null) return "";
    const o = lib();
    return `${o.SSL_get_version(this.ssl)} ${o.SSL_CIPHER_get_name(o.SSL_get_current_cipher(this.ssl))}`;
  }

  /** Frees the SSL (and its BIOs). Idempotent. */
  free(): void {
    if (this.ssl === null) return;
    sessions.delete(this.ssl);
    lib().SSL_free(this.ssl);
    if (this.pairEnd !== null) lib().BIO_free(this.pairEnd);
    this.ssl = null;
  }
}
