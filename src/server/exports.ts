// Export resolution: `(export name, client identity) -> device stack`, asked by the handshake at
// GO/INFO/EXPORT_NAME/meta contexts, and the LIST reply, both from one immutable generation of the
// export table. A reload builds a new generation and swaps it in one step; sessions hold leases on
// the stacks they opened with, and a stack closes when its last holder (table or session) lets go.
import { CheckedExport } from "../devices/checked.ts";
import { isPromise, type BlockDevice, type ExportSpec, type Maybe } from "../devices/types.ts";
import { CLIENT_NAME } from "../config/parse.ts";
import { ALLOW_ALL, AllowList } from "./access.ts";
import { clientFields, describeClient, type ClientIdentity } from "./identity.ts";
import type { Logger } from "./log.ts";
import type { ExportStats, OverlayUsage } from "./metrics.ts";
import type { Report } from "../inspect/index.ts";

/** An export a session holds: the checked stack, its counters, and how to give it back (once). */
export interface ExportLease {
  readonly exp: CheckedExport;
  readonly stats: ExportStats | null;
  release(): void;
}

/** A device stack (one config entry may open several exports: a CD's views) with a reference count. */
export class SharedStack {
  private refs = 1;
  private closing: Promise<void> | null = null;
  /** `reports`: what inspecting each export found (devices/partition-exports.ts), for the banner. */
  constructor(readonly specs: readonly ExportSpec[], private readonly log: Logger, readonly reports: ReadonlyMap<string, Report> = new Map()) {}

  acquire(): this {
    this.refs++;
    return this;
  }

  /** Give a reference back; the last one flushes and closes every device. */
  release(): Promise<void> | null {
    if (--this.refs > 0 || this.closing) return this.closing;
    return (this.closing = closeDevices(this.specs, this.log));
  }

  /** Close now whatever still holds it (server shutdown after the grace period). */
  forceClose(): Promise<void> {
    this.refs = 0;
    return (this.closing ??= closeDevices(this.specs, this.log));
  }
}

async function closeDevices(specs: readonly ExportSpec[], log: Logger): Promise<void> {
  for (const s of specs) {
    // a failed flush (storage that failed) must not keep the device's files open and locked
    try {
      await settle(s.device.flush?.(0));
    } catch (e) {
      log.error(`flushing export "${s.name}" at close: ${(e as Error).message}`, { export: s.name });
    }
    try {
      await settle(s.device.close?.());
    } catch (e) {
      log.error(`closing export "${s.name}": ${(e as Error).message}`, { export: s.name });
    }
  }
}

const settle = (r: Maybe | undefined) => (isPromise(r) ? r : undefined);

/** What the table needs of a per-client overlay manager (src/devices/per-client.ts). */
export interface ClientOverlayManager {
  /** The base's size, which every client's overlay has. */
  readonly size: number;
  /** Open (or create) CLIENT's overlay, or a throw-away one for `null`; shared by that client's connections. */
  acquire(client: string | null): { device: BlockDevice; release(): Maybe };
  /** A new table generation refers to it too (a reload that kept the export). */
  retain(): void;
  /** A table let go: once no table refers to it, close the base when the last client is gone. */
  retire(): Maybe;
  /** Close everything now (shutdown). */
  close(): Maybe;
  usage(): { client: string; bytes: number }[];
}

interface RowBase {
  readonly name: string;
  readonly description: string;
  readonly allow: AllowList;
  readonly stats: ExportStats | null;
}
export interface StaticRow extends RowBase { readonly kind: "static"; readonly exp: CheckedExport; readonly stack: SharedStack; readonly overlayPath: string | null }
export interface PerClientRow extends RowBase {
  readonly kind: "per-client";
  readonly manager: ClientOverlayManager;
  /**
   * "tls": CLIENT must be the connection's TLS identity (the export's client-name is "tls-identity"
   * and the server has TLS on), so a plain connection can only get a throw-away overlay; "none":
   * any well-formed CLIENT (client-name = "any", or no TLS on this server).
   */
  readonly identityCheck: "tls" | "none";
  readonly readOnly: boolean;
  readonly dir: string;
}
export type Row = StaticRow | PerClientRow;

/** One generation of the export table: immutable once built. The first row is the default export. */
export class Generation {
  readonly rows: readonly Row[];
  private readonly byName = new Map<string, Row>();

  constructor(rows: Row[]) {
    if (rows.length === 0) throw new Error("no exports to serve");
    this.rows = Object.freeze(rows.slice());
    for (const r of rows) {
      if (this.byName.has(r.name)) throw new Error(`two exports are named "${r.name}": use --name or rename a file`);
      this.byName.set(r.name, r);
    }
  }

  get(name: string): Row | undefined {
    return this.byName.get(name) ?? (name === "" ? this.rows[0] : undefined);
  }

  /** Let go of the table's references (stacks still leased close when their sessions end). */
  retire(): Promise<void> {
    const done: Promise<unknown>[] = [];
    const seen = new Set<object>();
    for (const r of this.rows) {
      const owner = r.kind === "static" ? r.stack : r.manager;
      if (seen.has(owner)) continue;
      seen.add(owner);
      const p = r.kind === "static" ? r.stack.release() : r.manager.retire();
      if (isPromise(p)) done.push(p);
    }
    return Promise.all(done).then(() => {});
  }
}

export class ExportRegistry {
  private gen: Generation;
  /** Every stack and manager ever handed out and not yet closed, for shutdown. */
  private readonly live = new Set<SharedStack | ClientOverlayManager>();

