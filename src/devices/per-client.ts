// Per-client overlays (boot farms): one base opened read-only once, and for each client a qcow2
// overlay DIR/NAME@CLIENT.qcow2, created on first use and reopened on every later connection, shared
// by that client's connections; a connection without a client name gets a throw-away overlay.
import { closeSync, existsSync, openSync, readdirSync, statSync, unlinkSync, utimesSync } from "node:fs";
import { join } from "node:path";
import { F_UNLCK, F_WRLCK, ofdTestLock } from "../sys/libc.ts";
import { openOverlayBase } from "./open.ts";
import type { RemoteSettings } from "./remote/index.ts";
import { readHeader } from "./qcow2/format.ts";
import { createOverlayFile, openImage, type OverlayBase } from "./qcow2/index.ts";
import { PERM_WRITE, RW_DENY, RW_PERMS, lockImage } from "./qcow2/lock.ts";
import { isPromise, type BlockDevice, type Maybe } from "./types.ts";

/** How long a client's overlay stays open after its last connection (a reboot reconnects at once). */
export const LINGER_MS = 5000;

export interface ClientOverlaysOptions {
  /** The export name: overlays are DIR/NAME@CLIENT.qcow2. */
  name: string;
  dir: string;
  compat?: boolean;
  log: (msg: string) => void;
  lingerMs?: number;
}

/** The overlay file of `client` for export `name` in `dir`. */
export function clientOverlayPath(dir: string, name: string, client: string): string {
  return join(dir, `${name}@${client}.qcow2`);
}

/**
 * One client's overlay. The manager's own descriptor holds the QEMU-compatible locks for as long as
 * the entry lives, so the device can be reopened while a previous one finishes closing, and QEMU
 * or another server cannot open the file meanwhile.
 */
interface ClientEntry {
  readonly path: string;
  readonly lockFd: number;
  device: BlockDevice | null;
  refs: number;
  timer: ReturnType<typeof setTimeout> | null;
  /** The previous device's close, while it runs. */
  closing: Promise<void> | null;
}

export class ClientOverlays {
  private readonly clients = new Map<string, ClientEntry>();
  private tableRefs = 1;
  /** Throw-away overlays open now (one per connection to plain NAME). */
  private readonly throwAways = new Set<BlockDevice>();
  private baseReleased = false;
  private readonly lingerMs: number;

  constructor(private readonly base: OverlayBase, private readonly o: ClientOverlaysOptions) {
    this.lingerMs = o.lingerMs ?? LINGER_MS;
  }

  get size(): number { return this.base.size; }

  /** CLIENT's overlay (opened or created), or a throw-away one for null. Synchronous: resolution is. */
  acquire(client: string | null): { device: BlockDevice; release(): Maybe } {
    if (this.baseReleased) throw new Error(`export "${this.o.name}" is closed`);
    if (client === null) return this.throwAway();
    let e = this.clients.get(client);
    if (e === undefined) {
      e = this.openEntry(client);
      this.clients.set(client, e);
    }
    if (e.timer !== null) { clearTimeout(e.timer); e.timer = null; }
    if (e.device === null) e.device = this.openDevice(e.path); // the lock fd still holds the locks
    e.refs++;
    const entry = e;
    let done = false;
    return {
      device: e.device,
      release: () => {
        if (done) return;
        done = true;
        if (--entry.refs === 0) this.idle(client, entry);
      },
    };
  }

  private openEntry(client: string): ClientEntry {
    const path = clientOverlayPath(this.o.dir, this.o.name, client);
    if (!existsSync(path)) {
      createOverlayFile(path, this.base, { compat: this.o.compat });
      this.o.log(`created overlay ${path} for client "${client}"`);
    }
    const lockFd = openSync(path, "r+");
    try {
      lockImage(lockFd, path, RW_PERMS, RW_DENY);
      return { path, lockFd, device: this.openDevice(path), refs: 0, timer: null, closing: null };
    } catch (err) {
      closeSync(lockFd);
      throw err;
    }
  }

  private openDevice(path: string): BlockDevice {
    const dev = openImage(path, { readOnly: false, base: this.base, log: this.o.log, lock: false });
    touch(path);
    return dev;
  }

  /** The last connection left: flush now, close after the linger time unless someone came back. */
  private idle(client: string, e: ClientEntry): void {
    const dev = e.device!;
    const close = () => {
      e.timer = null;
      if (e.refs > 0 || e.device !== dev) return;
      // Flush while the device can still be taken back; close once it is clean (the close then
      // writes nothing, so a device reopened meanwhile reads what is on disk).
      settle(dev.flush?.(0)).then(() => {
        if (e.refs > 0 || e.device !== dev) return;
        e.device = null;
        const closing = settle(dev.close?.()).catch((err: Error) => this.o.log(`closing overlay ${e.path}: ${err.message}`));
        e.closing = closing;
        void closing.then(() => {
          if (e.closing === closing) e.closing = null;
          touch(e.path);
          this.dropEntry(client, e);
        });
      }, (err: Error) => this.o.log(`flushing overlay ${e.path}: ${err.message}`));
    };
    if (this.tableRefs === 0 || this.lingerMs === 0) close();
    else e.timer = setTimeout(close, this.lingerMs);
  }

  /** Forget a client whose device is closed and not reopened; give the locks back. */
  private dropEntry(client: string, e: ClientEntry): void {
    if (e.device !== null || e.refs > 0 || e.closing !== null || this.clients.get(client) !== e) return;
    this.clients.delete(client);
    closeSync(e.lockFd);
    this.maybeReleaseBase();
  }

