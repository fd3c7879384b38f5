// The fuzz loops, one per mode, each for a time budget from a seed: `session` (in-process, with
// fast-check's shrinking and replay by seed and path), `parsers` (the file-parser table, the same
// way) and `socket` (hostile connections to a real `bun src/cli.ts serve`). Each returns a report;
// the first failure stops its mode. Runs inside the watchdog worker (worker.ts), which catches
// synchronous hangs by the input counter `progress` stops moving.
import fc from "fast-check";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { type BaseInput, baseInput, variant } from "./gen.ts";
import { FuzzFailure, SessionTarget } from "./session.ts";
import { PARSERS, type ParserInput, mutateSeed, parserInput, type Field } from "./parsers.ts";

export interface Finding { oracle: string; message: string; replay: string; counterexample?: string }
export interface ModeReport { mode: string; inputs: number; seconds: number; finding?: Finding }
export interface RunOptions {
  seconds: number;
  seed: number;
  /** fast-check path of one input to replay (from a finding's replay line). */
  path?: string;
  /** Scratch directory (prefer tmpfs: the overlay and parser targets fsync). */
  dir: string;
  /** Called before each input with the running count (the watchdog reads it). */
  progress: (n: number) => void;
  /** RSS limit for the process (MiB) before "memory" is reported. */
  memoryMiB?: number;
}

let asyncFault: unknown = null;
let hooked = false;
function hookAsyncFaults(): void {
  if (hooked) return;
  hooked = true;
  process.on("unhandledRejection", (e) => { asyncFault ??= e; });
  process.on("uncaughtException", (e) => { asyncFault ??= e; });
}
function takeAsyncFault(): void {
  if (asyncFault === null) return;
  const e = asyncFault;
  asyncFault = null;
  throw new FuzzFailure("unhandled rejection or uncaught exception", (e as Error)?.stack ?? String(e));
}

function checkMemory(limitMiB: number): void {
  const rss = process.memoryUsage().rss / 1048576;
  if (rss > limitMiB) {
    Bun.gc(true);
    const again = process.memoryUsage().rss / 1048576;
    if (again > limitMiB) throw new FuzzFailure("memory", `process RSS ${again.toFixed(0)} MiB above the ${limitMiB} MiB bound`);
  }
}

/** Variants run per base input drawn by fast-check (the small mutation loop). */
export const VARIANTS = 16;

/** Summarise a base input and the variant that failed (the runner records which). */
function describeBase(b: BaseInput): string {
  const v = variant(b, lastVariant);
  return `${b.summary}; ${b.bytes.length} bytes; variant ${lastVariant}: ${v.note}\n  hex: ${Buffer.from(v.bytes.subarray(0, 800)).toString("hex")}${v.bytes.length > 800 ? "..." : ""}`;
}
let lastVariant = 0;

function findingOf(mode: string, seed: number, r: fc.RunDetails<unknown>, describe: (x: never) => string): Finding | undefined {
  if (!r.failed) return undefined;
  const err = r.errorInstance;
  const f = err instanceof FuzzFailure ? err : new FuzzFailure("uncaught exception", (err as Error)?.stack ?? String(err));
  const ce = r.counterexample ? describe((r.counterexample as unknown[])[0] as never) : undefined;
  return {
    oracle: f.oracle, message: f.message.slice(0, 4000),
    replay: `npm run fuzz -- --mode ${mode} --seed ${seed} --path ${r.counterexamplePath}`,
    counterexample: ce,
  };
}

function params(o: RunOptions): fc.Parameters<unknown> {
  return {
    seed: o.seed, path: o.path, numRuns: o.path ? 1 : 2 ** 31 - 1,
    interruptAfterTimeLimit: o.seconds * 1000, markInterruptAsFailure: false, endOnFailure: false,
  } as fc.Parameters<unknown>;
}

/** In-process: one Session per input over a fake transport. */
export async function fuzzSession(o: RunOptions): Promise<ModeReport> {
  hookAsyncFaults();
  const dir = join(o.dir, "session");
  mkdirSync(dir, { recursive: true });
  const target = await SessionTarget.create(dir);
  let n = 0;
  const t0 = performance.now();
  let bases = 0;
  const prop = fc.asyncProperty(baseInput(target.info), async (base) => {
    bases++;
    await target.reset();
    for (let v = 0; v < VARIANTS; v++) {
      lastVariant = v;
      o.progress(++n);
      await target.run(variant(base, v));
      takeAsyncFault();
      if (n % 1000 === 0) checkMemory(o.memoryMiB ?? 2048);
    }
    if (bases % 4 === 1) await target.canary(bases);
  });
  const r = await fc.check(prop, params(o));
  await target.close();
  return { mode: "session", inputs: n, seconds: (performance.now() - t0) / 1000, finding: findingOf("session", o.seed, r, describeBase) };
}

/** The parser table: mutated seeds through each parser's real open path. */
export async function fuzzParsers(o: RunOptions): Promise<ModeReport> {
  hookAsyncFaults();
  const seeds: Uint8Array[][] = [];
  const fields: (Field[] | undefined)[][] = [];
  const dirs: string[] = [];
  for (const p of PARSERS) {
    const d = join(o.dir, `parser-${p.name}`);
    mkdirSync(d, { recursive: true });
    dirs.push(d);
    const s = await p.seeds(d);
    seeds.push(s);
    fields.push(s.map((b) => p.fields?.(b)));
  }
  let n = 0;
  const t0 = performance.now();
  const build = (i: ParserInput) => {
    const k = i.seed % seeds[i.target]!.length;
    return mutateSeed(PARSERS[i.target]!, seeds[i.target]![k]!, i.ops, fields[i.target]![k]);
  };
  const prop = fc.asyncProperty(parserInput(PARSERS.length), async (i) => {
    o.progress(++n);
    const p = PARSERS[i.target]!;
    await p.run(build(i), dirs[i.target]!);
    takeAsyncFault();
    if (n % 200 === 0) checkMemory(o.memoryMiB ?? 2048);
  });
  const r = await fc.check(prop, params(o));
  const describe = (i: ParserInput) => `${PARSERS[i.target]!.name} ops ${JSON.stringify(i.ops)}\n  hex: ${Buffer.from(build(i).subarray(0, 400)).toString("hex")}`;
  return { mode: "parsers", inputs: n, seconds: (performance.now() - t0) / 1000, finding: findingOf("parsers", o.seed, r, describe) };
}
