// Crash harness: a client writes (pipelined, some with FUA), zeroes, trims and flushes through
// `bun-nbd serve` (an overlay of either L2 type, or a raw file); the server is killed with SIGKILL at
// a random moment, many times over the same image. After each kill the image is checked
// (`qemu-img check` finds no corruption for overlays; leaked clusters are allowed) and every byte
// acknowledged by a completed FLUSH, or by a FUA write nothing else overlapped, is intact. Bytes
// touched since may hold old or new data; their actual content becomes the expectation of the next
// round (whose read-write open repairs an overlay's leaks). CI runs a short round count; the long
// mode (bench/crash-long.sh) sets OVERLAY_CRASH_ROUNDS (and OVERLAY_CRASH_MS, the time budget per type).
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { mkdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { need, runOk, scratch } from "./helpers/env.ts";
import { serve } from "./helpers/server.ts";
import { connect, type NbdClient } from "../src/client/index.ts";
import { assertClean, KiB, makeBase, MiB, qemuCheck, Rng, sha256 } from "./overlay-support.ts";

const test = suite("overlay-crash");
const dir = scratch("bun-nbd-overlay-crash-");

test.before(() => need("qemu-img"));

// (a raw file is cheaper to get right: half the rounds in the short run)
const ROUNDS = Number(process.env.OVERLAY_CRASH_ROUNDS ?? 16);
const BUDGET_MS = Number(process.env.OVERLAY_CRASH_MS ?? (process.env.OVERLAY_CRASH_ROUNDS ? Infinity : 30_000));

type Kind = "extended" | "standard" | "raw";

/**
 * What the client has been promised, byte by byte. `touched` bytes (written since the promise) may
 * be old or new after a crash; a FUA write's bytes are promised when it completes, unless another
 * request overlapping it was in flight when it was sent or was sent after it.
 */
class Promises {
  readonly durable: Uint8Array;
  readonly working: Uint8Array;
  readonly touched: Uint8Array;
  private readonly lastSeq: Uint32Array;
  private readonly inflight: Uint16Array;
  private seq = 0;
  /** Rounds: a request of an earlier round (whose server was killed) promises nothing. */
  private round = 0;
  fuaPromised = 0;

  constructor(initial: Uint8Array) {
    this.durable = initial.slice();
    this.working = initial.slice();
    this.touched = new Uint8Array(initial.length);
    this.lastSeq = new Uint32Array(initial.length);
    this.inflight = new Uint16Array(initial.length);
  }

  /** A request over [off, off+len) that leaves `value` there (null: unknown, e.g. a trim). Returns its completion hook. */
  send(off: number, len: number, value: Uint8Array | 0 | null, fua: boolean): (ok: boolean) => void {
    const s = ++this.seq;
    const round = this.round;
    const end = off + len;
    let crowded = false;
    for (let i = off; i < end; i++) if (this.inflight[i] !== 0) { crowded = true; break; }
    this.lastSeq.fill(s, off, end);
    for (let i = off; i < end; i++) this.inflight[i] = this.inflight[i]! + 1;
    this.touched.fill(1, off, end);
    if (value === 0 || value === null) this.working.fill(0, off, end);
    else this.working.set(value, off);
    return (ok) => {
      if (round !== this.round) return;
      for (let i = off; i < end; i++) this.inflight[i] = this.inflight[i]! - 1;
      if (!ok || !fua || crowded || value === null) return;
      let any = false;
      for (let i = off; i < end; i++) {
        if (this.lastSeq[i] !== s) continue;
        this.durable[i] = value === 0 ? 0 : value[i - off]!;
        this.touched[i] = 0;
        any = true;
      }
      if (any) this.fuaPromised++;
    };
  }

  /** A FLUSH completed after every request before it completed: everything is promised. */
  flushed(): void {
    this.durable.set(this.working);
    this.touched.fill(0);
  }

  /** After the crash: the image as found is the expectation of the next round. */
  restart(now: Uint8Array): void {
    this.round++;
    this.inflight.fill(0);
    this.durable.set(now);
    this.working.set(now);
    this.touched.fill(0);
  }
}

async function crashLoop(kind: Kind, seed: number) {
  const d = join(dir, kind);
  mkdirSync(d, { recursive: true });
  const basePath = join(d, "base.img");
  const size = 12 * MiB;
  const base = makeBase(basePath, size, seed);
  const baseSha = sha256(basePath);
  const ov = join(d, "ov.qcow2");
  const args = kind === "raw" ? [basePath] : ["--overlay", ov, ...(kind === "standard" ? ["--compat"] : []), basePath];
  const p = new Promises(base);
  const rng = new Rng(seed);
  const start = Date.now();
  let rounds = 0;
  let leakyRounds = 0;
  let flushesTotal = 0;
  const limit = kind === "raw" && process.env.OVERLAY_CRASH_ROUNDS === undefined ? ROUNDS / 2 : ROUNDS;
  while (rounds < limit && Date.now() - start < BUDGET_MS) {
    rounds++;
    const srv = await serve(args, { socket: join(d, `sock${rounds}`) });
    const killAfter = 30 + rng.int(400);
    let nbd: NbdClient | null = null;
    const killer = setTimeout(() => srv.proc.kill("SIGKILL"), killAfter);
    try {
      nbd = await connect(srv.uri("base"));
      for (;;) {
        const batch: Promise<void>[] = [];
        const n = 1 + rng.int(12);
        for (let k = 0; k < n; k++) {
          const len = rng.int(4) === 0 ? 1 + rng.int(512 * KiB) : 1 + rng.int(9000);
          const off = rng.int(size - len);
          const r = rng.int(10);
          const fua = rng.int(6) === 0;
          let req: Promise<void>;
          let done: (ok: boolean) => void;
          if (r < 7) {
            const data = rng.bytes(len);
            done = p.send(off, len, data, fua);
            req = nbd.pwrite(data, off, { fua });
          } else if (r < 9) {
            done = p.send(off, len, 0, fua);
            req = nbd.zero(off, len, { noHole: rng.int(2) === 0, fua });
          } else {
            // TRIM promises nothing about the content (the overlay and a raw file zero it)
            done = p.send(off, len, null, false);
            req = nbd.trim(off, len);
          }
          batch.push(req.then(() => done(true), (e) => { done(false); throw e; }));
        }
        await Promise.all(batch);
        await nbd.flush();
        flushesTotal++;
        p.flushed();
      }
    } catch {
      // the server was killed: the connection fails
    } finally {
      clearTimeout(killer);
      srv.proc.kill("SIGKILL");
      await srv.proc.exited;
      if (nbd) nbd.destroy();
    }
    let now: Uint8Array;
    if (kind === "raw") {
      now = new Uint8Array(readFileSync(basePath));
    } else {
      const chk = await qemuCheck(ov);
      assert.ok(chk.code === 0 || chk.code === 3, `round ${rounds}: qemu-img check exit ${chk.code}: ${JSON.stringify(chk.json)}`);
      if (chk.code === 3) leakyRounds++;
      const raw = join(d, "now.raw");
      await runOk(["qemu-img", "convert", "-U", "-O", "raw", ov, raw]);
      now = new Uint8Array(readFileSync(raw));
    }
    assert.is(now.length, size, "image size");
    // bytes not touched since they were promised must be exactly as promised
    for (let i = 0; i < size; i++) {
      if (p.touched[i] === 0 && now[i] !== p.durable[i]) {
        assert.unreachable(`${kind} round ${rounds} (kill after ${killAfter} ms): byte ${i} (0x${i.toString(16)}) is ${now[i]}, promised value ${p.durable[i]}`);
      }
    }
    p.restart(now);
  }
  if (kind !== "raw") {
    // the last read-write open repairs whatever the last crash leaked
    const fin = await serve(["--overlay", ov, basePath], { socket: join(d, "sock-final") });
    await fin.stop();
    await assertClean(ov, "after a read-write open following the last crash");
    assert.is(sha256(basePath), baseSha, "base unchanged through all crashes");
  }
  console.log(`  ${kind === "raw" ? "raw file" : `${kind} L2`}: ${rounds} kills, ${flushesTotal} completed flushes, ` +
    `${p.fuaPromised} FUA requests whose bytes were checked${kind === "raw" ? "" : `, ${leakyRounds} kill(s) left leaked clusters`}`);
  assert.ok(rounds >= 4, "enough rounds ran");
}

test("kill -9 at random moments: extended L2", async () => {
  await crashLoop("extended", 101);
});

test("kill -9 at random moments: standard L2", async () => {
  await crashLoop("standard", 202);
});

test("kill -9 at random moments: raw file (FLUSH and FUA)", async () => {
  await crashLoop("raw", 303);
});

test.run();
