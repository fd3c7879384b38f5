// The Bun transport: `Bun.connect` (TCP or unix) behind the client's Conn interface (conn.ts).
// Loaded only under Bun, through a dynamic import in transport.ts (the factory), so the library
// still runs under Node.
//
// Receiving: Bun's data callback hands a fresh Buffer per read that Bun never touches again, so the
// receiver may keep views of it (`rx.owned`). Sending: Bun's `socket.write` writes what the kernel
// takes and returns the count without queueing the rest; this adapter keeps the unsent tails
// (views, no copy: callers do not modify written buffers) and resends them on `drain`, in order.
//
// Receiving in place: Bun's data callback costs a fresh buffer and a copy per read. Where libc is
// reachable through bun:ffi, `rx.recv` also reads the socket's fd directly (recv with
// MSG_DONTWAIT), so the client can take READ payloads straight into their destination buffers.
// Bun still owns the fd: it polls it, and reports end of stream and errors as usual.
//
// STARTTLS: X.509 through Bun's own TLS (socket.upgradeTLS: a second BunConn on the TLS socket;
// the raw one goes quiet, since Bun keeps firing its events), PSK through the OpenSSL engine
// (transport-bun-psk.ts, over this connection). Encrypted connections have no `rx.recv`.
import type { Socket } from "bun";
import { haveLibc, recvNow } from "../sys/libc.ts";
import { NbdDisconnectedError, NbdTimeoutError } from "./errors.ts";
import type { Conn, Opened, Rx } from "./conn.ts";
import { ConnEmitter } from "./emitter.ts";
import type { ClientTls } from "./tls.ts";
import { startPskTls } from "./transport-bun-psk.ts";
import type { NbdTarget } from "./uri.ts";

class BunConn extends ConnEmitter implements Conn {
  sock: Socket<BunConn> | null = null;
  /** Bytes that arrived before a receiver was attached (kept, not lost). */
  private early: Buffer[] | null = [];
  private receiver: ((b: Buffer, n: number) => void) | null = null;
  readonly rx: Rx;
  private queue: Uint8Array[] = [];
  private queueHead = 0;
  private endPending = false;
  private closed = false;
  /** Upgraded to TLS: this (raw) connection's events are ciphertext for the TLS socket, not ours. */
  private upgraded = false;

  /** The socket's fd, for receiving in place (-1 when unknown). */
  fd = -1;

  /** A TLS socket: its fd carries ciphertext, so no in-place receiving. */
  readonly encrypted: boolean;

  constructor(encrypted = false) {
    super();
    this.encrypted = encrypted;
    this.rx = makeRx(this);
  }

  /** The connection as handed to the negotiation: in-place receiving only while plaintext is on the socket. */
  opened(): Opened {
    return { socket: this, rx: this.rx, startTls: (tls, ms) => this.startTls(tls, ms) };
  }

  /** STARTTLS was acknowledged: run the TLS handshake; resolves with the encrypted connection. */
  startTls(tls: ClientTls, timeoutMs: number): Promise<Opened> {
    if (tls.kind === "psk") return startPskTls({ socket: this, rx: this.rx }, tls, timeoutMs);
    const raw = this.sock!;
    const conn = new BunConn(true);
    this.upgraded = true;
    return new Promise<Opened>((resolve, reject) => {
      const failed = (e: Error) => { clearTimeout(timer); conn.off("close", onClose); conn.destroy(); this.destroy(); reject(e); };
      const onClose = () => failed(new NbdDisconnectedError("the server closed the connection during the TLS handshake", undefined, "TLS_FAILED"));
      const timer = setTimeout(() => failed(new NbdTimeoutError(`the TLS handshake took longer than ${timeoutMs} ms`)), timeoutMs);
      conn.on("close", onClose);
      const [, ts] = raw.upgradeTLS<BunConn>({
        data: conn,
        tls: {
          ...(tls.ca ? { ca: tls.ca } : {}), ...(tls.cert ? { cert: tls.cert, key: tls.key } : {}),
          serverName: tls.hostname, rejectUnauthorized: tls.verifyPeer,
        },
        socket: {
          ...handlers,
          handshake(s: Socket<BunConn>, ok: boolean, err: Error | null) {
            if (!ok || (tls.verifyPeer && !s.authorized)) {
              failed(new NbdDisconnectedError(`TLS handshake with the server failed: ${err?.message ?? "not authorized"}`, { cause: err }, "TLS_FAILED"));
              return;
            }
            clearTimeout(timer);
            conn.off("close", onClose);
            resolve(conn.opened());
          },
        },
      });
      conn.sock = ts;
    });
  }