  /** A throw-away overlay for one connection: created in DIR, unlinked at once, gone at release. */
  private throwAway(): { device: BlockDevice; release(): Maybe } {
    const path = join(this.o.dir, `.${this.o.name}.${process.pid}.${Math.random().toString(36).slice(2, 10)}.qcow2`);
    createOverlayFile(path, this.base, { compat: this.o.compat });
    let dev: BlockDevice;
    try {
      dev = openImage(path, { readOnly: false, base: this.base, log: this.o.log, lock: false });
    } finally {
      unlinkSync(path);
    }
    this.throwAways.add(dev);
    let done = false;
    return {
      device: dev,
      release: () => {
        if (done) return;
        done = true;
        // No flush: nothing of it survives the close.
        return settle(dev.close?.()).finally(() => { this.throwAways.delete(dev); this.maybeReleaseBase(); });
      },
    };
  }

  /** A reload kept the export: one more table refers to this manager. */
  retain(): void { this.tableRefs++; }

  /** A table let go of it; the last one closes idle overlays now and the base after the last client. */
  retire(): Maybe {
    if (--this.tableRefs > 0) return;
    for (const [client, e] of this.clients) {
      if (e.timer !== null && e.refs === 0) { clearTimeout(e.timer); e.timer = null; this.idle(client, e); }
    }
    this.maybeReleaseBase();
  }

  /** Shutdown: flush and close every overlay now, then the base. */
  async close(): Promise<void> {
    this.tableRefs = 0;
    for (const [client, e] of [...this.clients]) {
      if (e.timer !== null) clearTimeout(e.timer);
      e.timer = null;
      const dev = e.device;
      e.device = null;
      e.refs = 0;
      if (dev !== null) {
        try { await settle(dev.close?.()); } catch (err) { this.o.log(`closing overlay ${e.path}: ${(err as Error).message}`); }
      }
      if (e.closing !== null) await e.closing;
      e.closing = null;
      this.dropEntry(client, e);
    }
    for (const dev of [...this.throwAways]) {
      this.throwAways.delete(dev);
      try { await settle(dev.close?.()); } catch { /* discarded anyway */ }
    }
    this.maybeReleaseBase();
  }

  private maybeReleaseBase(): void {
    if (this.baseReleased || this.tableRefs > 0 || this.clients.size > 0 || this.throwAways.size > 0) return;
    this.baseReleased = true;
    void settle(this.base.release()).catch((err: Error) => this.o.log(`closing base: ${err.message}`));
  }

  /** Clients with an overlay open (connected or lingering), and their files' bytes on disk. */
  usage(): { client: string; bytes: number }[] {
    return [...this.clients].map(([client, e]) => ({ client, bytes: diskBytes(e.path) }));
  }
}

/**
 * Open the base of a per-client export (what FILE serves without an overlay: a raw file, or a CD's
 * cooked view) once, read-only, and a manager for its clients' overlays in `dir`.
 */
export async function openClientOverlays(e: { name: string; file: string; compat: boolean; overlay: { dir: string } },
  log: (msg: string) => void, remote?: RemoteSettings, lingerMs?: number): Promise<ClientOverlays> {
  const { base } = await openOverlayBase(e.file, { name: e.name, log, remote }); // name: a remote base's metrics label
  return new ClientOverlays(base, { name: e.name, dir: e.overlay.dir, compat: e.compat, log, lingerMs });
}

/** One per-client overlay file, as `bun-nbd overlay list DIR` shows it. */
export interface ClientOverlayFile {
  export: string;
  client: string;
  path: string;
  /** The virtual size (the base's), from the qcow2 header; null if the header cannot be read. */
  size: number | null;
  backing: string | null;
  /** Bytes the file takes on disk. */
  allocated: number;
  /** When a server last opened or closed it (its modification time). */
  lastUse: Date;
  /** A process (a server, QEMU) has it open for writing now. */
  inUse: boolean;
}

/** The per-client overlays (NAME@CLIENT.qcow2) in `dir`, by export then client. */
export function listClientOverlays(dir: string): ClientOverlayFile[] {
  const out: ClientOverlayFile[] = [];
  for (const f of readdirSync(dir).sort()) {
    const m = /^([^.][^@]*)@([A-Za-z0-9._-]{1,64})\.qcow2$/.exec(f);
    if (!m) continue;
    const path = join(dir, f);
    const st = statSync(path);
    if (!st.isFile()) continue;
    let size: number | null = null;
    let backing: string | null = null;
    let inUse = false;
    let fd = -1;
    try {
      fd = openSync(path, "r");
      const h = readHeader(fd, path);
      size = h.size;
      backing = h.backingName ?? null;
      // QEMU's convention (qcow2/lock.ts): a writer holds a shared lock on byte 100 + PERM_WRITE.
      inUse = ofdTestLock(fd, F_WRLCK, 100 + PERM_WRITE, 1) !== F_UNLCK;
    } catch { /* not a qcow2 we can read: listed with what stat says */ }
    finally { if (fd >= 0) closeSync(fd); }
    out.push({ export: m[1]!, client: m[2]!, path, size, backing, allocated: st.blocks * 512, lastUse: st.mtime, inUse });
  }
  return out;
}

function settle(r: Maybe | undefined): Promise<void> {
  return isPromise(r) ? (r as Promise<void>) : Promise.resolve();
}

function touch(path: string): void {
  const now = new Date();
  try { utimesSync(path, now, now); } catch { /* best effort: "last use" in overlay list */ }
}

function diskBytes(path: string): number {
  try { return statSync(path).blocks * 512; } catch { return 0; }
}
