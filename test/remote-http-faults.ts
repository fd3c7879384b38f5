// Faults of an HTTP store mid-run, against a real nginx that answers 5xx for a while (nginx.fail)
// or stalls a transfer (/stall/): reads are retried with backoff and succeed once nginx answers
// again within the deadline; past a short deadline that read gets EIO and the log says why, while
// the same connection, other requests and another export go on, and the failed range reads once
// the store is back. A stalled attempt is cut by the attempt timeout and retried; a slow transfer
// that keeps moving is not.
import * as assert from "uvu/assert";
import { mkdirSync, readFileSync, symlinkSync } from "node:fs";
import { join } from "node:path";
import { connect, NbdRequestError, type NbdClient } from "../src/client/index.ts";
import { openRemoteImage } from "../src/devices/remote/index.ts";
import { NbdError } from "../src/protocol/errors.ts";
import { NBD_EIO } from "../src/protocol/constants.ts";
import { isPromise } from "../src/devices/types.ts";
import { bytesEqual, deadline, rejects } from "./helpers/assert.ts";
import { need, scratch } from "./helpers/env.ts";
import { makeImage } from "./helpers/remote-images.ts";
import { serve, waitForOutput, type Served } from "./helpers/server.ts";
import { guardedSuite } from "./interop-lib.ts";
import { startNginx, type Nginx } from "./services/nginx.ts";

const KiB = 1024, MiB = 1024 * KiB, BS = 64 * KiB;
const dir = scratch("bun-nbd-remote-faults-");
let ngx: Nginx;
let image: Uint8Array, here: Uint8Array;
let herePath = "";

const { test, run } = guardedSuite("remote over http: 5xx, stalls, recovery", async () => {
  need("nginx");
  ngx = await startNginx();
  image = readFileSync(makeImage(join(ngx.root, "f.img"), 8 * MiB, 31));
  here = readFileSync(herePath = makeImage(join(dir, "here.img"), MiB, 32));
  for (const d of ["stall", "slow"]) {
    mkdirSync(join(ngx.root, d));
    symlinkSync(join(ngx.root, "f.img"), join(ngx.root, d, "f.img"));
  }
});

const slice = (off: number, len: number) => image.subarray(off, off + len);
const range = (off: number, len: number) => `bytes=${off}-${off + len - 1}`;
/** The answers nginx logged for `uri` and `rangeText` since request number `from`. */
const answers = (from: number, rangeText: string) => ngx.requests("/f.img").slice(from).filter((r) => r.range === rangeText);

async function until(what: string, ok: () => boolean, ms = 10_000): Promise<void> {
  for (const end = Date.now() + ms; !ok(); await Bun.sleep(20)) if (Date.now() > end) assert.unreachable(`${what}: not within ${ms} ms`);
}
async function stopped(s: Served): Promise<void> {
  assert.is(await s.stop(), 0, `server exit status; output:\n${s.output()}`);
}

test("503 for a while: the read is retried with backoff and answered once nginx serves again, within the deadline; the log says why", () => deadline(60_000, "503 then healthy", async () => {
  const s = await serve(["--no-cache", "--block-size", "64K", "--readahead", "0", "--remote-deadline", "20", ngx.url("f.img")]);
  let c: NbdClient | null = null;
  try {
    c = await connect(s.uri("f"));
    bytesEqual(await c.read(0, BS), slice(0, BS), "block 0 before the fault");
    const from = ngx.requests("/f.img").length;
    ngx.fail(503);
    const t0 = Date.now();
    const pending = c.read(2 * MiB, BS);
    let settled = false;
    pending.then(() => { settled = true; }, () => { settled = true; });
    await until("four 503 answers to the read's GET", () => answers(from, range(2 * MiB, BS)).filter((r) => r.status === 503).length >= 4);
    assert.not.ok(settled, "the read waits while nginx answers 503");
    const tries = answers(from, range(2 * MiB, BS));
    // backoff: the sleeps before attempts 2-4 are at least 50 + 100 + 200 ms (jittered from 100, 200, 400)
    assert.ok(tries[3]!.start - tries[0]!.start >= 0.34, `attempts 1-4 within ${(tries[3]!.start - tries[0]!.start).toFixed(3)} s: no backoff`);
    ngx.fail(null);
    bytesEqual(await pending, slice(2 * MiB, BS), "the read that waited out the 503s");
    const took = Date.now() - t0;
    assert.ok(took < 20_000, `answered after ${took} ms, within the 20 s deadline`);
    const last = answers(from, range(2 * MiB, BS)).at(-1)!;
    assert.is(last.status, 206, "the last attempt got the bytes");
    await waitForOutput(s, /f\.img: HTTP 503 Service Temporarily Unavailable; retrying with backoff for up to 20 s per request/);
    await waitForOutput(s, /f\.img answers again \(after \d+ retried attempts\)/);
    assert.not.match(s.output(), /gave up/, "nothing gave up");
  } finally {
    ngx.fail(null);
    await c?.close();
    await stopped(s);
  }
}));

