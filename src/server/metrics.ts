// Metrics: per-export counters bumped on the hot path (plain numbers and preallocated typed arrays,
// nothing allocated per request), rendered in the Prometheus text format only when scraped, and
// the loopback HTTP endpoint (Bun.serve) that serves /metrics and /healthz.
import type { Server } from "bun";
import { commandName, errnoName } from "../protocol/constants.ts";
import type { Logger } from "./log.ts";

/** Upper bounds (seconds) of the request latency histogram's buckets; +Inf is implicit. */
export const LATENCY_BUCKETS = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10];
const COMMANDS = 8; // NBD_CMD_READ .. NBD_CMD_BLOCK_STATUS (0..7); anything else counts as "other"
const READ = 0;
const WRITE = 1;

// Where each counter lives in an ExportStats' cells (one Float64Array, so that a connection on a
// thread of its own can count into a block of shared memory the event loop reads).
const BYTES_READ = 0;
const BYTES_WRITTEN = 1;
const LATENCY_SUM = 2;
const LATENCY_COUNT = 3;
const REQUESTS = 4;
const ERRORS = REQUESTS + COMMANDS + 1;
const LATENCY = ERRORS + 128;
const CELLS = LATENCY + LATENCY_BUCKETS.length + 1;

/**
 * One export's counters. Reused across reloads (counters only go up), shared by all its sessions.
 * A connection served on a thread counts into a block of its own (attach()), written by that
 * thread alone, read by the event loop at a scrape and added in when the connection ends.
 */
export class ExportStats {
  /** Connections in the transmission phase on this export now (counted on the event loop). */
  connections = 0;
  private readonly cells: Float64Array;
  /** Requests by command (the last: any other command). */
  readonly requests: Float64Array;
  /** Failed requests by NBD errno value (all below 128). */
  readonly errors: Float64Array;
  readonly latency: Float64Array;
  /** The blocks of connections on threads now (see attach), by their buffers. */
  private readonly threads = new Map<SharedArrayBuffer, Float64Array>();

  /** `shared`: count into this block (a thread's, from attach()) instead of memory of its own. */
  constructor(readonly name: string, shared?: SharedArrayBuffer) {
    this.cells = shared ? new Float64Array(shared) : new Float64Array(CELLS);
    this.requests = this.cells.subarray(REQUESTS, ERRORS);
    this.errors = this.cells.subarray(ERRORS, LATENCY);
    this.latency = this.cells.subarray(LATENCY, CELLS);
  }

  get bytesRead(): number { return this.cells[BYTES_READ]!; }
  get bytesWritten(): number { return this.cells[BYTES_WRITTEN]!; }
  get latencySum(): number { return this.cells[LATENCY_SUM]!; }
  get latencyCount(): number { return this.cells[LATENCY_COUNT]!; }

  /** A request finished (errno 0: success). `start` is performance.now() when it was dispatched. */
  record(type: number, length: number, errno: number, start: number): void {
    const dt = (performance.now() - start) / 1000;
    const c = this.cells;
    c[REQUESTS + (type < COMMANDS ? type : COMMANDS)]!++;
    if (errno !== 0) c[ERRORS + (errno & 127)]!++;
    else if (type === READ) c[BYTES_READ] = c[BYTES_READ]! + length;
    else if (type === WRITE) c[BYTES_WRITTEN] = c[BYTES_WRITTEN]! + length;
    const b = LATENCY_BUCKETS;
    let i = 0;
    while (i < b.length && dt > b[i]!) i++;
    c[LATENCY + i]!++;
    c[LATENCY_SUM] = c[LATENCY_SUM]! + dt;
    c[LATENCY_COUNT]!++;
  }

  /** A block for a connection about to run on a thread, which counts into it (new ExportStats(name, block)). */
  attach(): SharedArrayBuffer {
    const block = new SharedArrayBuffer(CELLS * 8);
    this.threads.set(block, new Float64Array(block));
    return block;
  }

  /** That connection ended: its counts become this export's own. */
  detach(block: SharedArrayBuffer): void {
    const t = this.threads.get(block);
    if (t === undefined) return;
    this.threads.delete(block);
    addInto(this.cells, t);
  }

