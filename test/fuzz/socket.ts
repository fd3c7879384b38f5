// The socket fuzz target: hostile connections (the same generated inputs as the in-process mode)
// to a real server, `bun src/cli.ts serve`, over TCP and a unix socket, 8 at a time, while a
// well-behaved client on another connection writes and reads back its own export throughout.
// Oracles: the server stays up, logs no error, answers the canary within a deadline with the right
// bytes, keeps its RSS bounded, and holds no more file descriptors at the end than at the start.
import fc from "fast-check";
import { readdirSync, readFileSync, readlinkSync, truncateSync, writeFileSync } from "node:fs";
import { connect as netConnect } from "node:net";
import { join } from "node:path";
import { connect, type NbdClient } from "../../src/client/index.ts";
import { serve, type Served } from "../helpers/server.ts";
import { type BaseInput, type FuzzInput, baseInput, chunks, variant } from "./gen.ts";
import type { ModeReport, RunOptions } from "./run.ts";
import { FuzzFailure } from "./session.ts";

const MiB = 1024 * 1024;
const CONCURRENCY = 8;
const VARIANTS = 4;

const rssMiB = (pid: number) => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))?.[1] ?? 0) / 1024;
/** Open fds, not counting duplicates of stdin/stdout/stderr (Bun dups stderr when it first logs). */
function fdList(pid: number): string[] {
  const link = (f: string) => { try { return readlinkSync(`/proc/${pid}/fd/${f}`); } catch { return "?"; } };
  const std = new Set(["0", "1", "2"].map(link));
  return readdirSync(`/proc/${pid}/fd`).filter((f) => Number(f) <= 2 || !std.has(link(f))).map(link);
}
const fdCount = (pid: number) => fdList(pid).length;

/** Send one input on a fresh connection; resolves once the connection is gone (ours or theirs). */
function sendOne(input: FuzzInput, target: { port: number } | { path: string }): Promise<void> {
  return new Promise((resolve) => {
    const s = "port" in target ? netConnect({ host: "127.0.0.1", port: target.port }) : netConnect({ path: target.path });
    s.setNoDelay(true);
    let done = false;
    const finish = () => { if (!done) { done = true; clearTimeout(timer); s.destroy(); resolve(); } };
    // Hang up at the input's cut, or 50 ms after the last byte (whatever the server still owes).
    const timer = setTimeout(finish, 3000);
    s.on("error", finish);
    s.on("close", finish);
    s.on("data", () => {}); // read and drop replies
    if (input.slowReader) s.pause();
    s.once("connect", async () => {
      const cut = input.closeAt ?? input.bytes.length;
      for (const c of chunks(input.bytes.subarray(0, cut), input.splits.length ? input.splits : [cut])) {
        if (done) return;
        s.write(c);
        if (input.splits.length) await new Promise((r) => setImmediate(r));
      }
      setTimeout(finish, input.closeAt === null ? 50 : 0);
    });
  });
}

/** The well-behaved client: write a pattern, read it back, again and again, each within 10 s. */
async function canaryLoop(uri: string, stop: () => boolean, fail: (e: FuzzFailure) => void, count: () => void): Promise<void> {
  let c: NbdClient;
  try {
    c = await connect(uri, { connectTimeoutMs: 10_000 });
  } catch (e) {
    fail(new FuzzFailure("canary", `cannot connect: ${(e as Error).message}`));
    return;
  }
  let round = 0;
  try {
    while (!stop()) {
      const off = (round * 7919 % 200) * 4096;
      const data = new Uint8Array(64 * 1024).map((_, k) => (k * 31 + round) & 255);
      const t0 = Date.now();
      await c.pwrite(data, off);
      const back = await c.read(off, data.length);
      if (Date.now() - t0 > 10_000) throw new FuzzFailure("canary", `a write and read took ${Date.now() - t0} ms`);
      if (Buffer.compare(Buffer.from(back), Buffer.from(data)) !== 0) throw new FuzzFailure("canary", `round ${round}: read back different bytes`);
      round++;
      count();
      await new Promise((r) => setTimeout(r, 20));
    }
    await c.close();
  } catch (e) {
    fail(e instanceof FuzzFailure ? e : new FuzzFailure("canary", (e as Error).message));
    c.destroy();
  }
}

