// The socket writer under a session (SocketTransport: Bun's write() takes what the kernel takes, so
// tails are kept and resent on `drain`, with backpressure to the session) and what a connection
// carries (Conn). After STARTTLS the same writer writes to an encrypting socket.
import type { Socket } from "bun";
import { readSync } from "node:fs";
import { sendfile } from "../sys/libc.ts";
import type { Session } from "./session.ts";
import type { Transport } from "./types.ts";

/** What the writer needs of a socket: Bun's plain and TLS sockets, and the PSK engine's adapter. */
export interface ByteSocket {
  /** Takes what it can and returns the count (-1: the socket is gone). */
  write(b: Uint8Array): number;
  end(): void;
  terminate(): void;
  pause(): void;
  resume(): void;
}

/**
 * Where the raw socket's events go once STARTTLS happened: to the PSK engine (which decrypts and
 * passes plaintext on), or nowhere (Bun's TLS socket has handlers of its own, and the raw
 * socket's keep firing: Bun issue #26297).
 */
export interface RawTap {
  data(chunk: Uint8Array): void;
  drain(): void;
  close(): void;
}

/** What each accepted socket carries in `socket.data`. */
export interface Conn {
  session: Session | null;
  transport: SocketTransport | null;
  /** Set by STARTTLS: the raw socket's events go here. */
  secure: RawTap | null;
  /** Closes a client that has not chosen an export in time. */
  deadline: ReturnType<typeof setTimeout> | null;
}

/** Upgrades a connection's raw socket to TLS; `initial` is what arrived after STARTTLS. */
export type Upgrader = (raw: Socket<Conn>, initial: Uint8Array) => void;

/** Sends below this size are copied into the cork batch; larger ones go out directly. */
const BATCH_SIZE = 256 * 1024;
const SMALL_SEND = 64 * 1024;

export class SocketTransport implements Transport {
  private readonly q: (Uint8Array | FileSegment)[] = [];
  private bytes = 0;
  private ending = false;
  private corked = false;
  private readonly batch = new Uint8Array(BATCH_SIZE);
  private batchLen = 0;
  session: Session | null = null;
  private sock: ByteSocket;
  /** Writes go through TLS: file ranges are read in user space (sendfile would bypass the encryption). */
  private encrypted = false;
  /** STARTTLS waiting for the plaintext queue (the ACK) to drain. */
  private pendingUpgrade: Uint8Array | null = null;

  constructor(private readonly raw: Socket<Conn>, private readonly upgrader: Upgrader | null = null) {
    this.sock = raw;
  }

  /** STARTTLS: once what is queued (the ACK) has gone out in plaintext, upgrade the socket. */
  startTls(initial: Uint8Array): void {
    this.flushBatch();
    if (this.q.length > 0) this.pendingUpgrade = initial;
    else this.upgrader!(this.raw, initial);
  }

  /** From now on write to `s`, an encrypting socket. */
  useSocket(s: ByteSocket): void {
    this.sock = s;
    this.encrypted = true;
  }

  send(b: Uint8Array): void {
    if (this.corked) {
      if (b.length <= SMALL_SEND) {
        if (this.batchLen + b.length > BATCH_SIZE) this.flushBatch();
        this.batch.set(b, this.batchLen);
        this.batchLen += b.length;
        return;
      }
      this.flushBatch();
    }
    this.write(b, false);
  }

  sendTransient(b: Uint8Array): void {
    if (this.corked) { this.send(b); return; }
    this.write(b, true);
  }

  /**
   * Header, then `length` bytes of file `fd` at `offset` with sendfile(2). When the socket fills,
   * the rest stays queued as a file segment and continues with sendfile on `drain`.
   */
  sendFile(header: Uint8Array, fd: number, offset: number, length: number): void {
    this.flushBatch();
    const seg: FileSegment = { fd, offset, length };
    this.bytes += length;
    if (this.q.length === 0) {
      const n = this.sock.write(header);
      if (n < 0) { this.bytes -= length; return; }
      if (n === header.length) {
        const rest = this.pumpFile(seg);
        if (rest) this.q.push(rest);
        if (seg.length > 0) this.q.push(seg);
        this.session?.checkBackpressure();
        return;
      }
      header = header.subarray(n);
    }
    this.q.push(header.slice());
    this.bytes += header.length;
    this.q.push(seg);
    this.session?.checkBackpressure();
  }

