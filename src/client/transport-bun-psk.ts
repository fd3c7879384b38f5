// TLS-PSK for the client under Bun (whose BoringSSL has no PSK): the system OpenSSL engine
// (src/sys/tls-engine.ts) over an open plain Conn, plaintext to the receiver in fresh buffers.
// Loaded only by transport-bun.ts, since the engine needs bun:ffi.
import { TlsContext, type TlsSession } from "../sys/tls-engine.ts";
import type { Conn, Opened, Rx } from "./conn.ts";
import { ConnEmitter } from "./emitter.ts";
import { NbdDisconnectedError, NbdTimeoutError } from "./errors.ts";
import type { ClientTls } from "./tls.ts";

class EngineConn extends ConnEmitter implements Conn {
  readonly rx: Rx;
  private receiver: (b: Buffer, n: number) => void = () => {};
  private secured = false;
  /** Settles the handshake's promise (null once settled). */
  settle: ((e: Error | null) => void) | null = null;

  constructor(private readonly raw: Opened, private readonly tls: TlsSession) {
    super();
    const self = this;
    this.rx = {
      owned: true,
      get on() { return self.receiver; },
      set on(f: (b: Buffer, n: number) => void) { self.receiver = f; },
    };
    raw.rx.on = (b, n) => this.onCipher(b.subarray(0, n));
    raw.socket.on("error", (e) => this.fail(e));
    raw.socket.on("end", () => this.emit("end"));
    raw.socket.on("close", () => {
      this.tls.free();
      this.fail(new NbdDisconnectedError("the server closed the connection during the TLS handshake", undefined, "TLS_FAILED"));
      this.emit("close");
    });
  }

  /** Sends the ClientHello. */
  begin(): void {
    this.step();
  }

  private fail(e: Error): void {
    const s = this.settle;
    if (s) { this.settle = null; s(e); return; }
    if (e instanceof NbdDisconnectedError && e.code === "TLS_FAILED") return;
    this.emit("error", e);
  }

  /** Advances the handshake; once done, decrypts whatever arrived. */
  private step(): void {
    try {
      if (!this.secured) {
        const done = this.tls.handshake();
        this.flush();
        if (!done) return;
        this.secured = true;
        const s = this.settle;
        this.settle = null;
        s?.(null);
      }
      for (let p = this.tls.read(); p !== null; p = this.tls.read()) {
        this.receiver(p as Buffer, p.length);
        if (this.listeners.data!.length) this.emit("data", p);
      }
      if (this.tls.peerClosed) this.emit("end");
    } catch (e) {
      this.flush();
      const err = new NbdDisconnectedError(`TLS with the server failed: ${(e as Error).message}`, { cause: e }, "TLS_FAILED");
      this.raw.socket.destroy();
      this.fail(err);
    }
  }

  private onCipher(b: Buffer): void {
    if (this.tls.freed) return;
    this.tls.receive(b);
    this.step();
  }

  private flush(): void {
    const o = this.tls.takeOutput();
    if (o) this.raw.socket.write(o);
  }

  write(data: Uint8Array): boolean {
    if (this.tls.freed) return false;
    this.tls.write(data);
    this.flush();
    return true;
  }

  end(): void {
    if (!this.tls.freed) {
      this.tls.shutdown();
      this.flush();
    }
    this.raw.socket.end();
  }

  destroy(): void {
    this.tls.free();
    this.raw.socket.destroy();
  }
}

/** Runs a TLS-PSK handshake over `raw` (after STARTTLS's ACK); resolves with the encrypted connection. */
export function startPskTls(raw: Opened, tls: ClientTls, timeoutMs: number): Promise<Opened> {
  const ctx = new TlsContext({ role: "client", pskIdentity: tls.pskIdentity!, pskKey: tls.pskKey! });
  const conn = new EngineConn(raw, ctx.session(tls.hostname));
  ctx.free(); // the session keeps its own reference
  return new Promise<Opened>((resolve, reject) => {
    const timer = setTimeout(() => conn.settle?.(new NbdTimeoutError(`the TLS handshake took longer than ${timeoutMs} ms`)), timeoutMs);
    conn.settle = (e) => {
      clearTimeout(timer);
      if (e) { conn.destroy(); reject(e); } else resolve({ socket: conn, rx: conn.rx });
    };
    conn.begin();
  });
}
