// The socket writer under a session (SocketTransport). Bun's write() takes what the kernel takes and
// returns the count without queueing the rest, so tails are kept and resent on `drain`, with
// backpressure to the session. READ payloads from files go out with sendfile(2) behind a MSG_MORE
// header, or read and sent from one buffer when a single client reads (see bulkReaders); after
// STARTTLS the same writer writes to an encrypting socket (no sendfile, no raw recv).
import type { Socket } from "bun";
import { readSync } from "node:fs";
import { adoptSocket, copySend, recvNow, sendfile, sendMore, setNotSentLowat, setSendBuffer } from "../sys/libc.ts";
import type { Session } from "./session.ts";
import type { Transport } from "./types.ts";
import { newTransportStats, type TransportStats } from "./transport-stats.ts";
import { OutputBatch } from "./output-batch.ts";

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

/**
 * The send buffer asked for on unix sockets (the kernel doubles it, capped by net.core.wmem_max).
 * Their default (net.core.wmem_default, 208 KiB here) is less than one 256 KiB nbdcopy reply, so
 * every large reply stalled the writer; TCP tunes its own buffer (net.ipv4.tcp_wmem) and is left alone.
 */
const UNIX_SEND_BUFFER = 4 * 1024 * 1024;
/**
 * TCP_NOTSENT_LOWAT on TCP sockets. Without it sendfile filled the autotuned send buffer (4 MiB)
 * with data the client's closed window held back, and the kernel sent it later from the client's
 * ACK processing, on the client's clock: nbdcopy (one thread per connection, the bottleneck) spent
 * 0.76 CPU s/GiB against 0.58 with 512 KiB, and the copy ran 10-20% faster (see the commit).
 */
const TCP_UNSENT = 512 * 1024;

/**
 * Connections (in this process) that have sent file ranges: while there is only one, its file
 * ranges are read into a buffer and sent from there (copySend) instead of with sendfile(2).
 * sendfile hands the page-cache pages themselves to the socket, so the receiver's copy is the one
 * that reads them from memory: measured with one fio client (1 MiB reads, QD16, 256 MiB file, unix
 * socket), fio spent 0.77 s of system time per GB and capped the run at ~1.25 GB/s with the server
 * 75% idle; reading them in the server (a cold copy into a buffer, SCRATCH, then a copy from it
 * into the socket) halved the client's cost and gave ~1.9 GB/s (TCP: 1.2 →
 * 2.2 GB/s). With two or more busy connections the single server thread is the bottleneck, and
 * sendfile, which costs it the least, wins: nbdcopy's two connections ran at 3.6 GB/s with sendfile
 * and 2.4 GB/s with the copy.
 */
let bulkReaders = 0;

/** Part of a file still to be sent with sendfile(2). */
interface FileSegment {
  fd: number;
  offset: number;
  length: number;
  /** Called once the segment has been sent, or dropped (see FileRange.release). */
  release: (() => void) | null | undefined;
}

export class SocketTransport implements Transport {
  private readonly q: (Uint8Array | FileSegment)[] = [];
  private bytes = 0;
  private ending = false;
  private corked = false;
  /** Small replies while corked (a data callback is running). */
  private readonly batch = new OutputBatch((b) => this.write(b, true));
  /** The socket's descriptor (-1: unknown, so no sendfile or MSG_MORE). */
  private readonly fd: number;
  /** One byte of a file, written through Bun when sendfile finds the socket full (see pumpFile). */
  private readonly probe = new Uint8Array(1);
  /** Counted in bulkReaders (it has sent a file range). */
  private bulk = false;
  readonly stats: TransportStats = newTransportStats();
  session: Session | null = null;
  private sock: ByteSocket;
  /**
   * STARTTLS was asked for: from then on the raw socket carries TLS records, so neither sendfile,
   * nor MSG_MORE, nor recv on its descriptor (that would take records away from the TLS layer).
   * File ranges are read in user space and written through the encrypting socket.
   */
  private encrypted = false;
  /** STARTTLS waiting for the plaintext queue (the ACK) to drain. */
  private pendingUpgrade: Uint8Array | null = null;

  constructor(private readonly raw: Socket<Conn>, private readonly upgrader: Upgrader | null = null) {
    this.sock = raw;
    const fd = (raw as unknown as { fd?: number }).fd; // present at run time, missing from the typings
    this.fd = typeof fd === "number" ? fd : -1;
  }

  /** What the socket holds now, read into `dst` (see Transport.recvInto); nothing once TLS started. */
  recvInto(dst: Uint8Array, off: number, len: number): number {
    if (this.encrypted || this.fd < 0) return 0;
    const n = recvNow(this.fd, dst, off, len);
    this.stats.receivedInPlace += n;
    return n;
  }

  /**
   * Let the connection go to another owner (a thread, see thread-pool.ts): what is batched is
   * sent, and if the kernel took all of it, a blocking descriptor of the socket is returned; the
   * caller then closes the event loop's socket. Null (and nothing changes) when output is still
   * queued, after STARTTLS, or without libc.
   */
  handOver(): number | null {
    if (this.encrypted || this.fd < 0) return null;
    this.flushBatch();
    if (this.q.length > 0) return null;
    try {
      return adoptSocket(this.fd);
    } catch {
      return null;
    }
  }