  /**
   * sendfile() `seg` (updated in place) until it is sent or the socket is full. Bun reports
   * `drain` only after one of its own writes came up short, so on a full socket read a small
   * piece of the file and write it through Bun: its unwritten remainder is returned, to be sent
   * before what is left of `seg`. Returns null once `seg` is fully sent (or the socket is gone).
   */
  private pumpFile(seg: FileSegment): Uint8Array | null {
    if (this.encrypted) return this.pumpEncrypted(seg);
    const sfd = (this.sock as unknown as { fd: number }).fd; // present at run time, missing from the typings
    for (;;) {
      while (seg.length > 0) {
        let r: number;
        try {
          r = sendfile(sfd, seg.fd, seg.offset, seg.length);
        } catch {
          // EPIPE, ECONNRESET: the client hung up. Not a request error: drop the connection (a
          // paused socket would not see the hang-up by itself) and let close clean up.
          seg.length = 0;
          this.destroy();
          return null;
        }
        if (r <= 0) break; // EAGAIN (socket full), or end of file (handled by the read below)
        seg.offset += r;
        seg.length -= r;
        this.bytes -= r;
      }
      if (seg.length === 0) return null;
      const k = Math.min(seg.length, 65536);
      const b = Buffer.allocUnsafe(k);
      readFully(seg.fd, b, seg.offset);
      seg.offset += k;
      seg.length -= k;
      const n = this.sock.write(b);
      if (n < 0) { this.bytes -= seg.length + k; seg.length = 0; return null; }
      this.bytes -= n;
      if (n < k) return b.subarray(n);
    }
  }

  /**
   * The TLS path for file ranges: read a piece into the shared scratch buffer and write it through
   * the encrypting socket, which copies (encrypts) it at once. Whatever the socket does not take
   * stays in `seg` and is read again on `drain`: queued payloads are never copied in memory.
   */
  private pumpEncrypted(seg: FileSegment): null {
    while (seg.length > 0) {
      const k = Math.min(seg.length, SCRATCH.length);
      const b = SCRATCH.subarray(0, k);
      readFully(seg.fd, b, seg.offset);
      const n = this.sock.write(b);
      if (n < 0) { this.bytes -= seg.length; seg.length = 0; return null; }
      seg.offset += n;
      seg.length -= n;
      this.bytes -= n;
      if (n < k) return null;
    }
    return null;
  }

  cork(): void { this.corked = true; }
  uncork(): void {
    this.corked = false;
    this.flushBatch();
  }

  private flushBatch(): void {
    if (this.batchLen === 0) return;
    const b = this.batch.subarray(0, this.batchLen);
    this.batchLen = 0;
    this.write(b, true);
  }

  private write(b: Uint8Array, transient: boolean): void {
    if (this.q.length === 0) {
      const n = this.sock.write(b);
      if (n === b.length || n < 0) return; // all sent, or the socket is gone
      b = transient ? b.slice(n) : b.subarray(n);
    } else if (transient) {
      b = b.slice();
    }
    this.q.push(b);
    this.bytes += b.length;
    this.session?.checkBackpressure();
  }

  queued(): number { return this.bytes + this.batchLen; }
  pause(): void { this.sock.pause(); }
  resume(): void { this.sock.resume(); }
  end(): void {
    this.flushBatch();
    this.ending = true;
    if (this.q.length === 0) this.sock.end();
  }
  destroy(): void {
    this.q.length = 0;
    this.bytes = 0;
    this.batchLen = 0;
    this.sock.terminate();
  }
  /** The kernel can take more: send what is queued. */
  drain(): void {
    while (this.q.length) {
      const item = this.q[0]!;
      if (item instanceof Uint8Array) {
        const n = this.sock.write(item);
        if (n < 0) { this.q.length = 0; this.bytes = 0; return; }
        this.bytes -= n;
        if (n < item.length) { this.q[0] = item.subarray(n); return; }
        this.q.shift();
      } else {
        const rest = this.pumpFile(item);
        if (rest) {
          if (item.length === 0) this.q.shift();
          this.q.unshift(rest);
          return;
        }
        if (item.length > 0) return; // the socket is full
        this.q.shift();
      }
    }
    if (this.pendingUpgrade) {
      const initial = this.pendingUpgrade;
      this.pendingUpgrade = null;
      this.upgrader!(this.raw, initial);
      return;
    }
    if (this.ending) this.sock.end();
  }
}

/** The TLS path's read buffer, shared: every write through TLS consumes it before returning. */
const SCRATCH = new Uint8Array(256 * 1024);

/** Part of a file still to be sent with sendfile(2). */
interface FileSegment {
  fd: number;
  offset: number;
  length: number;
}


function readFully(fd: number, b: Uint8Array, offset: number): void {
  let done = 0;
  while (done < b.length) {
    const n = readSync(fd, b, done, b.length - done, offset + done);
    if (n === 0) { b.fill(0, done); return; }
    done += n;
  }
}
