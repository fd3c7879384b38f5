// STARTTLS on an accepted socket, two ways behind one Upgrader: X.509 through Bun's own TLS
// (socket.upgradeTLS) and PSK through the system OpenSSL engine (PskSocket). Either way the session
// keeps its transport and learns onSecured(identity) or onTlsFailed(reason).
import type { Socket } from "bun";
import { haveLibc, sendAddr } from "../sys/libc.ts";
import { MAX_WRITE, TlsError, type TlsSession } from "../sys/tls-engine.ts";
import type { ByteSocket, Conn, RawTap, Upgrader } from "./socket-transport.ts";
import type { PskCredentials, ServerCredentials, X509Credentials } from "./tls.ts";

/** What the server does with a connection's events, whichever socket carries them. */
export interface ConnEvents {
  /** Plaintext from the peer (handed to the session, corked). */
  data(c: Conn, plain: Uint8Array): void;
  /** The socket can take more: resend what the transport queued. */
  drain(c: Conn): void;
  /** The connection is gone (idempotent). */
  close(c: Conn): void;
  error(c: Conn, e: Error): void;
}

export function makeUpgrader(creds: ServerCredentials, ev: ConnEvents): Upgrader {
  return creds.kind === "x509" ? bunUpgrader(creds, ev) : pskUpgrader(creds, ev);
}

/** One line saying why a TLS handshake failed, in the terms a user can act on. */
export function explainTlsFailure(reason: string): string {
  const r = reason.toLowerCase();
  const hint =
    /unknown psk identity/.test(r) ? "" :
    /binder does not verify|decrypt|bad record mac/.test(r) ? " (wrong pre-shared key)" :
    /peer_did_not_return|did not return a certificate/.test(r) ? " (no client certificate; tls-verify-peer requires one)" :
    /revoked/.test(r) ? " (client certificate revoked by ca-crl.pem)" :
    /expired/.test(r) ? " (client certificate expired)" :
    /verify|issuer|self.signed|unknown ca/.test(r) ? " (bad client certificate: not signed by ca-cert.pem)" :
    /wrong_version|wrong version|http|record|packet/.test(r) ? " (not TLS)" :
    /protocol|version/.test(r) ? " (protocol version: TLS 1.2 or later is required)" :
    /disconnected|econnreset|closed/.test(r) ? " (the client gave up: does it trust this server's certificate and name?)" : "";
  return `${reason}${hint}`;
}

/** Raw events after Bun's upgrade: only the close matters (the TLS socket reports everything else). */
function closeOnly(c: Conn, ev: ConnEvents): RawTap {
  return { data() {}, drain() {}, close: () => ev.close(c) };
}

function bunUpgrader(creds: X509Credentials, ev: ConnEvents): Upgrader {
  const tls = {
    key: creds.key, cert: creds.cert, ...(creds.ca ? { ca: creds.ca } : {}), ...(creds.crl ? { crl: creds.crl } : {}),
    requestCert: creds.verifyPeer, rejectUnauthorized: creds.verifyPeer, minVersion: 0x0303,
  };
  const handlers = {
    handshake(ts: Socket<Conn>, ok: boolean, err: Error | null) {
      const s = ts.data.session;
      if (!s) return;
      if (!ok || (creds.verifyPeer && !ts.authorized)) {
        const e = err as (Error & { code?: string }) | null;
        // "error:100000c0:SSL routines:OPENSSL_internal:PEER_DID_NOT_RETURN_A_CERTIFICATE" -> the reason
        const msg = e ? e.message.replace(/^error:[0-9a-f]+:.*:/i, "") : "rejected";
        s.onTlsFailed(explainTlsFailure(`${msg}${e?.code && !msg.includes(e.code) && e.code !== "EPROTO" ? ` (${e.code})` : ""}`));
        return;
      }
      const cn = creds.verifyPeer ? ts.getPeerCertificate()?.subject?.CN : undefined;
      const cipher = ts.getCipher() as { name?: string } | null;
      s.onSecured({ kind: "x509", name: (Array.isArray(cn) ? cn[0] : cn) ?? null, protocol: ts.getTLSVersion() ?? "TLS", cipher: cipher?.name ?? "?" });
    },
    data(ts: Socket<Conn>, b: Uint8Array) { ev.data(ts.data, b); },
    drain(ts: Socket<Conn>) { ev.drain(ts.data); },
    close(ts: Socket<Conn>) { ev.close(ts.data); },
    error(ts: Socket<Conn>, e: Error) { ev.error(ts.data, e); },
  };
  return (raw, initial) => {
    const c = raw.data;
    c.secure = closeOnly(c, ev);
    const [, ts] = raw.upgradeTLS<Conn>({
      data: c, tls: tls as never, socket: handlers, ...(initial.length ? { initialData: initial } : {}),
    } as never);
    c.transport!.useSocket(ts);
  };
}

function pskUpgrader(creds: PskCredentials, ev: ConnEvents): Upgrader {
  return (raw, initial) => {
    const c = raw.data;
    const p = new PskSocket(raw, creds, c, ev);
    c.secure = p;
    c.transport!.useSocket(p);
    if (initial.length) p.data(initial);
  };
}

