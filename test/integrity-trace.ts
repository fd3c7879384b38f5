// Integrity traces (test/helpers/trace.ts) against real servers: every export kind below, over TCP
// and a unix socket (raw, overlays with both L2 kinds, a per-client overlay), through EXPORT_NAME (no block sizes: payloads up to the 64 MiB limit, simple
// replies) and GO (block sizes asked: payloads up to the advertised maximum, structured replies).
// Each READ is checked against the last write to each sector, then the whole export at the end.
// CI runs short traces; TRACE_OPS=50000 (and TRACE_SEED) for long ones.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { closeSync, mkdirSync, openSync, readFileSync, writeSync } from "node:fs";
import { join } from "node:path";
import { deadline } from "./helpers/assert.ts";
import { need, runOk, scratch } from "./helpers/env.ts";
import { serve } from "./helpers/server.ts";
import {
  type HandshakePath, SECTOR, SectorModel, TraceConnection, type TraceTarget, generateTrace, runTrace, stamp, verifyAll,
} from "./helpers/trace.ts";

const MiB = 1024 * 1024;
const SIZE = 128 * MiB;
const OPS = Number(process.env.TRACE_OPS ?? 250);
const SEED = Number(process.env.TRACE_SEED ?? 16);

/**
 * The export kinds: `serve` arguments for an image whose initial content is `img` (stamped as
 * write 0), and whether `img` must stay untouched (a base under an overlay). Adding a kind is one line.
 */
const KINDS: { name: string; args: (dir: string, img: string) => string[]; baseUntouched: boolean; overlay?: string; exportName?: string }[] = [
  { name: "raw", args: (_d, img) => [img], baseUntouched: false },
  { name: "overlay, extended L2", args: (d, img) => ["--overlay", join(d, "ext.qcow2"), img], baseUntouched: true, overlay: "ext.qcow2" },
  { name: "overlay, standard L2", args: (d, img) => ["--compat", "--overlay", join(d, "std.qcow2"), img], baseUntouched: true, overlay: "std.qcow2" },
  // every connection names the same client, so all of them write to (and read back) one overlay
  {
    name: "per-client overlay", args: (d, img) => (mkdirSync(join(d, "pc")), ["--per-client-overlay", join(d, "pc"), img]),
    baseUntouched: true, overlay: "pc/disk@vm1.qcow2", exportName: "disk@vm1",
  },
];

/** Write a SIZE image whose every sector is stamped as write 0. */
function makeImage(path: string): void {
  const fd = openSync(path, "w");
  const chunk = new Uint8Array(8 * MiB);
  for (let off = 0; off < SIZE; off += chunk.length) {
    stamp(chunk, 0, 0, off / SECTOR, chunk.length / SECTOR);
    writeSync(fd, chunk, 0, chunk.length, off);
  }
  closeSync(fd);
}

const test = suite("integrity traces");

KINDS.forEach((kind, ki) => {
  test(`${kind.name}: ${OPS}-request traces over TCP and unix, EXPORT_NAME and GO, then the whole export`, () => deadline(300_000 + OPS * 40, kind.name, async () => {
    const dir = scratch("bun-nbd-trace-");
    const img = join(dir, "disk.img");
    makeImage(img);
    const before = kind.baseUntouched ? Bun.hash(readFileSync(img)) : 0;
    const sock = join(dir, "trace.sock");
    const srv = await serve(["-q", "-p", "0", ...kind.args(dir, img)], { socket: sock });
    const model = new SectorModel(SIZE);
    const ids = { next: 1 };
    const runs: [TraceTarget, HandshakePath][] = [
      [{ port: srv.port }, "export-name"], [{ path: sock }, "go"], [{ path: sock }, "export-name"], [{ port: srv.port }, "go"],
    ];
    try {
      for (const [i, [target, path]] of runs.entries()) {
        const c = await TraceConnection.open(target, path, kind.exportName);
        assert.is(c.size, SIZE);
        // Huge requests: up to the 64 MiB hard limit without block sizes, the advertised maximum with them.
        const huge = path === "export-name" ? (i % 2 ? 48 * MiB : 64 * MiB) : c.maxPayload;
        // One huge request mid-trace (one per 20000 requests in long runs).
        const hugeEvery = Math.max(2, Math.min(20_000, Math.floor(OPS / 2) + 1));
        const trace = generateTrace(SEED * 1000 + ki * 10 + i, { ops: OPS, size: SIZE, hugeEvery, hugeLength: huge });
        const t0 = Date.now();
        const r = await runTrace(c, trace, model, ids);
        if (process.env.TRACE_VERBOSE) console.log(`  ${kind.name} ${"port" in target ? "tcp" : "unix"} ${path}: ${r.ops} requests (${r.writes} writes, ${r.reads} reads, ${r.flushes} flushes, largest ${r.largest >> 20} MiB, ${(r.bytesWritten / MiB).toFixed(0)} MiB written) in ${Date.now() - t0} ms`);
        assert.ok(r.reads > 0 && r.writes > 0 && r.flushes > 0, "the trace mixes reads, writes and flushes");
        assert.is(r.largest, Math.min(huge, c.maxPayload), "the trace reached its huge request size");
        await c.close();
      }
      const c = await TraceConnection.open({ path: sock }, "go", kind.exportName);
      await verifyAll(c, model);
      await c.close();
    } finally {
      await srv.stop();
    }
    if (kind.baseUntouched) assert.is(Bun.hash(readFileSync(img)), before, "the base image is untouched");
    if (kind.overlay) {
      need("qemu-img");
      await runOk(["qemu-img", "check", join(dir, kind.overlay)]);
    }
  }));
});

test.run();
