// The only code that touches listening sockets: Bun.listen on TCP (IPv4/IPv6) and unix sockets, one
// Session per connection over a SocketTransport (socket-transport.ts), and shutdown.
import type { Socket, TCPSocketListener, UnixSocketListener } from "bun";
import { rmSync, statSync } from "node:fs";
import { CheckedExport } from "../devices/checked.ts";
import { type ExportSpec, isPromise } from "../devices/types.ts";
import { Session } from "./session.ts";
import type { ExportTable } from "./types.ts";
import { type Logger, silentLogger } from "./log.ts";
import { type Conn, SocketTransport, type TransportStats } from "./socket-transport.ts";

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
  /** Reply-path counters of connections already closed (open ones are summed on demand). */
  private readonly closedStats: TransportStats = { sendfileCalls: 0, sendfileShort: 0, drainWaits: 0, copiedFileBytes: 0, receivedInPlace: 0 };
  private readonly transports = new Set<SocketTransport>();

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

  /** How replies left, summed over every connection so far (see TransportStats). */
  transportStats(): TransportStats {
    const sum = { ...this.closedStats };
    for (const t of this.transports) addStats(sum, t.stats);
    return sum;
  }

  private handlers(transport: "tcp" | "unix") {
    const self = this;
    return {
      open(sock: Socket<Conn>) {
        if (self.closing) { sock.terminate(); return; }
        sock.setNoDelay?.(true);
        const t = new SocketTransport(sock);
        if (transport === "unix") t.widenSendBuffer();
        const peer = sock.remoteAddress ? `${sock.remoteAddress}` : "unix";
        const s = new Session(t, self, self.log, peer);
        t.session = s;
        self.transports.add(t);
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
        const t = sock.data?.transport;
        if (t && self.transports.delete(t)) addStats(self.closedStats, t.stats);
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
    const l = Bun.listen<Conn>({ hostname, port, socket: this.handlers("tcp"), data: { session: null, transport: null } });
    this.listeners.push(l);
    return { hostname, port: l.port };
  }

  /** Listen on a unix socket (a stale socket file left by a dead server is replaced). */
  listenUnix(path: string): void {
    try {
      if (statSync(path).isSocket()) rmSync(path);
    } catch { /* does not exist */ }
    const l = Bun.listen<Conn>({ unix: path, socket: this.handlers("unix"), data: { session: null, transport: null } });
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

function addStats(to: TransportStats, from: TransportStats): void {
  to.sendfileCalls += from.sendfileCalls;
  to.sendfileShort += from.sendfileShort;
  to.drainWaits += from.drainWaits;
  to.copiedFileBytes += from.copiedFileBytes;
  to.receivedInPlace += from.receivedInPlace;
}
