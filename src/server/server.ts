// The only code that touches listening sockets: Bun.listen on TCP (IPv4/IPv6) and unix sockets,
// admission at accept (allow-list, connection caps), the handshake deadline, one Session per
// connection over a SocketTransport (socket-transport.ts), and STARTTLS through an Upgrader
// (starttls.ts) built from the credentials read at start (tls.ts).
import type { Socket, TCPSocketListener, UnixSocketListener } from "bun";
import { rmSync, statSync } from "node:fs";
import type { CheckedExport } from "../devices/checked.ts";
import type { ExportSpec } from "../devices/types.ts";
import { Admission, exposureWarning } from "./access.ts";
import { ExportRegistry, Generation, staticRows, type ExportLease } from "./exports.ts";
import { clientFields, describeClient, type ClientIdentity } from "./identity.ts";
import { type Logger, silentLogger } from "./log.ts";
import { Session } from "./session.ts";
import { type CheckedSettings, checkSettings, type ServerSettings, SettingsError } from "./settings.ts";
import { ThreadPool, type ThreadedConnection } from "./thread-pool.ts";
import { type Conn, SocketTransport, type Upgrader } from "./socket-transport.ts";
import { addStats, newTransportStats, type TransportStats } from "./transport-stats.ts";
import { type ConnEvents, makeUpgrader } from "./starttls.ts";
import { loadServerCredentials, type ServerCredentials } from "./tls.ts";
import type { ExportTable, Negotiated } from "./types.ts";

export interface ServerOptions extends Partial<ServerSettings> {
  /** Serve every export read-only, whatever its device can do (with a list of specs). */
  readOnly?: boolean;
  /** Up to this many connections on threads of their own (thread-pool.ts; exports with a BlockDevice.recipe); 0: none. */
  threads?: number;
  log?: Logger;
}

/** Unwraps IPv4-mapped IPv6 ("::ffff:192.0.2.1" from a dual-stack listener) to plain IPv4. */
function peerAddress(a: string): string {
  return /^::ffff:\d+\.\d+\.\d+\.\d+$/i.test(a) ? a.slice(7) : a;
}

export class NbdServer implements ExportTable {
  /** The export table; reloads swap generations in it. */
  readonly registry: ExportRegistry;
  /** The settings in force (validated, defaults filled). */
  readonly settings: CheckedSettings;
  private readonly log: Logger;
  private readonly listeners: (TCPSocketListener<Conn> | UnixSocketListener<Conn>)[] = [];
  private readonly unixPaths: string[] = [];
  private readonly sessions = new Set<Session>();
  private readonly admission: Admission;
  private credentials: ServerCredentials | null;
  private upgrader: Upgrader | null;
  private readonly events: ConnEvents;
  private closing = false;
  /** Reply-path counters of connections already closed (open ones are summed on demand). */
  private readonly closedStats: TransportStats = newTransportStats();
  private readonly transports = new Set<SocketTransport>();
  /** serve --threads: connections on threads of their own (null: all on the event loop). */
  private readonly threads: ThreadPool | null;

  /**
   * Serve `specs` (fixed, one stack each), or the exports of a registry built from a configuration.
   * Throws a configuration error (SettingsError, or one naming a certificate or key file).
   */
  constructor(exports: ExportSpec[] | ExportRegistry, opts: ServerOptions = {}) {
    this.log = opts.log ?? silentLogger;
    this.settings = checkSettings(opts);
    this.credentials = loadServerCredentials(this.settings);
    this.admission = new Admission({
      allow: this.settings.allowList, maxConnections: this.settings.maxConnections,
      maxConnectionsPerAddress: this.settings.maxConnectionsPerAddress,
    });
    this.events = this.connEvents();
    const threads = opts.threads ?? 0;
    if (!Number.isInteger(threads) || threads < 0) throw new SettingsError("threads", `threads must be a whole number >= 0 (0: none), not ${threads}`);
    this.threads = threads > 0 ? new ThreadPool(threads, this.log) : null;
    this.upgrader = this.credentials ? makeUpgrader(this.credentials, this.events) : null;
    this.registry = exports instanceof ExportRegistry
      ? exports
      : new ExportRegistry(new Generation(staticRows(exports, { readOnly: opts.readOnly, log: this.log })), this.log);
  }

  /** The current table's exports that have one fixed stack (per-client exports have one per client). */
  get exports(): CheckedExport[] {
    return this.registry.current.rows.flatMap((r) => (r.kind === "static" ? [r.exp] : []));
  }

