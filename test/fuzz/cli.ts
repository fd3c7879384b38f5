// `npm run fuzz -- [--seconds N] [--seed S] [--mode session|parsers|socket|all] [--path P]`:
// runs the fuzz modes in a worker thread under a watchdog (no input may run for more than
// --stall seconds: a synchronous hang is reported with the input's number) and prints inputs,
// inputs per second and any finding with the command that replays it. Exit 1 on a finding.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { ModeReport } from "./run.ts";
import type { WorkerJob, WorkerMessage } from "./worker.ts";

interface Args { seconds: number; seed: number; mode: string; path?: string; stall: number; memoryMiB: number }

function parseArgs(argv: string[]): Args {
  const a: Args = { seconds: 60, seed: Date.now() % 2 ** 31, mode: "all", stall: 60, memoryMiB: 2048 };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i]!, v = argv[i + 1];
    const num = () => { const n = Number(v); if (!Number.isFinite(n)) throw new Error(`${k} needs a number`); i++; return n; };
    if (k === "--seconds") a.seconds = num();
    else if (k === "--seed") a.seed = num();
    else if (k === "--stall") a.stall = num();
    else if (k === "--memory") a.memoryMiB = num();
    else if (k === "--mode") { a.mode = v ?? ""; i++; }
    else if (k === "--path") { a.path = v; i++; }
    else if (k === "-h" || k === "--help") {
      console.log("usage: npm run fuzz -- [--seconds N] [--seed S] [--mode session|parsers|socket|all] [--path P] [--stall S] [--memory MiB]");
      process.exit(0);
    } else throw new Error(`unknown argument ${k}`);
  }
  if (!["session", "parsers", "socket", "all"].includes(a.mode)) throw new Error(`unknown mode ${a.mode}`);
  return a;
}

/** How `all` shares the time: most to the fast in-process session mode. */
function plan(a: Args): WorkerJob["modes"] {
  if (a.mode !== "all") return [{ mode: a.mode, seconds: a.seconds }];
  return [
    { mode: "session", seconds: a.seconds * 0.5 },
    { mode: "parsers", seconds: a.seconds * 0.25 },
    { mode: "socket", seconds: a.seconds * 0.25 },
  ];
}

export async function main(argv: string[]): Promise<number> {
  const a = parseArgs(argv);
  const root = process.env.FUZZ_DIR ?? (process.platform === "linux" ? "/dev/shm" : tmpdir());
  const dir = mkdtempSync(join(root, "bun-nbd-fuzz-"));
  const counter = new SharedArrayBuffer(8);
  const c = new Int32Array(counter);
  const worker = new Worker(new URL("./worker.ts", import.meta.url).href);
  const job: WorkerJob = { modes: plan(a), seed: a.seed, path: a.path, dir, memoryMiB: a.memoryMiB, counter };
  console.log(`fuzz: seed ${a.seed}, ${job.modes.map((m) => `${m.mode} ${m.seconds.toFixed(0)} s`).join(", ")}${a.path ? `, path ${a.path}` : ""}`);
  const reports: ModeReport[] = [];
  let mode = "";
  let hang: string | null = null;
  worker.postMessage(job);
  // Interrupted (a long run stopped by hand): report what ran so far.
  for (const sig of ["SIGINT", "SIGTERM"] as const) {
    process.on(sig, () => {
      const done = reports.reduce((n, r) => n + r.inputs, 0) + Atomics.load(c, 0);
      console.log(`fuzz: interrupted (${sig}) in ${mode} after ${done} inputs in all, no finding so far`);
      process.exit(130);
    });
  }
  await new Promise<void>((resolve) => {
    let last = -1, lastChange = Date.now();
    let ticks = 0;
    const iv = setInterval(() => {
      if (++ticks % 60 === 0) console.log(`fuzz ${mode}: ${Atomics.load(c, 0)} inputs so far`);
      const moves = Atomics.load(c, 1);
      if (moves !== last) { last = moves; lastChange = Date.now(); return; }
      if (Date.now() - lastChange > a.stall * 1000) {
        hang = `${mode}: input ${Atomics.load(c, 0)} ran for more than ${a.stall} s (replay: npm run fuzz -- --mode ${mode} --seed ${a.seed} --path ${Atomics.load(c, 0) - 1})`;
        clearInterval(iv);
        worker.terminate();
        resolve();
      }
    }, 1000);
    worker.onmessage = (e: MessageEvent<WorkerMessage>) => {
      const m = e.data;
      if (m.kind === "start") { mode = m.mode; last = -1; lastChange = Date.now(); }
      else if (m.kind === "report") {
        reports.push(m.report);
        const r = m.report;
        console.log(`fuzz ${r.mode}: ${r.inputs} inputs in ${r.seconds.toFixed(1)} s (${(r.inputs / Math.max(r.seconds, 1e-9)).toFixed(0)} inputs/s)${r.finding ? "  FINDING" : ""}`);
      } else { clearInterval(iv); resolve(); }
    };
    worker.onerror = (e) => {
      reports.push({ mode, inputs: 0, seconds: 0, finding: { oracle: "worker crashed", message: String(e.message), replay: "" } });
      clearInterval(iv);
      resolve();
    };
  });
  worker.terminate();
  if (!process.env.KEEP_FUZZ_DIR) rmSync(dir, { recursive: true, force: true });
  const total = reports.reduce((s, r) => s + r.inputs, 0);
  console.log(`fuzz: ${total} inputs in all`);
  let bad = false;
  if (hang) { bad = true; console.log(`FINDING hang: ${hang}`); }
  for (const r of reports) {
    if (!r.finding) continue;
    bad = true;
    console.log(`FINDING in ${r.mode}: ${r.finding.oracle}\n${r.finding.message}\nreplay: ${r.finding.replay}`);
    if (r.finding.counterexample) console.log(`input: ${r.finding.counterexample}`);
  }
  return bad ? 1 : 0;
}

if (import.meta.main) {
  main(process.argv.slice(2)).then((code) => process.exit(code), (e) => { console.error((e as Error).message); process.exit(2); });
}