/** Ciphertext moves from the engine to the socket in pieces of this size, through a per-connection buffer. */
const PIECE = 64 * 1024;

/**
 * The PSK path: the raw socket's bytes go through an OpenSSL engine. As a RawTap it takes the raw
 * socket's events; as a ByteSocket it is what the session's transport writes to. Ciphertext goes
 * from the engine to the socket through one reused buffer; when the socket is full, the rest
 * waits in the engine and write() takes nothing more (the transport keeps the plaintext, as views
 * and file ranges) until `drain`. So nothing is copied or allocated per reply.
 */
class PskSocket implements ByteSocket, RawTap {
  private readonly tls: TlsSession;
  private readonly buf = new Uint8Array(PIECE);
  /** Ciphertext in `buf` the socket has not taken yet. */
  private tail: Uint8Array | null = null;
  private secured = false;
  private ending = false;

  /** The raw socket's descriptor (-1: unknown: ciphertext goes through Bun only). */
  private readonly fd: number;

  constructor(private readonly raw: Socket<Conn>, creds: PskCredentials, private readonly c: Conn, private readonly ev: ConnEvents) {
    this.tls = creds.engine.session();
    const fd = (raw as unknown as { fd?: number }).fd; // present at run time, missing from the typings
    this.fd = typeof fd === "number" && haveLibc ? fd : -1;
  }

  data(chunk: Uint8Array): void {
    const t = this.tls;
    if (t.freed) return;
    try {
      t.receive(chunk);
      if (!this.secured) {
        const done = t.handshake();
        this.flush();
        if (!done) return;
        this.secured = true;
        const [protocol = "TLS", cipher = "?"] = t.describe().split(" ");
        this.c.session?.onSecured({ kind: "psk", name: t.peer.pskIdentity ?? null, protocol, cipher });
      }
      for (let p = t.read(); p !== null && !t.freed; p = t.read()) this.ev.data(this.c, p);
      if (t.peerClosed) this.end();
    } catch (e) {
      this.flush(); // the alert
      const msg = e instanceof TlsError ? e.message.replace(/^TLS handshake failed: /, "") : String(e);
      if (!this.secured) this.c.session?.onTlsFailed(explainTlsFailure(msg));
      else this.c.session?.protocolError("TLS_ERROR", msg);
    }
  }

  /**
   * Takes all of `b` when the socket is keeping up (in pieces of MAX_WRITE, each sent before the
   * next is encrypted), nothing while earlier ciphertext waits; a piece the socket did not take
   * all of waits as ciphertext, and the rest of `b` stays with the caller until `drain`.
   */
  write(b: Uint8Array): number {
    if (this.tls.freed) return -1;
    if (this.tail !== null || this.tls.pendingOutput() > 0) return 0;
    let taken = 0;
    while (taken < b.length) {
      const n = Math.min(MAX_WRITE, b.length - taken);
      this.tls.write(n === b.length ? b : b.subarray(taken, taken + n));
      taken += n;
      if (!this.sendOutput()) break;
    }
    return taken;
  }

  /**
   * Sends the waiting ciphertext from the engine's ring straight to the socket (one copy, in the
   * kernel); once the socket is full, the rest goes through Bun (flush), which arms `drain`.
   * Returns true if everything went.
   */
  private sendOutput(): boolean {
    if (this.fd >= 0) {
      for (;;) {
        const v = this.tls.outputView();
        if (v.length === 0) return true;
        const r = sendAddr(this.fd, v.addr, v.length);
        if (r > 0) this.tls.consumeOutput(r);
        if (r < v.length) break;
      }
    }
    this.flush();
    return this.tail === null;
  }

  /** Moves ciphertext from the engine to the socket until either runs out. */
  private flush(): void {
    while (this.tail === null) {
      const n = this.tls.readOutput(this.buf);
      if (n === 0) return;
      const w = this.raw.write(this.buf.subarray(0, n));
      if (w < 0) return;
      if (w < n) this.tail = this.buf.subarray(w, n);
    }
  }

  drain(): void {
    const tail = this.tail;
    if (tail !== null) {
      const w = this.raw.write(tail);
      if (w < 0) return;
      if (w < tail.length) { this.tail = tail.subarray(w); return; }
      this.tail = null;
    }
    this.flush();
    if (this.tail !== null) return;
    if (this.ending) { this.raw.end(); return; }
    this.ev.drain(this.c);
  }

  close(): void {
    this.tls.free();
    this.ev.close(this.c);
  }

  /** close_notify, then FIN once the ciphertext is out. */
  end(): void {
    if (this.ending) return;
    this.ending = true;
    this.tls.shutdown(); // close_notify goes after whatever ciphertext still waits
    this.flush();
    if (this.tail === null) this.raw.end();
  }

  terminate(): void {
    this.tls.free();
    this.raw.terminate();
  }

  pause(): void { this.raw.pause(); }
  resume(): void { this.raw.resume(); }
}
