// The only code that touches sockets: Bun.listen on TCP (IPv4/IPv6) and unix sockets, one Session
// per connection, and the socket writer (SocketTransport). Bun's socket.write() sends what the kernel
// takes and returns the count without queueing the rest, so the writer keeps the tail and resends it on
// `drain`; while too much output is queued the session stops reading requests.
import type { Socket, TCPSocketListener, UnixSocketListener } from "bun";
import { readSync, rmSync, statSync } from "node:fs";
import { sendfile } from "../sys/libc.ts";
import { CheckedExport } from "../devices/checked.ts";
import { type ExportSpec, isPromise } from "../devices/types.ts";
import { Session } from "./session.ts";
import type { ExportTable, Transport } from "./types.ts";
import { type Logger, silentLogger } from "./log.ts";

interface Conn {
  session: Session | null;
  transport: SocketTransport | null;
}

/** Sends below this size are copied into the cork batch; larger ones go out directly. */
const BATCH_SIZE = 256 * 1024;
const SMALL_SEND = 64 * 1024;

class SocketTransport implements Transport {
  private readonly q: (Uint8Array | FileSegment)[] = [];
  private bytes = 0;
  private ending = false;
  private corked = false;
  private readonly batch = new Uint8Array(BATCH_SIZE);
  private batchLen = 0;
  session: Session | null = null;
  constructor(private readonly sock: Socket<Conn>) {}

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
        if (item.length === 0) this.q.shift();
        if (rest) { this.q.unshift(rest); return; }
      }
    }
    if (this.ending) this.sock.end();
  }
}

/** Part of a file still to be sent with sendfile(2). */
interface FileSegment {
  fd: number;
  offset: number;
  length: number;
}

const EMPTY = new Uint8Array(0);

function readFully(fd: number, b: Uint8Array, offset: number): void {
  let done = 0;
  while (done < b.length) {
    const n = readSync(fd, b, done, b.length - done, offset + done);
    if (n === 0) { b.fill(0, done); return; }
    done += n;
  }
}

export interface ServerOptions {
  /** Serve every export read-only, whatever its device can do. */
  readOnly?: boolean;
  log?: Logger;
}

export class NbdServer implements ExportTable {
  readonly exports: CheckedExport[];
  private readonly byName = new Map<string, CheckedExport>();
  private readonly log: Logger;
  private readonly listeners: (TCPSocketListener<Conn> | UnixSocketListener<Conn>)[] = [];
  private readonly unixPaths: string[] = [];
  private readonly sessions = new Set<Session>();
  private closing = false;

  constructor(specs: ExportSpec[], opts: ServerOptions = {}) {
    if (specs.length === 0) throw new Error("no exports to serve");
    this.log = opts.log ?? silentLogger;
    this.exports = specs.map((s) => new CheckedExport(s, { readOnly: opts.readOnly }));
    for (const e of this.exports) {
      if (this.byName.has(e.name)) throw new Error(`two exports are named "${e.name}": use --name or rename a file`);
      this.byName.set(e.name, e);
    }
  }

  get(name: string): CheckedExport | undefined {
    return this.byName.get(name) ?? (name === "" ? this.exports[0] : undefined);
  }
  list(): readonly CheckedExport[] { return this.exports; }
  shuttingDown(): boolean { return this.closing; }
  /** Connections currently open. */
  get connections(): number { return this.sessions.size; }

  private handlers() {
    const self = this;
    return {
      open(sock: Socket<Conn>) {
        if (self.closing) { sock.terminate(); return; }
        sock.setNoDelay?.(true);
        const t = new SocketTransport(sock);
        const peer = sock.remoteAddress ? `${sock.remoteAddress}` : "unix";
        const s = new Session(t, self, self.log, peer);
        t.session = s;
        sock.data = { session: s, transport: t };
        self.sessions.add(s);
        self.log.info(`[${s.id}] connection from ${peer}`);
      },
      data(sock: Socket<Conn>, chunk: Uint8Array) {
        const s = sock.data?.session;
        if (!s) return;
        const t = sock.data!.transport!;
        t.cork();
        try {
          s.onData(chunk);
          t.uncork();
        } catch (e) {
          // A bug must not take the server down: close this connection only.
          self.log.error(`[${s.id}] internal error, closing the connection: ${(e as Error).stack ?? e}`);
          sock.terminate();
        }
      },
      drain(sock: Socket<Conn>) {
        const c = sock.data;
        if (!c?.transport) return;
        c.transport.drain();
        c.session?.onDrain();
      },
      close(sock: Socket<Conn>) {
        const s = sock.data?.session;
        if (!s) return;
        s.onClose();
        self.sessions.delete(s);
        self.log.info(`[${s.id}] closed`);
      },
      error(sock: Socket<Conn>, err: Error) {
        const s = sock.data?.session;
        self.log.warn(`[${s?.id ?? "?"}] socket error: ${err.message}`);
      },
    };
  }

  /** Listen on TCP. Port 0 picks a free port; the bound port is returned. */
  listenTcp(hostname: string, port: number): { hostname: string; port: number } {
    const l = Bun.listen<Conn>({ hostname, port, socket: this.handlers(), data: { session: null, transport: null } });
    this.listeners.push(l);
    return { hostname, port: l.port };
  }

  /** Listen on a unix socket (a stale socket file left by a dead server is replaced). */
  listenUnix(path: string): void {
    try {
      if (statSync(path).isSocket()) rmSync(path);
    } catch { /* does not exist */ }
    const l = Bun.listen<Conn>({ unix: path, socket: this.handlers(), data: { session: null, transport: null } });
    this.listeners.push(l);
    this.unixPaths.push(path);
  }

  /**
   * Stop accepting, let in-flight requests finish (new ones get ESHUTDOWN), close connections,
   * flush and close every export. Resolves when done or after `graceMs`.
   */
  async close(graceMs = 5000): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    for (const l of this.listeners) l.stop(false);
    for (const s of this.sessions) s.shutdown();
    const limit = Date.now() + graceMs;
    while (this.sessions.size > 0 && Date.now() < limit) await Bun.sleep(10);
    for (const l of this.listeners) l.stop(true);
    for (const p of this.unixPaths) rmSync(p, { force: true });
    for (const e of this.exports) {
      try {
        const f = e.flush();
        if (isPromise(f)) await f;
        const c = e.close();
        if (isPromise(c)) await c;
      } catch (err) {
        this.log.error(`closing export "${e.name}": ${(err as Error).message}`);
      }
    }
  }
}