  /** recv(2) on the socket while it is open; 0 once closed (the fd number may be reused). */
  recv(dst: Uint8Array, off: number, len: number): number {
    return this.closed || this.fd < 0 ? 0 : recvNow(this.fd, dst, off, len);
  }

  /** Hands one incoming chunk to the receiver. */
  deliver(b: Buffer): void {
    if (this.upgraded) return;
    const f = this.receiver;
    if (f) f(b, b.length);
    else this.early?.push(b);
    if (this.listeners.data!.length) this.emit("data", b);
  }

  setReceiver(f: (b: Buffer, n: number) => void): void {
    this.receiver = f;
    const early = this.early;
    this.early = null;
    if (early) for (const b of early) f(b, b.length);
  }

  getReceiver(): (b: Buffer, n: number) => void {
    return this.receiver ?? (() => {});
  }

  write(data: Uint8Array): boolean {
    const s = this.sock;
    if (!s || this.closed || data.length === 0) return !this.closed;
    if (this.queueHead < this.queue.length) {
      this.queue.push(data);
      return false;
    }
    const n = s.write(data);
    if (n >= data.length) return true;
    this.queue.push(n > 0 ? data.subarray(n) : data);
    return false;
  }

  /** Called on `drain`: sends the queued tails until the kernel stops taking them. */
  drain(): void {
    const s = this.sock;
    if (!s || this.closed || this.upgraded) return;
    const q = this.queue;
    while (this.queueHead < q.length) {
      const d = q[this.queueHead]!;
      const n = s.write(d);
      if (n < d.length) {
        if (n > 0) q[this.queueHead] = d.subarray(n);
        return;
      }
      q[this.queueHead++] = EMPTY;
    }
    this.queue = [];
    this.queueHead = 0;
    if (this.endPending) {
      this.endPending = false;
      s.end();
    }
  }

  end(): void {
    if (!this.sock || this.closed) return;
    if (this.queueHead < this.queue.length) this.endPending = true;
    else this.sock.end();
  }

  destroy(): void {
    if (this.closed) return;
    this.sock?.terminate();
    this.onClosed();
  }

  /** The socket is gone (closed by either side): "close" once, asynchronously, as node:net does. */
  onClosed(): void {
    if (this.closed) return;
    this.closed = true;
    this.queue = [];
    this.queueHead = 0;
    queueMicrotask(() => this.emit("close"));
  }

}

const EMPTY = new Uint8Array(0);

function makeRx(c: BunConn): Rx {
  return {
    owned: true,
    recv: haveLibc && !c.encrypted ? (dst, off, len) => c.recv(dst, off, len) : undefined,
    get on() {
      return c.getReceiver();
    },
    set on(f: (b: Buffer, n: number) => void) {
      c.setReceiver(f);
    },
  };
}

const handlers = {
  binaryType: "buffer" as const,
  open(s: Socket<BunConn>) {
    s.data.sock = s;
  },
  data(s: Socket<BunConn>, b: Buffer) {
    s.data.deliver(b);
  },
  drain(s: Socket<BunConn>) {
    s.data.drain();
  },
  end(s: Socket<BunConn>) {
    s.data.emit("end");
  },
  error(s: Socket<BunConn>, e: Error) {
    s.data.emit("error", e);
  },
  close(s: Socket<BunConn>) {
    s.data.onClosed();
  },
};

export async function openBunConn(target: NbdTarget, timeoutMs: number): Promise<Opened> {
  const conn = new BunConn();
  const where = target.transport === "tcp" ? `${target.host}:${target.port}` : target.path;
  let timedOut = false;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      timedOut = true;
      reject(new NbdTimeoutError(`connecting to ${where} took longer than ${timeoutMs} ms`));
    }, timeoutMs);
  });
  const connecting = target.transport === "tcp"
    ? Bun.connect<BunConn>({ hostname: target.host, port: target.port, data: conn, socket: { ...handlers, connectError() {} } })
    : Bun.connect<BunConn>({ unix: target.path, data: conn, socket: { ...handlers, connectError() {} } });
  try {
    const s = await Promise.race([connecting, timeout]);
    conn.sock = s;
    const fd = (s as unknown as { fd?: number }).fd; // present at run time, missing from the typings
    if (typeof fd === "number" && fd >= 0) conn.fd = fd;
    if (target.transport === "tcp") s.setNoDelay(true);
    return conn.opened();
  } catch (e) {
    if (timedOut) {
      connecting.then((s) => s.terminate(), () => {});
      throw e;
    }
    const err = e as Error & { code?: string };
    const code = err.code && !err.message.includes(err.code) ? ` ${err.code}` : "";
    throw new NbdDisconnectedError(`cannot connect to ${where}: ${err.message}${code}`, { cause: err }, "CONNECT_FAILED");
  } finally {
    clearTimeout(timer);
  }
}