  /** The counters as of now, the blocks of connections on threads included (for a scrape). */
  snapshot(): ExportStats {
    if (this.threads.size === 0) return this;
    const s = new ExportStats(this.name);
    s.connections = this.connections;
    addInto(s.cells, this.cells);
    for (const t of this.threads.values()) addInto(s.cells, t);
    return s;
  }
}

function addInto(to: Float64Array, from: Float64Array): void {
  for (let i = 0; i < CELLS; i++) to[i] = to[i]! + from[i]!;
}

/** One overlay's size on disk, for bun_nbd_overlay_allocated_bytes. */
export interface OverlayUsage {
  export: string;
  /** The per-client overlay's CLIENT, or "" for an export's single overlay. */
  client: string;
  bytes: number;
}

/**
 * A family of series a device layer keeps itself (a remote image's GETs and cache hits), rendered
 * as given: the server learns its name, help text, labels and values, nothing about the device.
 */
export interface MetricFamily {
  name: string;
  type: "counter" | "gauge";
  help: string;
  samples: readonly { labels: Readonly<Record<string, string>>; value: number }[];
}

/** What a scrape reads. */
export interface MetricsSource {
  stats(): Iterable<ExportStats>;
  /** Connections open now (all phases). */
  connections(): number;
  overlays(): OverlayUsage[];
  /** Families the device stacks offer (cli/serve.ts wires them in), after the server's own. */
  families?(): Iterable<MetricFamily>;
}

const esc = (s: string) => s.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");
const num = (n: number) => (Number.isFinite(n) ? String(n) : n > 0 ? "+Inf" : "-Inf");

/** The Prometheus text exposition (version 0.0.4) of everything `src` knows. */
export function renderMetrics(src: MetricsSource): string {
  const out: string[] = [];
  const family = (name: string, type: string, help: string) => out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
  const all = [...src.stats()].map((s) => s.snapshot());
  family("bun_nbd_connections", "gauge", "Client connections open now, in any phase.");
  out.push(`bun_nbd_connections ${src.connections()}`);
  family("bun_nbd_export_connections", "gauge", "Connections in the transmission phase, by export.");
  for (const s of all) out.push(`bun_nbd_export_connections{export="${esc(s.name)}"} ${s.connections}`);
  family("bun_nbd_read_bytes_total", "counter", "Bytes returned by successful READ requests.");
  for (const s of all) out.push(`bun_nbd_read_bytes_total{export="${esc(s.name)}"} ${num(s.bytesRead)}`);
  family("bun_nbd_written_bytes_total", "counter", "Bytes stored by successful WRITE requests.");
  for (const s of all) out.push(`bun_nbd_written_bytes_total{export="${esc(s.name)}"} ${num(s.bytesWritten)}`);
  family("bun_nbd_requests_total", "counter", "Requests answered, by command.");
  for (const s of all) {
    for (let c = 0; c <= COMMANDS; c++) {
      const cmd = c === COMMANDS ? "other" : commandName(c).toLowerCase();
      out.push(`bun_nbd_requests_total{export="${esc(s.name)}",command="${cmd}"} ${num(s.requests[c]!)}`);
    }
  }
  family("bun_nbd_request_errors_total", "counter", "Requests answered with an error, by NBD errno.");
  for (const s of all) {
    for (let e = 1; e < s.errors.length; e++) {
      if (s.errors[e] === 0) continue;
      out.push(`bun_nbd_request_errors_total{export="${esc(s.name)}",errno="${errnoName(e)}"} ${num(s.errors[e]!)}`);
    }
  }
  family("bun_nbd_request_duration_seconds", "histogram", "Time from receiving a request to queueing its reply.");
  for (const s of all) {
    const l = `export="${esc(s.name)}"`;
    let cum = 0;
    LATENCY_BUCKETS.forEach((b, i) => {
      cum += s.latency[i]!;
      out.push(`bun_nbd_request_duration_seconds_bucket{${l},le="${b}"} ${cum}`);
    });
    cum += s.latency[LATENCY_BUCKETS.length]!;
    out.push(`bun_nbd_request_duration_seconds_bucket{${l},le="+Inf"} ${cum}`);
    out.push(`bun_nbd_request_duration_seconds_sum{${l}} ${num(s.latencySum)}`);
    out.push(`bun_nbd_request_duration_seconds_count{${l}} ${s.latencyCount}`);
  }
  family("bun_nbd_overlay_allocated_bytes", "gauge", "Bytes an overlay file takes on disk, by export and per-client overlay.");
  for (const o of src.overlays()) out.push(`bun_nbd_overlay_allocated_bytes{export="${esc(o.export)}",client="${esc(o.client)}"} ${o.bytes}`);
  for (const f of src.families?.() ?? []) {
    family(f.name, f.type, f.help);
    for (const x of f.samples) {
      const labels = Object.entries(x.labels).map(([k, v]) => `${k}="${esc(v)}"`).join(",");
      out.push(`${f.name}${labels ? `{${labels}}` : ""} ${num(x.value)}`);
    }
  }
  return out.join("\n") + "\n";
}

