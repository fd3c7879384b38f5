// Connections on threads of their own (serve --threads N): once the handshake chose an export
// whose stack a thread can rebuild (BlockDevice.recipe: raw files, partition and ISO views, a
// CD's cooked track), the event loop hands the connection to a thread (connection-thread.ts) that
// serves its requests with blocking calls, as nbdkit's threads and nbd-server's processes do. Up
// to N connections at once; the rest stay on the event loop, as do TLS connections and every
// other export. KEEP_IDLE threads are started ahead and wait for the next connection; the others
// end with theirs.
import type { ThreadJob, ThreadMessage } from "./connection-thread.ts";
import type { Logger } from "./log.ts";
import { closeSocket, shutdownRead } from "../sys/libc.ts";

export type { ThreadJob } from "./connection-thread.ts";

/**
 * Threads kept waiting for a connection (started ahead by prestart, or left by one that ended).
 * Starting one takes ~20-40 ms and each costs ~4.5 MiB and two descriptors (its event loop),
 * so a burst of connections does not leave a crowd of idle threads behind.
 */
const KEEP_IDLE = 2;

/** A connection running on a thread: stop() ends it (the thread sees the end of the stream). */
export interface ThreadedConnection {
  stop(): void;
}

export class ThreadPool {
  private readonly idle: Worker[] = [];
  private busy = 0;
  /** Connections handed to a thread so far. */
  served = 0;
  private closed = false;
  /** Shared with every thread: how many of its connections send file ranges (see BlockingTransport). */
  readonly readers = new SharedArrayBuffer(4);

  constructor(readonly max: number, private readonly log: Logger) {}

  /** Can another connection have a thread now? */
  get available(): boolean {
    return !this.closed && this.busy < this.max;
  }

  /** Connections on threads now. */
  get running(): number {
    return this.busy;
  }

  /**
   * Start the threads that wait for connections (serve does, once listening), so that the first
   * clients' requests do not wait for a thread to load its code.
   */
  prestart(): void {
    while (!this.closed && this.idle.length < Math.min(this.max, KEEP_IDLE)) {
      const w = newThread();
      w.unref();
      this.idle.push(w);
    }
  }

  /** Serve `job` on a thread; `done` runs once, after the thread closed the socket (or died). */
  run(job: ThreadJob, done: () => void): ThreadedConnection {
    const w = this.idle.pop() ?? newThread();
    w.ref();
    this.busy++;
    this.served++;
    let finished = false;
    const finish = (reuse: boolean) => {
      if (finished) return;
      finished = true;
      w.removeEventListener("message", onMessage);
      w.removeEventListener("error", onError);
      this.busy--;
      if (reuse && !this.closed && this.idle.length < KEEP_IDLE) {
        w.unref();
        this.idle.push(w);
      } else {
        w.terminate();
      }
      done();
    };
    const onMessage = (ev: MessageEvent<ThreadMessage>) => {
      const m = ev.data;
      if (m.kind === "log") this.log[m.level](m.msg, m.fields);
      else finish(true);
    };
    const onError = (ev: ErrorEvent) => {
      if (finished) return;
      this.log.error(`[${job.id}] connection thread failed: ${ev.message}; closing the connection`);
      closeSocket(job.socket);
      finish(false);
    };
    w.addEventListener("message", onMessage);
    w.addEventListener("error", onError);
    w.postMessage(job);
    return { stop: () => { if (!finished) shutdownRead(job.socket); } };
  }

  /** No more connections; idle threads end (running ones end with their connections). */
  close(): void {
    this.closed = true;
    for (const w of this.idle.splice(0)) w.terminate();
  }
}

function newThread(): Worker {
  return new Worker(new URL("./connection-thread.ts", import.meta.url).href);
}
