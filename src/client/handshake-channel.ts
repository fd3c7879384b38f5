// The negotiation's byte channel (cold path): incoming bytes are queued and served as exact-length
// reads with a deadline; writes go straight to the socket. The only place the option phase
// touches the transport, so STARTTLS can swap the connection under it: detach(), upgrade, attach().
import type { Conn, Opened, Rx } from "./conn.ts";
import { NbdDisconnectedError, NbdProtocolViolation, NbdTimeoutError, NbdUsageError } from "./errors.ts";
import type { ClientTls } from "./tls.ts";

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

/** The connection as the negotiation sees it: exact reads with the handshake deadline, and writes. */
export class HandshakeChannel {
  /** What a close is reported as happening during: the greeting, then the handshake (options). */
  stage: "the greeting" | "the handshake" = "the greeting";
  private socket!: Conn;
  private rx!: Rx;
  private opened!: Opened;
  private readonly queue = new ByteQueue();
  private readonly onData = (b: Buffer, n: number) => this.queue.push(Buffer.from(b.subarray(0, n)));
  private readonly onError = (e: Error) => this.queue.fail(new NbdDisconnectedError(`connection error during the handshake: ${e.message}`, { cause: e }));
  private readonly onClose = () => this.queue.fail(new NbdDisconnectedError(`the server closed the connection during ${this.stage}`));

  constructor(opened: Opened, readonly timeoutMs: number) {
    this.attach(opened);
  }

  /** Starts taking the bytes and the failures of `opened` (at open, and after a transport upgrade). */
  attach(opened: Opened): void {
    this.opened = opened;
    this.socket = opened.socket;
    this.rx = opened.rx;
    this.rx.on = this.onData;
    this.socket.on("error", this.onError);
    this.socket.on("close", this.onClose);
  }

  /**
   * Stops listening and returns the connection with the bytes that arrived beyond the last read
   * (the first transmission replies, when the option phase ends). Nothing is read after this.
   */
  detach(): Opened & { leftover: Buffer[] } {
    this.rx.on = () => {};
    this.socket.off("error", this.onError);
    this.socket.off("close", this.onClose);
    return { socket: this.socket, rx: this.rx, leftover: this.queue.rest() };
  }

  /**
   * STARTTLS was acknowledged: hand the connection to the transport's TLS handshake and go on
   * reading and writing through the encrypted one.
   */
  async upgrade(tls: ClientTls): Promise<void> {
    const { leftover } = this.detach();
    const opened = this.opened;
    if (leftover.length) {
      opened.socket.destroy();
      throw new NbdProtocolViolation("DATA_AFTER_STARTTLS", "the server sent data after acknowledging STARTTLS, before TLS");
    }
    if (!opened.startTls) {
      opened.socket.destroy();
      throw new NbdUsageError("UNSUPPORTED", "this transport cannot do TLS");
    }
    this.attach(await opened.startTls(tls, this.timeoutMs));
  }

  /** Exactly `n` bytes; fails on close, error or after the handshake deadline (naming `what`). */
  read(n: number, what: string): Promise<Buffer> {
    return this.queue.read(n, this.timeoutMs, what);
  }

  write(data: Uint8Array): void {
    this.socket.write(data);
  }

  destroy(): void {
    this.socket.destroy();
  }
}