export interface MetricsEndpoint {
  readonly port: number;
  stop(): void;
}

/**
 * Several processes' renderings as one (serve --workers): every sample with the same name and
 * labels is summed (counters, gauges of connections and histogram buckets all add up); comment
 * lines come from the first, and a series only a later one has goes after its family's last line.
 */
export function mergeMetrics(texts: readonly string[]): string {
  const out = texts[0]!.trimEnd().split("\n");
  const at = new Map<string, number>();
  out.forEach((l, i) => { if (l && !l.startsWith("#")) at.set(seriesKey(l), i); });
  for (const t of texts.slice(1)) {
    for (const l of t.trimEnd().split("\n")) {
      if (!l || l.startsWith("#")) continue;
      const key = seriesKey(l);
      const i = at.get(key);
      if (i !== undefined) {
        out[i] = `${key} ${sampleSum(sampleValue(out[i]!), sampleValue(l))}`;
        continue;
      }
      const family = familyOf(key);
      let last = -1;
      out.forEach((x, j) => { if (!x.startsWith("#") && familyOf(x) === family) last = j; });
      const pos = last >= 0 ? last + 1 : out.length;
      out.splice(pos, 0, l);
      for (const [k, j] of at) if (j >= pos) at.set(k, j + 1);
      at.set(key, pos);
    }
  }
  return out.join("\n") + "\n";
}

const seriesKey = (line: string) => line.slice(0, line.lastIndexOf(" "));
/** A sample's metric family: its name without labels, and without a histogram's _bucket/_sum/_count. */
const familyOf = (line: string) => line.replace(/[{ ].*$/, "").replace(/_(bucket|sum|count)$/, "");
const sampleValue = (line: string) => Number(line.slice(line.lastIndexOf(" ") + 1));
const sampleSum = (a: number, b: number) => { const s = a + b; return Number.isInteger(s) ? String(s) : String(Number(s.toPrecision(12))); };

/**
 * Serve /metrics and /healthz on `host:port` (port 0 picks one). `others`: the renderings of the
 * other processes of this server (serve --workers), summed into this one's.
 */
export function serveMetrics(host: string, port: number, src: MetricsSource, log: Logger, others?: () => Promise<string[]>): MetricsEndpoint {
  let server: Server<undefined>;
  server = Bun.serve({
    hostname: host,
    port,
    fetch(req) {
      const path = new URL(req.url).pathname;
      if (path === "/metrics") {
        const headers = { "content-type": "text/plain; version=0.0.4; charset=utf-8" };
        if (others === undefined) return new Response(renderMetrics(src), { headers });
        const mine = renderMetrics(src);
        return others().then((rest) => new Response(mergeMetrics([mine, ...rest]), { headers }));
      }
      if (path === "/healthz") return new Response("ok\n", { headers: { "content-type": "text/plain" } });
      return new Response("not found: try /metrics or /healthz\n", { status: 404 });
    },
    error(e) {
      log.error(`metrics endpoint: ${e.message}`);
      return new Response("internal error\n", { status: 500 });
    },
  });
  return { port: server.port ?? port, stop: () => { void server.stop(true); } };
}
