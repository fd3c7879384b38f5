// A raw NBD client that can switch to TLS mid-stream, for transcript tests of STARTTLS: it writes
// exactly the bytes it is told to, reads replies field by field, and after STARTTLS runs the TLS
// handshake with the project's OpenSSL engine (src/sys/tls-engine.ts) so X.509 and PSK both work,
// including a ClientHello sent in the same write as the STARTTLS option.
import { connect, type Socket } from "node:net";
import { TlsContext, type TlsSession } from "../../src/sys/tls-engine.ts";
import { ByteQueue } from "./byte-queue.ts";
import { IHAVEOPT, readOptionReplies, readOptionReply, type OptionReply } from "../robustness-wire.ts";

export type { OptionReply };

export class TlsWire {
  private readonly q = new ByteQueue();
  private waiter: (() => void) | null = null;
  private tls: TlsSession | null = null;
  /** Plaintext bytes still expected before the server's TLS bytes (the STARTTLS reply, when the ClientHello went early). */
  private plainFirst = 0;
  private handshakeDone = false;
  closed = false;
  tlsError: Error | null = null;

  private constructor(readonly sock: Socket) {
    sock.on("data", (d: Buffer) => this.onData(d));
    sock.on("close", () => { this.closed = true; this.wake(); });
    sock.on("error", () => {});
  }

  static open(t: { port: number } | { path: string }): Promise<TlsWire> {
    return new Promise((resolve, reject) => {
      const s = "port" in t ? connect({ host: "127.0.0.1", port: t.port }) : connect({ path: t.path });
      s.setNoDelay(true);
      s.once("connect", () => resolve(new TlsWire(s)));
      s.once("error", reject);
    });
  }

  private onData(d: Buffer): void {
    if (this.plainFirst > 0) {
      const n = Math.min(this.plainFirst, d.length);
      this.push(d.subarray(0, n));
      this.plainFirst -= n;
      d = d.subarray(n);
      if (d.length === 0) return;
    }
    if (!this.tls) { this.push(d); return; }
    this.tls.receive(d);
    this.pumpTls();
  }

  private pumpTls(): void {
    const t = this.tls!;
    try {
      if (!this.handshakeDone) {
        this.handshakeDone = t.handshake();
        this.flushTls();
        if (!this.handshakeDone) return;
        this.wake();
      }
      for (let p = t.read(); p !== null; p = t.read()) this.push(Buffer.from(p));
    } catch (e) {
      this.flushTls();
      this.tlsError = e as Error;
      this.wake();
    }
  }

  private flushTls(): void {
    const o = this.tls?.takeOutput();
    if (o) this.sock.write(o);
  }

  private push(b: Buffer): void {
    this.q.push(b);
    this.wake();
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }

  private async waitUntil(cond: () => boolean, ms: number, what: string): Promise<void> {
    const limit = Date.now() + ms;
    while (!cond()) {
      if (this.tlsError && what !== "the close") throw this.tlsError;
      if (this.closed) throw new Error(`connection closed while waiting for ${what}`);
      const left = limit - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${what}`);
      await new Promise<void>((r) => {
        const t = setTimeout(r, left);
        this.waiter = () => { clearTimeout(t); r(); };
      });
    }
  }

  /** Plaintext out (encrypted once TLS is on). */
  write(b: Uint8Array): void {
    if (this.tls) {
      this.tls.write(b);
      this.flushTls();
    } else {
      this.sock.write(b);
    }
  }

  async read(n: number, ms = 10_000): Promise<Buffer> {
    await this.waitUntil(() => this.q.have >= n, ms, `${n} bytes (have ${this.q.have})`);
    return this.q.take(n);
  }

  async closedWithin(ms = 5000): Promise<boolean> {
    try {
      await this.waitUntil(() => this.closed, ms, "the close");
    } catch {
      return this.closed;
    }
    return true;
  }

  get pending(): number { return this.q.have; }
  destroy(): void { this.tls?.free(); this.sock.destroy(); }

  /** Greeting, then client flags FIXED_NEWSTYLE|NO_ZEROES. Returns the handshake flags. */
  async hello(): Promise<number> {
    const g = await this.read(18);
    if (g.toString("latin1", 0, 16) !== "NBDMAGICIHAVEOPT") throw new Error(`bad greeting ${g.toString("hex")}`);
    this.write(Buffer.from([0, 0, 0, 3]));
    return g.readUInt16BE(16);
  }

  static option(option: number, data: Uint8Array = new Uint8Array(0)): Buffer {
    const h = Buffer.alloc(16);
    IHAVEOPT.copy(h, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(data.length, 12);
    return Buffer.concat([h, data]);
  }

  sendOption(option: number, data: Uint8Array = new Uint8Array(0)): void {
    this.write(TlsWire.option(option, data));
  }

  optionReply(): Promise<OptionReply> {
    return readOptionReply((n) => this.read(n));
  }

  /** Replies up to and including the first that is not REP_INFO/SERVER/META_CONTEXT. */
  optionReplies(): Promise<OptionReply[]> {
    return readOptionReplies((n) => this.read(n));
  }

  /**
   * STARTTLS, then the TLS handshake with `ctx` (a client TlsContext). With `early`, the
   * ClientHello goes in the same write as the option, before the ACK is read. Returns the
   * STARTTLS reply; when it is not ACK no handshake is attempted.
   */
  async startTls(ctx: TlsContext, opts: { early?: boolean; hostname?: string } = {}): Promise<OptionReply> {
    const option = TlsWire.option(5);
    if (opts.early) {
      const t = ctx.session(opts.hostname ?? "localhost");
      t.handshake();
      const hello = t.takeOutput()!;
      this.plainFirst = 20;
      this.tls = t;
      this.sock.write(Buffer.concat([option, hello]));
      const r = await this.optionReply();
      await this.waitUntil(() => this.handshakeDone, 10_000, "the TLS handshake");
      return r;
    }
    this.sock.write(option);
    const r = await this.optionReply();
    if (r.type !== 1) return r;
    this.tls = ctx.session(opts.hostname ?? "localhost");
    this.pumpTls();
    await this.waitUntil(() => this.handshakeDone, 10_000, "the TLS handshake");
    return r;
  }
}

export { TlsContext };
