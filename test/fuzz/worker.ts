// The fuzz worker thread: runs the requested modes one after the other and posts their reports.
// Before each input it stores the input count in a shared counter, so the main thread (cli.ts)
// can tell a synchronous hang (the counter stops) from slow progress, and name the input.
import { type ModeReport, type RunOptions, fuzzParsers, fuzzSession } from "./run.ts";
import { fuzzSocket } from "./socket.ts";

export interface WorkerJob { modes: { mode: string; seconds: number }[]; seed: number; path?: string; dir: string; memoryMiB: number; counter: SharedArrayBuffer }
export type WorkerMessage = { kind: "report"; report: ModeReport } | { kind: "start"; mode: string } | { kind: "done" };

const MODES: Record<string, (o: RunOptions) => Promise<ModeReport>> = { session: fuzzSession, parsers: fuzzParsers, socket: fuzzSocket };

async function runJob(job: WorkerJob, post: (m: WorkerMessage) => void): Promise<void> {
  const counter = new Int32Array(job.counter);
  for (const m of job.modes) {
    post({ kind: "start", mode: m.mode });
    Atomics.store(counter, 0, 0);
    const report = await MODES[m.mode]!({
      seconds: m.seconds, seed: job.seed, path: job.path, dir: job.dir, memoryMiB: job.memoryMiB,
      progress: (n) => { Atomics.store(counter, 0, n); Atomics.add(counter, 1, 1); },
    });
    post({ kind: "report", report });
    if (report.finding) break;
  }
  post({ kind: "done" });
}

declare const self: Worker;

if (!Bun.isMainThread) {
  self.onmessage = (e: MessageEvent<WorkerJob>) => {
    runJob(e.data, (m) => postMessage(m)).catch((err) => {
      postMessage({ kind: "report", report: { mode: "worker", inputs: 0, seconds: 0, finding: { oracle: "harness error", message: (err as Error)?.stack ?? String(err), replay: "" } } });
      postMessage({ kind: "done" });
    });
  };
}
