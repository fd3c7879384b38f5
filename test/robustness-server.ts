// Server-level robustness: bounded memory with a client that never reads its replies, many
// concurrent clients over TCP and a unix socket, SIGTERM/SIGINT with clients connected (exit 0),
// and a flushed write surviving `kill -9`.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { readFileSync, truncateSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { bytesEqual, deadline } from "./helpers/assert.ts";
import { scratch } from "./helpers/env.ts";
import { serve } from "./helpers/server.ts";
import { CMD, Wire, pattern, request, rssKiB, type Target } from "./robustness-wire.ts";

const test = suite("robustness-server");
const dir = scratch("bun-nbd-robust-srv-");
const MiB = 1024 * 1024;

test("a client that never reads: server RSS stays bounded, then every reply arrives", () => deadline(90_000, "backpressure", async () => {
  const img = join(dir, "big.img");
  writeFileSync(img, "");
  truncateSync(img, 64 * MiB);
  const srv = await serve(["-q", img]);
  try {
    const pid = srv.proc.pid;
    const w = await Wire.open({ port: srv.port });
    await w.hello();
    await w.go("big");
    await Bun.sleep(200);
    const baseline = rssKiB(pid);
    // 48 reads of 32 MiB = 1.5 GiB of replies, requested in one packet; the client reads nothing.
    const N = 48, LEN = 32 * MiB;
    const reqs: Buffer[] = [];
    for (let i = 0; i < N; i++) reqs.push(request(CMD.READ, BigInt(i + 1), (i % 2) * 32 * MiB, LEN));
    w.sock.pause();
    w.write(Buffer.concat(reqs));
    let peak = baseline;
    for (let t = 0; t < 30; t++) {
      await Bun.sleep(50);
      peak = Math.max(peak, rssKiB(pid));
    }
    const growthMiB = (peak - baseline) / 1024;
    // 32 MiB high-water mark + one 32 MiB reply being built + allocator slack; without
    // backpressure this would be about 1.5 GiB.
    assert.ok(growthMiB < 200, `server RSS grew by ${growthMiB.toFixed(0)} MiB (baseline ${(baseline / 1024).toFixed(0)} MiB)`);
    // Now read everything: all replies arrive, each exactly once.
    w.sock.resume();
    const seen = new Set<bigint>();
    for (let i = 0; i < N; i++) {
      const r = await w.simpleReply();
      assert.is(r.error, 0);
      assert.not.ok(seen.has(r.cookie), "cookie answered twice");
      seen.add(r.cookie);
      let left = LEN;
      while (left > 0) { const n = Math.min(left, 4 * MiB); await w.read(n, 20_000); left -= n; }
    }
    assert.is(seen.size, N);
    w.destroy();
    console.log(`  backpressure: server RSS baseline ${(baseline / 1024).toFixed(0)} MiB, peak +${growthMiB.toFixed(0)} MiB while 1.5 GiB of replies were pending`);
  } finally {
    assert.is(await srv.stop(), 0, "exit status");
  }
}));

test("many concurrent clients over TCP and a unix socket", () => deadline(60_000, "concurrent", async () => {
  const img = join(dir, "conc.img");
  const CLIENTS = 48, REGION = 64 * 1024;
  writeFileSync(img, Buffer.alloc(CLIENTS * REGION));
  const sock = join(dir, "conc.sock");
  const srv = await serve(["-q", "-p", "0", img], { socket: sock });
  try {
    const targets: Target[] = [{ port: srv.port }, { path: sock }];
    const one = async (i: number) => {
      const w = await Wire.open(targets[i % 2]!);
      await w.hello();
      await w.go("conc", { structured: i % 4 >= 2 });
      const data = pattern(REGION, i * REGION, i);
      // write in 16 pieces, pipelined, then read back in one request
      for (let k = 0; k < 16; k++) {
        const piece = REGION / 16;
        w.write(request(CMD.WRITE, BigInt(k + 1), i * REGION + k * piece, piece, 0, data.subarray(k * piece, (k + 1) * piece)));
      }
      const structured = i % 4 >= 2;
      for (let k = 0; k < 16; k++) {
        if (structured) { const c = await w.chunk(); assert.is(c.type, 0); }
        else assert.is((await w.simpleReply()).error, 0);
      }
      w.write(request(CMD.READ, 100n, i * REGION, REGION));
      let got: Buffer;
      if (structured) {
        const parts: Buffer[] = [];
        let n = 0;
        for (;;) {
          const c = await w.chunk();
          if (c.type === 1) { parts.push(c.data.subarray(8)); n += c.data.length - 8; }
          else if (c.type === 2) { const l = c.data.readUInt32BE(8); parts.push(Buffer.alloc(l)); n += l; }
          else assert.unreachable(`chunk type ${c.type}`);
          if (c.flags & 1) break;
        }
        got = Buffer.concat(parts, n);
      } else {
        got = (await w.simpleReply(REGION)).data!;
      }
      bytesEqual(got, data, `client ${i} read-back`);
      w.write(request(CMD.DISC, 0n, 0, 0));
      assert.ok(await w.closedWithin(5000), `client ${i}: closed after DISC`);
    };
    await Promise.all(Array.from({ length: CLIENTS }, (_, i) => one(i)));
    const file = readFileSync(img);
    for (let i = 0; i < CLIENTS; i++) bytesEqual(file.subarray(i * REGION, (i + 1) * REGION), pattern(REGION, i * REGION, i), `region ${i} in the file`);
  } finally {
    assert.is(await srv.stop(), 0, "exit status");
  }
}));