  resolve(name: string, client: ClientIdentity): ExportLease | undefined {
    return this.registry.resolve(name, client);
  }
  list(client: ClientIdentity): readonly { name: string; description: string }[] {
    return this.registry.list(client);
  }
  shuttingDown(): boolean { return this.closing; }
  /** Connections currently open. */
  get connections(): number { return this.sessions.size; }
  /** How replies left and requests arrived, summed over every connection so far (see TransportStats). */
  transportStats(): TransportStats {
    const sum = { ...this.closedStats };
    for (const t of this.transports) addStats(sum, t.stats);
    return sum;
  }
  /** Connections on threads now, and handed to one so far (serve --threads; zeros without). */
  threadStats(): { running: number; served: number } {
    return { running: this.threads?.running ?? 0, served: this.threads?.served ?? 0 };
  }

  /** Start the connection threads that wait for clients now (serve --threads), so that the first clients do not wait for one. */
  prestartThreads(): void {
    this.threads?.prestart();
  }

  /** What TLS serves with, in one line (null with TLS off). */
  get tlsSummary(): string | null {
    return this.credentials ? `TLS ${this.settings.tls === "require" ? "required" : "offered"}: ${this.credentials.summary}` : null;
  }

  /**
   * Reads the certificates or key file again (after they were renewed); new connections use them,
   * open ones keep theirs. On error the old credentials stay and the error is thrown.
   */
  reloadTls(): void {
    const next = loadServerCredentials(this.settings);
    const old = this.credentials;
    this.credentials = next;
    this.upgrader = next ? makeUpgrader(next, this.events) : null;
    if (old?.kind === "psk") old.engine.free();
  }

  /** A connection's events, whichever socket (plain, Bun TLS, PSK engine) carries them. */
  private connEvents(): ConnEvents {
    const self = this;
    return {
      data(c: Conn, chunk: Uint8Array) {
        const s = c.session;
        if (!s) return;
        const t = c.transport!;
        t.cork();
        try {
          s.onData(chunk);
          t.uncork();
        } catch (e) {
          // A bug must not take the server down: close this connection only.
          self.log.error(`[${s.id}] internal error, closing the connection: ${(e as Error).stack ?? e}`);
          t.destroy();
        }
      },
      drain(c: Conn) {
        if (!c.transport) return;
        c.transport.drain();
        c.session?.onDrain();
      },
      close(c: Conn) {
        const t = c.transport;
        t?.closed();
        if (t && self.transports.delete(t)) addStats(self.closedStats, t.stats);
        const s = c.session;
        if (!s) return;
        c.session = null;
        if (c.deadline) clearTimeout(c.deadline);
        self.ended(s);
      },
      error(c: Conn, err: Error) {
        self.log.warn(`[${c.session?.id ?? "?"}] socket error: ${err.message}`);
      },
    };
  }

  /**
   * Serve a connection whose handshake chose `n` on a thread of its own, if it may go: a plain
   * (not TLS) socket with nothing left to send, an export whose stack has a recipe (a raw file,
   * partition and ISO views of one, a CD's cooked track: BlockDevice.recipe), and a thread free.
   * The event loop's socket is closed; the session stays open (counted, holding its export) until
   * the thread reports the connection's end. With metrics on, the thread counts into a block of
   * shared memory (ExportStats.attach), folded into the export's counters at the end.
   */
  private handOff(sock: Socket<Conn>, c: Conn, n: Negotiated, rest: Uint8Array): ThreadedConnection | null {
    const pool = this.threads;
    const s = c.session;
    const t = c.transport;
    if (pool === null || !pool.available || s === null || t === null || c.secure !== null) return null;
    const device = n.exp.device.recipe?.() ?? null;
    if (device === null) return null;
    const socket = t.handOver();
    if (socket === null) return null;
    // The event loop lets the socket go: its close event must not end the session.
    c.session = null;
    c.transport = null;
    if (c.deadline) { clearTimeout(c.deadline); c.deadline = null; }
    t.closed();
    if (this.transports.delete(t)) addStats(this.closedStats, t.stats);
    sock.terminate();
    if (this.log.debugEnabled) this.log.debug(`[${s.id}] served on a thread of its own (${pool.running + 1} of at most ${pool.max})`);
    const stats = n.lease.stats;
    const block = stats?.attach() ?? null;
    return pool.run({
      socket, device, name: n.exp.name, description: n.exp.description, readOnly: !n.exp.caps.canWrite,
      structured: n.structured, extended: n.extended, maxPayload: n.maxPayload,
      contexts: n.contexts.map((x) => x.name), contextIds: [...n.contextIds],
      id: s.id, peer: s.peer, client: s.client, initial: rest, debug: this.log.debugEnabled, readers: pool.readers, stats: block,
    }, () => {
      if (block !== null) stats!.detach(block);
      this.ended(s);
    });
  }

  /** A session is over (its socket closed, here or on its thread): forget it and log it. */
  private ended(s: Session): void {
    s.onClose();
    this.sessions.delete(s);
    this.admission.release(s.client);
    this.log.info(`[${s.id}] closed`, { conn: s.id, ...clientFields(s.client), export: s.exportName });
  }