test("502 past a short deadline: EIO for that read and a log line saying why; the connection, other requests and another export go on; the range reads once nginx is back", () => deadline(60_000, "502 past the deadline", async () => {
  const s = await serve(["--no-cache", "--block-size", "64K", "--readahead", "0", "--remote-deadline", "1", ngx.url("f.img"), herePath]);
  let c: NbdClient | null = null, local: NbdClient | null = null;
  try {
    c = await connect(s.uri("f"));
    local = await connect(s.uri("here"));
    bytesEqual(await c.read(0, BS), slice(0, BS), "block 0 before the fault");
    const from = ngx.requests("/f.img").length;
    ngx.fail(502);
    const t0 = Date.now();
    const failing = c.read(3 * MiB, BS);
    failing.catch(() => {});
    // while that read is being retried: a cached read on the same connection and the local export answer at once
    await until("the first 502", () => answers(from, range(3 * MiB, BS)).length >= 1);
    const t1 = Date.now();
    bytesEqual(await c.read(100, 4096), slice(100, 4096), "a cached read on the same connection, meanwhile");
    bytesEqual(await local.read(4096, 8192), here.subarray(4096, 12288), "another export, meanwhile");
    assert.ok(Date.now() - t1 < 500, `those took ${Date.now() - t1} ms while a GET was being retried`);
    const e = await rejects(() => failing, "a read while nginx answers 502");
    const took = Date.now() - t0;
    assert.instance(e, NbdRequestError);
    assert.is((e as NbdRequestError).code, "EIO");
    assert.ok(took >= 900 && took < 5000, `EIO after ${took} ms (deadline 1 s)`);
    const tries = answers(from, range(3 * MiB, BS));
    assert.ok(tries.length >= 2 && tries.every((r) => r.status === 502), `retried: ${tries.map((r) => r.status).join(" ")}`);
    await waitForOutput(s, new RegExp(`bytes ${3 * MiB}-${3 * MiB + BS - 1} of http://127\\.0\\.0\\.1:\\d+/f\\.img: HTTP 502 Bad Gateway \\(gave up after \\d+ attempts in 1\\.\\d s\\): the reads waiting for them get EIO`));
    // still failing: the same connection still reads what is cached, the local export still serves
    bytesEqual(await c.read(0, BS), slice(0, BS), "the same connection after its EIO, cached block");
    bytesEqual(await local.read(0, MiB), here, "the local export after the EIO");
    ngx.fail(null);
    bytesEqual(await c.read(3 * MiB, BS), slice(3 * MiB, BS), "the failed range on the same connection, nginx back");
    bytesEqual(await c.read(5 * MiB, 2 * BS), slice(5 * MiB, 2 * BS), "a range never read before");
    assert.is(s.proc.exitCode, null, "the server is still running");
  } finally {
    ngx.fail(null);
    await c?.close();
    await local?.close();
    await stopped(s);
  }
}));

test("a stalled transfer: each attempt is cut after the attempt timeout and retried, then EIO at the deadline; a slow one that moves is waited for", () => deadline(60_000, "stall", async () => {
  const opts = { cacheDir: null, blockSize: BS, readahead: 0, smallReads: "blocks" as const, deadlineMs: 5000, attemptTimeoutMs: 2000 };
  const read = async (d: Awaited<ReturnType<typeof openRemoteImage>>, off: number, len: number) => {
    const b = new Uint8Array(len);
    const r = d.pread(b, off, 0);
    if (isPromise(r)) await r;
    return b;
  };
  const lines: string[] = [];
  // /stall/ sends the first 2 KiB of an answer (enough for the probe at open), then next to nothing
  const stalled = await openRemoteImage(ngx.url("stall/f.img"), opts, (m) => lines.push(m));
  try {
    const t0 = Date.now();
    // two blocks in one GET: an answer over 64 KiB is streamed, so its first bytes arrive before the stall
    const e = await rejects(() => read(stalled, MiB, 2 * BS), "a read of a stalled transfer");
    const took = Date.now() - t0;
    assert.instance(e, NbdError);
    assert.is((e as NbdError).errno, NBD_EIO);
    assert.match(e.message, /timed out \(gave up after (\d+) attempts in [4-6]\.\d s\)/, e.message);
    const attempts = Number(/gave up after (\d+) attempts/.exec(e.message)![1]);
    assert.ok(attempts >= 2, `attempts: ${attempts}`);
    assert.ok(took >= 4000 && took < 8000, `EIO after ${took} ms (deadline 5 s)`);
    assert.is(stalled.counters.retries, attempts - 1);
    assert.ok(stalled.counters.bytesFetched > 0 && stalled.counters.bytesFetched < 2 * BS, `bytes received: ${stalled.counters.bytesFetched}`);
    assert.ok(lines.some((l) => /stall\/f\.img: reading bytes \d+-\d+: timed out; retrying with backoff/.test(l)), lines.join("\n"));
  } finally { await stalled.close(); }
  // /slow/ sends 128 KiB/s in bursts a second apart: 512 KiB take 3 s, longer than the attempt
  // timeout, but bytes keep coming
  const slow = await openRemoteImage(ngx.url("slow/f.img"), opts, () => {});
  try {
    const t0 = Date.now();
    bytesEqual(await read(slow, 2 * MiB, 8 * BS), slice(2 * MiB, 8 * BS), "a slow transfer");
    assert.ok(Date.now() - t0 >= 2000, `took ${Date.now() - t0} ms: it was slow`);
    assert.is(slow.counters.retries, 0, "a transfer that moves is not cut");
  } finally { await slow.close(); }
}));

run();
