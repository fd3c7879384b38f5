// A connection's transmission phase on a thread of its own (a Bun Worker; thread-pool.ts hands it
// over once the handshake chose an export whose stack it can rebuild: a raw file, or a partition or
// ISO view of one). The thread sleeps in recv(2) until requests
// come, runs the same Transmission as the event loop over a BlockingTransport and a RawFile that
// shares the event loop's descriptor, and sends the replies of each receive with one send. So a
// request costs one recv, the file call and one send, with no event-loop turn between them, and a
// write that the kernel throttles stalls only its own connection.
import { isMainThread } from "node:worker_threads";
import { CheckedExport } from "../devices/checked.ts";
import { fromRecipe } from "../devices/recipe.ts";
import type { DeviceRecipe } from "../devices/types.ts";
import { closeSocket, recvWait } from "../sys/libc.ts";
import { BlockingTransport } from "./blocking-transport.ts";
import { ExtendedTransmission } from "./extended.ts";
import type { ClientIdentity } from "./identity.ts";
import type { Logger, LogFields } from "./log.ts";
import { ExportStats } from "./metrics.ts";
import { Transmission } from "./transmission.ts";
import type { ExportTable, Negotiated } from "./types.ts";

/** Everything the thread needs, as plain data (it is copied to the thread). */
export interface ThreadJob {
  /** The socket: a descriptor of its own, in blocking mode (libc adoptSocket). */
  socket: number;
  /** The export's device stack, over files the event loop opened (BlockDevice.recipe). */
  device: DeviceRecipe;
  name: string;
  description: string;
  /** The export is served read-only (whatever the file allows). */
  readOnly: boolean;
  structured: boolean;
  extended: boolean;
  maxPayload: number;
  /** The meta contexts the client selected, by name, and their ids. */
  contexts: string[];
  contextIds: number[];
  /** The session's number, peer and identity, for log lines. */
  id: number;
  peer: string;
  client: ClientIdentity;
  /** Bytes that arrived after the handshake's last option (pipelined requests). */
  initial: Uint8Array;
  /** One Int32 shared by every connection thread: how many send file ranges (BlockingTransport). */
  readers: SharedArrayBuffer;
  /** With metrics on: this connection's block of the export's counters (ExportStats.attach). */
  stats: SharedArrayBuffer | null;
  debug: boolean;
}

/** Messages to the event loop: a log line, or the end of the connection (the socket is closed). */
export type ThreadMessage =
  | { kind: "log"; level: "debug" | "info" | "warn" | "error"; msg: string; fields?: LogFields }
  | { kind: "done" };

/** The receive buffer; a new one is taken when a request still holds a view of the old one. */
const RECEIVE = 256 * 1024;

declare const self: Worker;

function post(m: ThreadMessage): void {
  self.postMessage(m);
}

function threadLogger(debug: boolean): Logger {
  return {
    debugEnabled: debug,
    debug: (msg, fields) => { if (debug) post({ kind: "log", level: "debug", msg, fields }); },
    info: (msg, fields) => post({ kind: "log", level: "info", msg, fields }),
    warn: (msg, fields) => post({ kind: "log", level: "warn", msg, fields }),
    error: (msg, fields) => post({ kind: "log", level: "error", msg, fields }),
  };
}

/** Let promise callbacks and timers run (a request a device answered asynchronously). */
const turn = (): Promise<void> => new Promise((r) => setImmediate(r));

/** Serve one connection until it ends; the socket is closed on return. */
export async function serveConnection(job: ThreadJob, log: Logger): Promise<void> {
  const t = new BlockingTransport(job.socket, new Int32Array(job.readers));
  try {
    const device = fromRecipe(job.device, (m) => log.warn(m));
    const exp = new CheckedExport({ name: job.name, description: job.description, device }, { readOnly: job.readOnly });
    const contexts = job.contexts.map((name) => {
      const c = exp.contexts.find((x) => x.name === name);
      if (!c) throw new Error(`meta context ${name} is not offered by ${job.name}`);
      return c;
    });
    const n: Negotiated = {
      exp, lease: { exp, stats: job.stats ? new ExportStats(job.name, job.stats) : null, release() {} }, structured: job.structured, extended: job.extended,
      maxPayload: job.maxPayload, contexts, contextIds: job.contextIds,
    };
    const link = {
      id: job.id, peer: job.peer, client: job.client, closed: false,
      close() { this.closed = true; t.end(); },
      protocolError(code: string, message: string) {
        log.warn(`[${job.id}] ${job.peer}: protocol error ${code}: ${message}; closing the connection`);
        this.closed = true;
        t.destroy();
      },
    };
    // Shutdown reaches the thread as the end of the stream (shutdownRead), not as a flag.
    const table: ExportTable = { resolve: () => undefined, list: () => [], shuttingDown: () => false };
    const tx = job.extended ? new ExtendedTransmission(link, t, table, log, n, false) : new Transmission(link, t, table, log, n, false);
    // Send what the receive produced; wait (letting promise callbacks run) only while a device
    // answers later: the hot path does not await what completed synchronously.
    const sent = (): boolean => {
      t.flush();
      tx.onDrain();
      return tx.requestsInFlight === 0 || t.broken;
    };
    const settle = async () => {
      while (!sent()) await turn();
    };
    if (job.initial.length > 0) tx.onData(job.initial);
    await settle();
    let buf = Buffer.allocUnsafe(RECEIVE);
    while (!link.closed && !t.ending && !t.broken) {
      if (t.paused) {
        // Paused with nothing in flight and not disconnecting cannot last: onDrain resumes it.
        await settle();
        if (t.paused) await turn();
        continue;
      }
      const got = recvWait(job.socket, buf, 0, buf.length);
      if (got <= 0) {
        if (tx.requestsInFlight > 0) log.info(`[${job.id}] ${job.peer}: connection closed with ${tx.requestsInFlight} request(s) in flight`);
        break;
      }
      tx.onData(got === buf.length ? buf : buf.subarray(0, got));
      if (sent() && !t.paused) continue;
      // A request answered later, or a backlog, holds views of this buffer: receive into another.
      buf = Buffer.allocUnsafe(RECEIVE);
      await settle();
    }
    await settle();
  } catch (e) {
    log.error(`[${job.id}] internal error, closing the connection: ${(e as Error).stack ?? e}`);
  } finally {
    t.flush();
    t.closed();
    closeSocket(job.socket);
  }
}

// As a worker: one job at a time, then "done" (the pool may give this thread the next one).
if (!isMainThread) {
  self.onmessage = (ev: MessageEvent<ThreadJob>) => {
    const job = ev.data;
    void serveConnection(job, threadLogger(job.debug)).finally(() => post({ kind: "done" }));
  };
}