test("SIGTERM and SIGINT with clients connected (in options and in transmission): exit 0", () => deadline(30_000, "sigterm", async () => {
  const img = join(dir, "term.img");
  writeFileSync(img, Buffer.alloc(MiB));
  for (const sig of ["SIGTERM", "SIGINT"] as const) {
    const sock = join(dir, `term-${sig}.sock`);
    const srv = await serve([img], { socket: sock });
    const a = await Wire.open({ path: sock });
    await a.hello();
    await a.go("term");
    const data = pattern(4096, 0, 9);
    a.write(request(CMD.WRITE, 1n, 8192, 4096, 0, data));
    assert.is((await a.simpleReply()).error, 0);
    const b = await Wire.open({ path: sock });
    await b.hello(); // stays in option haggling
    const t0 = Date.now();
    const code = await srv.stop(sig);
    assert.is(code, 0, `${sig}: exit status\n${srv.output()}`);
    assert.ok(Date.now() - t0 < 6000, `${sig}: took ${Date.now() - t0} ms`);
    assert.ok(await a.closedWithin(2000), `${sig}: transmission client closed`);
    assert.ok(await b.closedWithin(2000), `${sig}: option-phase client closed`);
    bytesEqual(readFileSync(img).subarray(8192, 12288), data, `${sig}: write in the file`);
  }
}));

test("SIGTERM with 200 reads in flight: each answered (data or ESHUTDOWN) or cut off by the close, exit 0", () => deadline(30_000, "sigterm busy", async () => {
  const img = join(dir, "busy.img");
  writeFileSync(img, pattern(16 * MiB, 0, 4));
  const srv = await serve(["-q", img]);
  const w = await Wire.open({ port: srv.port });
  await w.hello();
  await w.go("busy");
  const reqs: Buffer[] = [];
  for (let i = 0; i < 200; i++) reqs.push(request(CMD.READ, BigInt(i), (i % 16) * MiB, MiB));
  w.write(Buffer.concat(reqs));
  await Bun.sleep(5);
  const code = srv.stop();
  const seen = new Set<bigint>();
  try {
    for (;;) {
      const r = await w.simpleReply();
      assert.ok(r.error === 0 || r.error === 108, `errno ${r.error}`);
      assert.not.ok(seen.has(r.cookie), "answered twice");
      seen.add(r.cookie);
      if (r.error === 0) await w.read(MiB);
    }
  } catch (e) {
    assert.ok(w.closed, `stopped reading replies for a reason other than the close: ${(e as Error).message}`);
  }
  assert.is(await code, 0, `exit status\n${srv.output()}`);
}));

test("a flushed write and a FUA write survive kill -9 of the server", () => deadline(30_000, "kill -9", async () => {
  const img = join(dir, "k9.img");
  writeFileSync(img, Buffer.alloc(MiB));
  const srv = await serve([img]);
  const w = await Wire.open({ port: srv.port });
  await w.hello();
  await w.go("k9");
  const d1 = pattern(65536, 4096, 11), d2 = pattern(4096, 200_000, 12);
  w.write(request(CMD.WRITE, 1n, 4096, d1.length, 0, d1));
  w.write(request(CMD.FLUSH, 2n, 0, 0));
  w.write(request(CMD.WRITE, 3n, 200_000, d2.length, 1 /* FUA */, d2));
  for (let i = 0; i < 3; i++) assert.is((await w.simpleReply()).error, 0);
  await srv.stop("SIGKILL");
  assert.is(srv.proc.signalCode, "SIGKILL", "killed by SIGKILL");
  const f = readFileSync(img);
  bytesEqual(f.subarray(4096, 4096 + d1.length), d1, "flushed write");
  bytesEqual(f.subarray(200_000, 200_000 + d2.length), d2, "FUA write");
  w.destroy();
}));

test.run();
