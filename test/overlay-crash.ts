// Crash harness: a client writes (pipelined), zeroes, trims and flushes through `bun-nbd serve
// --overlay`; the server is killed with SIGKILL at a random moment, many times over the same
// overlay. After each kill: `qemu-img check` finds no corruption (leaked clusters are allowed),
// and every byte acknowledged before the last completed flush is intact. Bytes touched after it
// may hold old or new data; their actual content becomes the expectation of the next round,
// whose read-write open repairs the leaks.
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

const ROUNDS = Number(process.env.OVERLAY_CRASH_ROUNDS ?? 16);
const BUDGET_MS = Number(process.env.OVERLAY_CRASH_MS ?? 30_000);

async function crashLoop(compat: boolean, seed: number) {
  const d = join(dir, compat ? "std" : "ext");
  mkdirSync(d, { recursive: true });
  const basePath = join(d, "base.img");
  const size = 12 * MiB;
  const base = makeBase(basePath, size, seed);
  const baseSha = sha256(basePath);
  const ov = join(d, "ov.qcow2");
  let durable = base.slice();
  const rng = new Rng(seed);
  const start = Date.now();
  let rounds = 0;
  let leakyRounds = 0;
  let flushesTotal = 0;
  while (rounds < ROUNDS && Date.now() - start < BUDGET_MS) {
    rounds++;
    const srv = await serve(["--overlay", ov, ...(compat ? ["--compat"] : []), basePath], { socket: join(d, `sock${rounds}`) });
    const touched: [number, number][] = [];
    const working = durable.slice();
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
          touched.push([off, off + len]);
          const r = rng.int(10);
          if (r < 7) {
            const data = rng.bytes(len);
            working.set(data, off);
            batch.push(nbd.pwrite(data, off, { fua: rng.int(8) === 0 }));
          } else if (r < 9) {
            working.fill(0, off, off + len);
            batch.push(nbd.zero(off, len, { noHole: rng.int(2) === 0 }));
          } else {
            working.fill(0, off, off + len);
            batch.push(nbd.trim(off, len));
          }
        }
        await Promise.all(batch);
        await nbd.flush();
        flushesTotal++;
        // everything before this flush is now promised to survive
        durable = working.slice();
        touched.length = 0;
      }
    } catch {
      // the server was killed: the connection fails
    } finally {
      clearTimeout(killer);
      srv.proc.kill("SIGKILL");
      await srv.proc.exited;
      if (nbd) nbd.destroy();
    }
    const chk = await qemuCheck(ov);
    assert.ok(chk.code === 0 || chk.code === 3, `round ${rounds}: qemu-img check exit ${chk.code}: ${JSON.stringify(chk.json)}`);
    if (chk.code === 3) leakyRounds++;
    const raw = join(d, "now.raw");
    await runOk(["qemu-img", "convert", "-U", "-O", "raw", ov, raw]);
    const now = new Uint8Array(readFileSync(raw));
    assert.is(now.length, size, "overlay size");
    // bytes outside what was touched after the last completed flush must be exactly as flushed
    const mask = new Uint8Array(size);
    for (const [a, b] of touched) mask.fill(1, a, b);
    for (let i = 0; i < size; i++) {
      if (mask[i] === 0 && now[i] !== durable[i]) {
        assert.unreachable(`round ${rounds} (kill after ${killAfter} ms): byte ${i} (0x${i.toString(16)}) is ${now[i]}, flushed value ${durable[i]}`);
      }
    }
    durable = now;
  }
  // the last read-write open (by the check) repairs whatever the last crash leaked
  const fin = await serve(["--overlay", ov, basePath], { socket: join(d, "sock-final") });
  await fin.stop();
  await assertClean(ov, "after a read-write open following the last crash");
  assert.is(sha256(basePath), baseSha, "base unchanged through all crashes");
  console.log(`  ${compat ? "standard" : "extended"} L2: ${rounds} kills, ${flushesTotal} completed flushes, ${leakyRounds} kill(s) left leaked clusters`);
  assert.ok(rounds >= 4, "enough rounds ran");
}

test("kill -9 at random moments: extended L2", async () => {
  await crashLoop(false, 101);
});

test("kill -9 at random moments: standard L2", async () => {
  await crashLoop(true, 202);
});

test.run();
