// From configured exports (plain data) to a live export table, and reload: every generation is
// built completely before it is swapped in, an export whose stack-defining keys did not change
// keeps its open stack (and its clients' overlays), and a build that fails leaves the running
// table untouched. Opening the stacks is src/devices' business; this file only decides what to open.
import type { ExportConfig, TlsMode } from "../config/types.ts";
import { openExports } from "../devices/open.ts";
import { describeExports } from "../devices/partition-exports.ts";
import { AllowList } from "./access.ts";
import { ExportRegistry, Generation, SharedStack, type ClientOverlayManager, type Row } from "./exports.ts";
import type { Logger } from "./log.ts";
import { ExportStats } from "./metrics.ts";
import { CheckedExport } from "../devices/checked.ts";
import type { RemoteSettings } from "../devices/remote/index.ts";

/** Opens a per-client export's manager (src/devices/per-client.ts), injected so tests and the CLI choose. */
export type OpenPerClient = (e: ExportConfig & { overlay: { kind: "per-client"; dir: string } }, log: (msg: string) => void, remote?: RemoteSettings) => Promise<ClientOverlayManager>;

export interface ServiceOptions {
  /** The server-wide read-only setting (on top of each export's own). */
  readOnly: boolean;
  /** The server's TLS mode: with TLS on, per-client names are bound to TLS identities. */
  tls: TlsMode;
  log: Logger;
  /** Keep per-export counters (metrics on). */
  metrics: boolean;
  openPerClient?: OpenPerClient;
  /** How remote bases (http(s)://, s3:// files) are read: cache, block size, S3 endpoint. */
  remote?: RemoteSettings;
}

type Source = { kind: "static"; stack: SharedStack } | { kind: "per-client"; manager: ClientOverlayManager };

export interface ReloadSummary { added: string[]; removed: string[]; changed: string[]; unchanged: string[] }

export class ExportService {
  private readonly stats = new Map<string, ExportStats>();
  /** Stack key -> what the current generation opened for it. */
  private sources = new Map<string, Source>();
  private configs: readonly ExportConfig[] = [];
  private registry: ExportRegistry | null = null;
  private reloading: Promise<unknown> = Promise.resolve();

  constructor(private readonly o: ServiceOptions) {}

  /** Open every export; throws (with nothing left open) if one fails. */
  async start(exports: readonly ExportConfig[]): Promise<ExportRegistry> {
    const { gen, sources } = await this.build(exports, new Map());
    this.registry = new ExportRegistry(gen, this.o.log);
    this.sources = sources;
    this.configs = exports;
    return this.registry;
  }

  /** Every export's counters (for metrics). */
  allStats(): Iterable<ExportStats> {
    return this.stats.values();
  }

  /**
   * Build a generation from `exports` and swap it in. Throws if it cannot be built (the running
   * table stays as it was). Reloads run one at a time.
   */
  reload(exports: readonly ExportConfig[]): Promise<ReloadSummary> {
    const run = this.reloading.then(() => this.doReload(exports));
    this.reloading = run.catch(() => {});
    return run;
  }

  private async doReload(exports: readonly ExportConfig[]): Promise<ReloadSummary> {
    const reg = this.registry;
    if (reg === null) throw new Error("reload before start");
    const { gen, sources } = await this.build(exports, this.sources);
    const before = new Map(this.configs.map((e) => [e.name, e]));
    const summary: ReloadSummary = { added: [], removed: [], changed: [], unchanged: [] };
    for (const e of exports) {
      const old = before.get(e.name);
      if (old === undefined) summary.added.push(e.name);
      else if (JSON.stringify(old) === JSON.stringify({ ...e, source: old.source })) summary.unchanged.push(e.name);
      else summary.changed.push(e.name);
    }
    const now = new Set(exports.map((e) => e.name));
    for (const e of this.configs) if (!now.has(e.name)) summary.removed.push(e.name);
    this.sources = sources;
    this.configs = exports;
    await reg.swap(gen);
    return summary;
  }