  /** STARTTLS: once what is queued (the ACK) has gone out in plaintext, upgrade the socket. */
  startTls(initial: Uint8Array): void {
    this.encrypted = true; // the raw descriptor is the TLS layer's from now on
    this.flushBatch();
    if (this.q.length > 0) this.pendingUpgrade = initial;
    else this.upgrader!(this.raw, initial);
  }

  /** From now on write to `s`, an encrypting socket. */
  useSocket(s: ByteSocket): void {
    this.sock = s;
    this.encrypted = true;
  }

  /** A TCP socket: count it as full once TCP_UNSENT bytes wait unsent (TCP_NOTSENT_LOWAT). */
  limitUnsent(): void {
    if (this.fd >= 0) setNotSentLowat(this.fd, TCP_UNSENT);
  }

  /** A unix socket: ask for a send buffer that holds several large replies (UNIX_SEND_BUFFER). */
  widenSendBuffer(): void {
    if (this.fd >= 0) setSendBuffer(this.fd, UNIX_SEND_BUFFER);
  }

  send(b: Uint8Array): void {
    if (this.corked) {
      if (this.batch.add(b)) return;
      this.flushBatch();
    }
    this.write(b, false);
  }

  sendTransient(b: Uint8Array): void {
    if (this.corked) { this.send(b); return; }
    this.write(b, true);
  }

  /**
   * Room for a small reply of `length` bytes in the cork batch, to be filled in place and then
   * committed; null when not corked or too large (then send() an allocated buffer instead).
   */
  reserve(length: number): Uint8Array | null {
    return this.corked ? this.batch.reserve(length) : null;
  }

  /** The reserved bytes are filled: they are part of the output now. */
  commit(length: number): void {
    this.batch.commit(length);
  }

  /** Someone keeps the reserved region (an asynchronous read fills it later): flush, take a new batch. */
  detach(): void {
    this.batch.detach();
  }

  /**
   * Header, then `length` bytes of file `fd` at `offset` with sendfile(2). The header goes with
   * MSG_MORE so that it leaves in one segment with the payload. When the socket fills, the rest
   * stays queued as a file segment and continues with sendfile on `drain`.
   */
  sendFile(header: Uint8Array, fd: number, offset: number, length: number, release?: (() => void) | null): void {
    this.flushBatch();
    const seg: FileSegment = { fd, offset, length, release };
    const raw = !this.encrypted && this.fd >= 0;
    if (raw && !this.bulk) {
      this.bulk = true;
      bulkReaders++;
    }
    if (this.q.length === 0) {
      const n = raw ? sendMore(this.fd, header, 0, header.length) : 0;
      // What did not go (socket full, or an error) goes through Bun: it arms `drain`, or reports the error.
      const m = n === header.length ? 0 : this.sock.write(n > 0 ? header.subarray(n) : header);
      if (m < 0) { release?.(); return; } // the socket is gone
      if (n + m === header.length) {
        this.bytes += length;
        if (this.pumpFile(seg)) released(seg);
        else this.queueSegment(seg);
        return;
      }
      header = header.subarray(n + m);
      this.stats.drainWaits++;
    }
    this.q.push(header.slice());
    this.bytes += header.length + length;
    this.queueSegment(seg);
  }

  /** The connection closed: it no longer counts as a reader (bulkReaders); its queued file segments will not be sent. */
  closed(): void {
    if (this.bulk) bulkReaders--;
    this.bulk = false;
    this.releaseQueued();
  }

  /** Call the release of every queued file segment (they will not be sent), once. */
  private releaseQueued(): void {
    for (const item of this.q) if (!(item instanceof Uint8Array)) released(item);
  }

  private queueSegment(seg: FileSegment): void {
    this.q.push(seg);
    this.session?.checkBackpressure();
  }

  /**
   * sendfile() `seg` (updated in place) until it is sent or the socket is full. Returns true once
   * it is sent (or the socket is gone). Bun reports `drain` only after one of its own writes came
   * up short, so on a full socket one byte of the file is written through Bun: the socket cannot
   * take it and Bun watches for room (if it can after all, the byte is sent and sendfile goes on).
   */
  private pumpFile(seg: FileSegment): boolean {
    if (this.encrypted || this.fd < 0) return this.pumpCopied(seg);
    const st = this.stats;
    for (;;) {
      while (seg.length > 0) {
        let r: number;
        const copy = bulkReaders === 1;
        try {
          r = copy ? copySend(this.fd, seg.fd, seg.offset, seg.length, SCRATCH) : sendfile(this.fd, seg.fd, seg.offset, seg.length);
        } catch {
          // EPIPE, ECONNRESET: the client hung up. Not a request error: drop the connection (a
          // paused socket would not see the hang-up by itself) and let close clean up.
          this.dropSegment(seg);
          this.destroy();
          return true;
        }
        if (copy) {
          st.copySends++;
          if (r > 0) st.copiedFileBytes += r;
        } else st.sendfileCalls++;
        if (r <= 0) {
          st.sendfileShort++;
          if (r === 0) return this.sendPastEnd(seg);
          break; // the socket is full
        }
        seg.offset += r;
        seg.length -= r;
        this.bytes -= r;
        if (seg.length > 0) st.sendfileShort++;
      }
      if (seg.length === 0) return true;
      if (readSync(seg.fd, this.probe, 0, 1, seg.offset) !== 1) this.probe[0] = 0;
      const n = this.sock.write(this.probe);
      if (n < 0) return this.dropSegment(seg);
      if (n === 0) {
        st.drainWaits++;
        return false;
      }
      seg.offset++;
      seg.length--;
      this.bytes--;
      st.copiedFileBytes++;
    }
  }