  constructor(first: Generation, private readonly log: Logger) {
    this.gen = first;
    this.track(first);
  }

  get current(): Generation { return this.gen; }

  /** Swap in a new generation; the old one is retired (its leased stacks live on with their sessions). */
  swap(next: Generation): Promise<void> {
    const old = this.gen;
    this.gen = next;
    this.track(next);
    return old.retire();
  }

  private track(g: Generation): void {
    for (const r of g.rows) this.live.add(r.kind === "static" ? r.stack : r.manager);
  }

  /** Exports a LIST shows `client`: those its address may use. */
  list(client: ClientIdentity): readonly { name: string; description: string }[] {
    return this.gen.rows.filter((r) => r.allow.allows(client));
  }

  /**
   * `(name, client) -> lease`, or undefined (the handshake answers ERR_UNKNOWN) with a log line
   * saying why when the name looked like a real request: refused by `allow`, a bad CLIENT part, a
   * CLIENT that is not the TLS identity, or an overlay that would not open.
   */
  resolve(name: string, client: ClientIdentity): ExportLease | undefined {
    const g = this.gen;
    const row = g.get(name);
    if (row !== undefined) {
      if (!this.allowed(row, name, client)) return undefined;
      if (row.kind === "static") {
        const stack = row.stack.acquire();
        return lease(row.exp, row.stats, () => void stack.release());
      }
      return this.perClient(row, name, null, client);
    }
    const at = name.lastIndexOf("@");
    if (at <= 0) return undefined;
    const base = g.get(name.slice(0, at));
    if (base === undefined || base.kind !== "per-client") return undefined;
    if (!this.allowed(base, name, client)) return undefined;
    return this.perClient(base, name, name.slice(at + 1), client);
  }

  private allowed(row: Row, name: string, client: ClientIdentity): boolean {
    if (row.allow.allows(client)) return true;
    this.log.warn(`${describeClient(client)}: export "${name}" refused: address not in its allow list`, { ...clientFields(client), export: name });
    return false;
  }

  private perClient(row: PerClientRow, name: string, who: string | null, client: ClientIdentity): ExportLease | undefined {
    const fields = { ...clientFields(client), export: name };
    if (who !== null) {
      const problem = clientNameProblem(who);
      if (problem !== null) {
        this.log.warn(`${describeClient(client)}: export "${name}" refused: ${problem}`, fields);
        return undefined;
      }
      if (row.identityCheck === "tls" && client.tls?.name !== who) {
        const why = client.tls === null ? "naming a client needs a TLS connection as that client" : `CLIENT "${who}" is not this connection's TLS identity "${client.tls.name ?? "(no certificate)"}"`;
        this.log.warn(`${describeClient(client)}: export "${name}" refused: ${why}`, fields);
        return undefined;
      }
    }
    let opened;
    try {
      opened = row.manager.acquire(who);
    } catch (e) {
      this.log.error(`${describeClient(client)}: export "${name}": cannot open the overlay: ${(e as Error).message}`, fields);
      return undefined;
    }
    let exp: CheckedExport;
    try {
      exp = new CheckedExport({ name, description: row.description, device: opened.device }, { readOnly: row.readOnly });
    } catch (e) {
      void opened.release();
      throw e;
    }
    return lease(exp, row.stats, () => void opened.release());
  }

  /** Overlay files and their sizes, for metrics. */
  overlays(sizeOf: (path: string) => number): OverlayUsage[] {
    const out: OverlayUsage[] = [];
    for (const r of this.gen.rows) {
      if (r.kind === "per-client") for (const u of r.manager.usage()) out.push({ export: r.name, client: u.client, bytes: u.bytes });
      else if (r.overlayPath !== null) out.push({ export: r.name, client: "", bytes: sizeOf(r.overlayPath) });
    }
    return out;
  }

  /** Shutdown: retire the table and close whatever sessions still held. */
  async close(): Promise<void> {
    await this.gen.retire();
    for (const x of this.live) {
      const r = x instanceof SharedStack ? x.forceClose() : x.close();
      if (isPromise(r)) await r;
    }
    this.live.clear();
  }
}

/** Why CLIENT (the part after "@") cannot name an overlay file, or null if it can. */
export function clientNameProblem(who: string): string | null {
  if (who === "") return "empty client name after \"@\"";
  if (!CLIENT_NAME.test(who)) return `client name "${who.slice(0, 80)}${who.length > 80 ? "..." : ""}" must be 1-64 of A-Z a-z 0-9 . _ -`;
  if (/^\.+$/.test(who)) return `client name "${who}" is reserved`;
  return null;
}

function lease(exp: CheckedExport, stats: ExportStats | null, release: () => void): ExportLease {
  let done = false;
  return { exp, stats, release: () => { if (!done) { done = true; release(); } } };
}

/** Rows for a plain list of specs (the programmatic NbdServer API): one stack, no access rules. */
export function staticRows(specs: ExportSpec[], o: { readOnly?: boolean; log: Logger; stats?: (name: string) => ExportStats | null }): Row[] {
  const stack = new SharedStack(specs, o.log);
  return specs.map((s) => ({
    kind: "static" as const, name: s.name, description: s.description ?? "", allow: ALLOW_ALL,
    exp: new CheckedExport(s, { readOnly: o.readOnly }), stack, overlayPath: null, stats: o.stats?.(s.name) ?? null,
  }));
}
