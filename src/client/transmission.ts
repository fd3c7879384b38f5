// One connection in the transmission phase, under NbdClient's commands: submits requests (a
// cookie and a deadline each, then the writer), feeds the reply receiver from the transport, and
// owns the connection's life (socket events, deadlines, failure, DISC and close).
import { NBD_CMD_READ, commandName } from "../protocol/constants.ts";
import type { Conn } from "./conn.ts";
import { NbdClosedError, NbdDisconnectedError, NbdProtocolViolation, NbdTimeoutError } from "./errors.ts";
import type { Negotiated } from "./negotiated.ts";
import { ReplyReceiver, type ReceiverHost } from "./receiver.ts";
import { RequestTable, type ClientStats } from "./requests.ts";
import { RequestWriter } from "./sender.ts";

/** The first error ends the connection: every pending request and every later one fails with it. */
export class Transmission implements ReceiverHost {
  /** Set once the connection failed or was closed: the error every new request fails with. */
  dead: Error | null = null;
  /** Resolves once the connection is closed (by us or by the server); never rejects. */
  readonly closed: Promise<void>;
  readonly requests = new RequestTable();
  readonly receiver: ReplyReceiver;
  private readonly socket: Conn;
  private readonly writer: RequestWriter;
  private closing = false;
  private resolveClosed!: () => void;
  private sweeper: ReturnType<typeof setInterval> | null = null;

  constructor(n: Negotiated, private readonly stats: ClientStats, private readonly timeoutMs: number, busyPollMs: number) {
    this.socket = n.socket;
    this.closed = new Promise((r) => (this.resolveClosed = r));
    this.writer = new RequestWriter(n.socket, n.extended === true);
    const contextNames = new Map<number, string>();
    for (const [name, id] of n.metaContexts) contextNames.set(id, name);
    const rv = new ReplyReceiver(this, this.requests, this.writer, {
      structured: n.structured, extended: n.extended === true, contextNames, stats, recv: n.rx?.recv ?? null, busyPollMs,
    });
    this.receiver = rv;
    if (n.rx && rv.recvIn) {
      n.rx.on = (b: Buffer, len: number) => {
        rv.onData(b, len);
        rv.pull();
      };
    } else if (n.rx) n.rx.on = (b: Buffer, len: number) => rv.onData(b, len);
    else this.socket.on("data", (c: Buffer) => rv.onData(c, c.length));
    this.socket.on("error", (e: Error) => this.fail(new NbdDisconnectedError(`connection error: ${e.message}`, { cause: e })));
    this.socket.on("end", () => this.fail(new NbdDisconnectedError("the server closed the connection")));
    this.socket.on("close", () => {
      this.fail(new NbdDisconnectedError("the connection closed"));
      this.resolveClosed();
    });
    for (const c of n.leftover) rv.onData(c, c.length);
  }

  /**
   * Sends one request and settles with its reply: nothing for most commands, the extents for
   * BLOCK_STATUS, the data views when `views` is set. `buf` is a READ's destination, or the
   * payload of any other command (WRITE's data; BLOCK_STATUS's context filter, extended headers only).
   */
  submit<T>(type: number, flags: number, offset: number, length: number, buf: Uint8Array | null, views = false): Promise<T> {
    if (this.dead) return Promise.reject(this.dead);
    if (this.closing) return Promise.reject(new NbdClosedError("close() was called: no new requests"));
    return new Promise<T>((resolve, reject) => {
      const deadline = performance.now() + this.timeoutMs;
      const r = this.requests.add(type, flags, offset, length, buf, views, deadline, resolve as (v: never) => void, reject);
      this.stats.requests++;
      if (!this.sweeper) this.startSweeper();
      this.writer.request(type, flags, r.id, offset, length, type === NBD_CMD_READ ? null : buf);
    });
  }

  /** Waits for every request in flight, sends NBD_CMD_DISC and closes the socket. */
  async close(): Promise<void> {
    if (this.closing || this.dead) {
      this.socket.destroy();
      return this.closed;
    }
    this.closing = true;
    while (this.requests.pending > 0 && !this.dead) await this.requests.idle();
    if (!this.dead) {
      this.writer.disconnect();
      this.socket.end();
      this.dead = new NbdClosedError();
      this.writer.stop();
      const t = setTimeout(() => this.socket.destroy(), 2000);
      await this.closed;
      clearTimeout(t);
    }
    this.socket.destroy();
    return this.closed;
  }

  /** Fails the connection: every pending request and every later one gets `err`. */
  fail(err: Error): void {
    if (this.dead && this.requests.pending === 0) {
      this.socket.destroy();
      return;
    }
    this.dead ??= err;
    this.writer.stop();
    if (this.sweeper) {
      clearInterval(this.sweeper);
      this.sweeper = null;
    }
    this.requests.rejectAll(this.dead);
    this.socket.destroy();
  }

  violation(code: string, msg: string): NbdProtocolViolation {
    const err = new NbdProtocolViolation(code, `protocol violation by the server: ${msg}`);
    this.fail(err);
    return err;
  }

  private startSweeper(): void {
    const every = Math.max(10, Math.min(1000, this.timeoutMs / 4));
    this.sweeper = setInterval(() => {
      if (this.requests.pending === 0) {
        clearInterval(this.sweeper!);
        this.sweeper = null;
        return;
      }
      const r = this.requests.overdue(performance.now());
      if (r) this.fail(new NbdTimeoutError(`${commandName(r.type)} at ${r.offset} (+${r.length}) got no reply within ${this.timeoutMs} ms`));
    }, every);
  }
}