  /** Socket handlers; "auto" (an inherited listening socket) tells TCP from unix by the peer address. */
  private handlers(kind: "tcp" | "unix" | "auto") {
    const self = this;
    const ev = this.events;
    return {
      open(sock: Socket<Conn>) {
        if (self.closing) { sock.terminate(); return; }
        const transport = kind === "auto" ? (sock.remoteAddress ? "tcp" : "unix") : kind;
        const address = transport === "tcp" && sock.remoteAddress ? peerAddress(sock.remoteAddress) : null;
        const client: ClientIdentity = { transport, address, port: address !== null ? sock.remotePort : null, tls: null };
        const peer = describeClient(client);
        const refused = self.admission.admit(client);
        if (refused !== null) {
          self.log.warn(`refused a connection from ${peer}: ${refused}`);
          sock.data = { session: null, transport: null, secure: null, deadline: null };
          sock.end(); // a FIN, not a reset: the client sees the server close before its greeting
          return;
        }
        sock.setNoDelay?.(true);
        const t = new SocketTransport(sock, self.upgrader);
        if (transport === "unix") t.widenSendBuffer(); // inherited unix sockets too ("auto")
        else t.limitUnsent();
        self.transports.add(t);
        const handOff = self.threads ? (n: Negotiated, rest: Uint8Array) => self.handOff(sock, c, n, rest) : undefined;
        const s = new Session(t, self, self.log, peer, { client, tls: self.upgrader ? self.settings.tls : "off", handOff });
        t.session = s;
        const c: Conn = { session: s, transport: t, secure: null, deadline: null };
        sock.data = c;
        self.sessions.add(s);
        self.log.info(`[${s.id}] connection from ${peer}${address !== null ? `:${sock.remotePort}` : ""}`, { conn: s.id, ...clientFields(client) });
        const limit = self.settings.handshakeTimeout;
        if (limit > 0) {
          c.deadline = setTimeout(() => {
            c.deadline = null;
            if (s.negotiating) s.protocolError("HANDSHAKE_TIMEOUT", `no export chosen within the ${limit} s handshake timeout`);
          }, limit * 1000);
        }
      },
      data(sock: Socket<Conn>, chunk: Uint8Array) {
        const c = sock.data;
        if (c.secure !== null) c.secure.data(chunk);
        else ev.data(c, chunk);
      },
      drain(sock: Socket<Conn>) {
        const c = sock.data;
        if (c.secure !== null) c.secure.drain();
        else ev.drain(c);
      },
      close(sock: Socket<Conn>) {
        const c = sock.data;
        if (c.secure !== null) c.secure.close();
        else ev.close(c);
      },
      error(sock: Socket<Conn>, err: Error) { ev.error(sock.data, err); },
    };
  }

  /**
   * Listen on TCP. Port 0 picks a free port; the bound port is returned. "reuse-port" (SO_REUSEPORT,
   * serve --workers): every process of one server binds the port and the kernel spreads connections;
   * the first binds it "reuse-port" (failing if anything holds it), the others "join".
   */
  listenTcp(hostname: string, port: number, mode: "exclusive" | "reuse-port" | "join" = "exclusive"): { hostname: string; port: number } {
    // SO_REUSEPORT would let this bind next to another server's workers: see that the port is free first
    if (mode === "reuse-port" && port !== 0) Bun.listen<Conn>({ hostname, port, socket: this.handlers("tcp") }).stop(true);
    const reusePort = mode !== "exclusive";
    const l = Bun.listen<Conn>({ hostname, port, socket: this.handlers("tcp"), ...(reusePort ? { reusePort } : {}) });
    this.listeners.push(l);
    const warning = exposureWarning(hostname, l.port, this.settings.tls, this.settings.allowList.rules.length > 0);
    if (warning) this.log.warn(warning);
    return { hostname, port: l.port };
  }

  /**
   * Serve on a listening socket inherited from the service manager (systemd socket activation):
   * TCP or unix, already bound; Bun.listen takes it as is.
   */
  listenFd(fd: number): void {
    const l = Bun.listen<Conn>({ fd, socket: this.handlers("auto") } as unknown as Parameters<typeof Bun.listen<Conn>>[0]);
    this.listeners.push(l);
  }

  /** Listen on a unix socket (a stale socket file left by a dead server is replaced); returns its fd. */
  listenUnix(path: string): number {
    try {
      if (statSync(path).isSocket()) rmSync(path);
    } catch { /* does not exist */ }
    const l = Bun.listen<Conn>({ unix: path, socket: this.handlers("unix") });
    this.listeners.push(l);
    this.unixPaths.push(path);
    return listenerFd(l);
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
    this.threads?.close();
    await this.registry.close();
    if (this.credentials?.kind === "psk") this.credentials.engine.free();
  }
}

/** The listening socket's descriptor (Bun has it, its types do not). */
function listenerFd(l: TCPSocketListener<Conn> | UnixSocketListener<Conn>): number {
  return (l as unknown as { fd: number }).fd;
}