export async function fuzzSocket(o: RunOptions): Promise<ModeReport> {
  const dir = o.dir;
  const fuzzImg = join(dir, "sock-fuzz.img"), canaryImg = join(dir, "sock-canary.img");
  for (const p of [fuzzImg, canaryImg]) { writeFileSync(p, ""); truncateSync(p, 4 * MiB); }
  const sock = join(dir, "fuzz.sock");
  // Info logging: on an fd leak, the sessions that never logged "closed" are named.
  const srv: Served = await serve(["-p", "0", fuzzImg, canaryImg], { socket: sock });
  const pid = srv.proc.pid;
  // Fuzzed traffic never names the canary's export on purpose (a random name will not hit it).
  const info = { names: ["", "sock-fuzz"], sizes: [4 * MiB], maxFullPayload: 256 * 1024 };
  await new Promise((r) => setTimeout(r, 300));
  const fdStart = fdCount(pid);
  let failure: FuzzFailure | null = null;
  const fail = (e: FuzzFailure) => { failure ??= e; };
  let stopCanary = false;
  let canaryRounds = 0;
  const canary = canaryLoop(`nbd+unix:///sock-canary?socket=${sock}`, () => stopCanary || failure !== null, fail, () => canaryRounds++);
  const t0 = performance.now();
  const until = Date.now() + o.seconds * 1000;
  let n = 0, batch = 0, maxRss = 0;
  let last: string[] = [];
  const arb = baseInput(info);
  while (Date.now() < until && failure === null) {
    // Bases come from fast-check by seed and batch; replay names the batch and the input.
    const bases: BaseInput[] = fc.sample(arb, { seed: o.seed + batch * 7919, numRuns: 16 });
    const inputs: { input: FuzzInput; name: string }[] = [];
    bases.forEach((b, i) => { for (let v = 0; v < VARIANTS; v++) inputs.push({ input: variant(b, v), name: `batch ${batch} base ${i} variant ${v}` }); });
    batch++;
    for (let i = 0; i < inputs.length && failure === null; i += CONCURRENCY) {
      const group = inputs.slice(i, i + CONCURRENCY);
      last = group.map((g) => g.name);
      await Promise.all(group.map((g, k) => { o.progress(++n); return sendOne(g.input, (i + k) % 2 ? { port: srv.port } : { path: sock }); }));
      if (srv.proc.exitCode !== null) fail(new FuzzFailure("server died", `exit ${srv.proc.exitCode}\n${srv.output().slice(-2000)}`));
      const errs = srv.output().split("\n").filter((l) => / error: /.test(l));
      if (errs.length) fail(new FuzzFailure("error logged", errs.slice(0, 5).join("\n")));
      const rss = rssMiB(pid);
      maxRss = Math.max(maxRss, rss);
      if (rss > (o.memoryMiB ?? 2048)) fail(new FuzzFailure("memory", `server RSS ${rss.toFixed(0)} MiB`));
    }
  }
  stopCanary = true;
  await canary;
  if (failure === null) {
    // Every hostile connection is closed by now: the server must be back to its idle fds.
    let fds = fdCount(pid);
    for (let k = 0; k < 50 && fds > fdStart; k++) { await new Promise((r) => setTimeout(r, 100)); fds = fdCount(pid); }
    if (fds > fdStart) {
      const list = fdList(pid);
      const log = srv.output().split("\n");
      const open = new Set<string>();
      for (const l of log) {
        const m = /\[(\d+)\] (connection from|closed)/.exec(l);
        if (m) { if (m[2] === "closed") open.delete(m[1]!); else open.add(m[1]!); }
      }
      const lines = log.filter((l) => [...open].some((id) => l.includes(`[${id}]`)));
      fail(new FuzzFailure("fd leak", `${fds} open fds at the end, ${fdStart} at the start: ${list.join(" ")}\nsessions never closed: ${[...open].join(", ")}\n${lines.slice(0, 30).join("\n")}`));
    }
    if (canaryRounds === 0) fail(new FuzzFailure("canary", "the canary never completed a round"));
  }
  await srv.stop();
  const f = failure as FuzzFailure | null;
  return {
    mode: "socket", inputs: n, seconds: (performance.now() - t0) / 1000,
    finding: f ? { oracle: f.oracle, message: `${f.message}\n(last inputs: ${last.join(", ")}; server max RSS ${maxRss.toFixed(0)} MiB)`, replay: `npm run fuzz -- --mode socket --seed ${o.seed}` } : undefined,
  };
}