  /**
   * The TLS path for file ranges: read a piece into the shared scratch buffer and write it through
   * the encrypting socket, which copies (encrypts) it at once. Whatever the socket does not take
   * stays in `seg` and is read again on `drain`: queued payloads are never copied in memory.
   * Returns true once `seg` is sent (or the socket is gone).
   */
  private pumpCopied(seg: FileSegment): boolean {
    while (seg.length > 0) {
      const k = Math.min(seg.length, SCRATCH.length);
      const b = SCRATCH.subarray(0, k);
      readFully(seg.fd, b, seg.offset);
      const n = this.sock.write(b);
      if (n < 0) return this.dropSegment(seg);
      seg.offset += n;
      seg.length -= n;
      this.bytes -= n;
      this.stats.copiedFileBytes += n;
      if (n < k) {
        this.stats.drainWaits++;
        return false;
      }
    }
    return true;
  }

  /**
   * The file ended before the segment did (it shrank under us): the rest reads as zeros, sent
   * next, before anything queued after the segment (a segment being drained is at the queue's head).
   */
  private sendPastEnd(seg: FileSegment): boolean {
    const zeros = new Uint8Array(seg.length);
    this.bytes -= seg.length;
    seg.length = 0;
    if (this.q.length === 0) {
      this.write(zeros, false);
    } else {
      this.q.unshift(zeros);
      this.bytes += zeros.length;
    }
    return true;
  }

  private dropSegment(seg: FileSegment): boolean {
    this.bytes -= seg.length;
    seg.length = 0;
    return true;
  }

  cork(): void { this.corked = true; }
  uncork(): void {
    this.corked = false;
    this.flushBatch();
  }

  private flushBatch(): void {
    this.batch.flush();
  }

  private write(b: Uint8Array, transient: boolean): void {
    if (this.q.length === 0) {
      const n = this.sock.write(b);
      if (n === b.length || n < 0) return; // all sent, or the socket is gone
      this.stats.drainWaits++;
      b = transient ? b.slice(n) : b.subarray(n);
    } else if (transient) {
      b = b.slice();
    }
    this.q.push(b);
    this.bytes += b.length;
    this.session?.checkBackpressure();
  }

  queued(): number { return this.bytes + this.batch.length; }
  pause(): void { this.sock.pause(); }
  resume(): void { this.sock.resume(); }
  end(): void {
    this.flushBatch();
    this.ending = true;
    if (this.q.length === 0) this.sock.end();
  }
  destroy(): void {
    this.releaseQueued();
    this.q.length = 0;
    this.bytes = 0;
    this.batch.clear();
    this.sock.terminate();
  }

  /** The kernel can take more: send what is queued. */
  drain(): void {
    const q = this.q;
    while (q.length) {
      const item = q[0]!;
      if (item instanceof Uint8Array) {
        const n = this.sock.write(item);
        if (n < 0) { this.releaseQueued(); q.length = 0; this.bytes = 0; return; }
        this.bytes -= n;
        if (n < item.length) {
          q[0] = item.subarray(n);
          this.stats.drainWaits++;
          return;
        }
        q.shift();
      } else {
        // A segment that ran past the end of its file puts its zeros in front of itself.
        if (!this.pumpFile(item)) return;
        if (q[0] === item) q.shift();
        else q.splice(q.indexOf(item), 1);
        released(item);
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

/** The segment has been sent, or will not be: call its release, once. */
function released(seg: FileSegment): void {
  const r = seg.release;
  seg.release = null;
  r?.();
}

/**
 * The read buffer of copySend and of the TLS path, shared: every use consumes it before returning.
 * 512 KiB: with one fio reader (1 MiB, QD16) the server sends at 2.4-2.6 GB/s over TCP against
 * 2.0-2.25 with 256 KiB (half the pread/send pairs per MiB), 3.3-3.5 against 2.5-3.4 over a unix
 * socket, for the same CPU; 128 KiB fell to 1.6-1.8, 1 MiB gave 2.1-2.3.
 */
const SCRATCH = new Uint8Array(512 * 1024);

/** Reads `b.length` bytes of `fd` at `offset`; past the end of the file the rest reads as zeros. */
export function readFully(fd: number, b: Uint8Array, offset: number): void {
  let done = 0;
  while (done < b.length) {
    const n = readSync(fd, b, done, b.length - done, offset + done);
    if (n === 0) { b.fill(0, done); return; }
    done += n;
  }
}