  private statsFor(name: string): ExportStats | null {
    if (!this.o.metrics) return null;
    let s = this.stats.get(name);
    if (s === undefined) this.stats.set(name, (s = new ExportStats(name)));
    return s;
  }

  /** Open (or take over from `current`) every export's stack; on failure give back what was taken. */
  private async build(exports: readonly ExportConfig[], current: Map<string, Source>): Promise<{ gen: Generation; sources: Map<string, Source> }> {
    const sources = new Map<string, Source>();
    const rows: Row[] = [];
    try {
      for (const e of exports) {
        const key = stackKey(e, this.o.readOnly);
        let src = sources.get(key);
        if (src === undefined) {
          const old = current.get(key);
          if (old !== undefined) {
            if (old.kind === "static") old.stack.acquire();
            else old.manager.retain();
            src = old;
          } else {
            src = await this.open(e);
          }
          sources.set(key, src);
        }
        rows.push(...this.rows(e, src));
      }
      return { gen: new Generation(rows), sources };
    } catch (e) {
      for (const s of sources.values()) await (s.kind === "static" ? s.stack.release() : s.manager.retire());
      throw e;
    }
  }

  private async open(e: ExportConfig): Promise<Source> {
    const readOnly = e.readOnly || this.o.readOnly;
    const info = (m: string) => this.o.log.info(m, { export: e.name });
    const ov = e.overlay;
    if (ov.kind === "per-client") {
      if (!this.o.openPerClient) throw new Error(`${e.source}: export "${e.name}": per-client overlays are not available here`);
      return { kind: "per-client", manager: await this.o.openPerClient({ ...e, overlay: ov }, info, this.o.remote) };
    }
    const warn = (m: string) => this.o.log.warn(m, { export: e.name });
    let specs;
    try {
      specs = await openExports([e.file], {
        name: e.name, readOnly, compat: e.compat, log: warn, info,
        overlay: ov.kind === "file" ? ov.path : undefined, snapshot: ov.kind === "snapshot", remote: this.o.remote,
      });
    } catch (err) {
      throw new Error(e.source === "command line" ? (err as Error).message : `${e.source}: export "${e.name}": ${(err as Error).message}`);
    }
    try {
      // what each export holds (for descriptions), and its partitions as NAME/pN exports
      const d = await describeExports(specs, { partitions: e.partitions, log: warn });
      return { kind: "static", stack: new SharedStack(d.specs, this.o.log, d.reports) };
    } catch (err) {
      for (const s of specs) await s.device.close?.();
      throw err;
    }
  }

  private rows(e: ExportConfig, src: Source): Row[] {
    const allow = new AllowList(e.allow);
    const readOnly = e.readOnly || this.o.readOnly;
    if (src.kind === "per-client") {
      const dir = e.overlay.kind === "per-client" ? e.overlay.dir : "";
      return [{
        kind: "per-client", name: e.name, description: e.description ?? `${e.file} with an overlay per client in ${dir}`,
        allow, stats: this.statsFor(e.name), manager: src.manager, readOnly, dir,
        identityCheck: e.clientName === "tls-identity" && this.o.tls !== "off" ? "tls" : "none",
      }];
    }
    const overlayPath = e.overlay.kind === "file" ? e.overlay.path : null;
    return src.stack.specs.map((s) => {
      const description = s.name === e.name && e.description !== null ? e.description : s.description ?? "";
      return {
        kind: "static" as const, name: s.name, description, allow, stats: this.statsFor(s.name), stack: src.stack,
        exp: new CheckedExport({ ...s, description }, { readOnly }), overlayPath,
      };
    });
  }
}

/** What decides an export's stack: a change here reopens it; description and allow apply without. */
function stackKey(e: ExportConfig, serverReadOnly: boolean): string {
  return JSON.stringify([e.name, e.file, e.readOnly || serverReadOnly, e.overlay, e.compat, e.partitions]);
}
