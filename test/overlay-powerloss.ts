// Power loss, not only process death: a seeded workload (writes, FUA writes, zeroes, trims, flushes,
// some flushes still running while the next requests arrive) runs on an overlay whose file I/O is recorded (helpers/powerloss.ts); then, at every completed
// fdatasync (and the end), the file states a power cut could leave are rebuilt: the durable prefix
// plus subsets of the later writes, in any order, some torn at 512-byte sectors. Every state must
// open, pass our refcount scan with no errors (leaks allowed), read back every byte acknowledged by
// a FLUSH or FUA write, and hold old-or-new bytes only where writes happened since. A sample goes
// through qemu-img check (0, or 3 = leaks only), QEMU's own read (qemu-img convert), and a read-write
// open that repairs the leaks. Knobs (long mode: bench/crash-long.sh): POWERLOSS_SEEDS, _OPS,
// _RANDOM (random subsets per crash point), _MAX (states per crash point), _QEMU_EVERY, _EXTRA_POINTS.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { need, run, scratch } from "./helpers/env.ts";
import { RecordingFile, statesFor, walkCrashPoints, type FileImage } from "./helpers/powerloss.ts";
import { createOverlayFile, openImage, type Qcow2Overlay } from "../src/devices/qcow2/index.ts";
import { FUA, MAY_TRIM } from "../src/devices/types.ts";
import { KiB, makeBase, MiB, Rng } from "./overlay-support.ts";

const test = suite("overlay-powerloss");
// Thousands of image files are written and read back: on tmpfs when there is one (on a disk file
// system, rewriting a file can cost a synchronous discard per state).
const dir = existsSync("/dev/shm") ? mkdtempSync("/dev/shm/bun-nbd-powerloss-") : scratch("bun-nbd-powerloss-");
process.on("exit", () => { if (!process.env.KEEP_SCRATCH) rmSync(dir, { recursive: true, force: true }); });

const env = (k: string, d: number) => Number(process.env[`POWERLOSS_${k}`] ?? d);
const SEEDS = env("SEEDS", 1);
const OPS = env("OPS", 30);
const RANDOM = env("RANDOM", 3);
const MAX = env("MAX", 6);
const QEMU_EVERY = env("QEMU_EVERY", 25);
/** Besides every completed sync and the end: this share of all other log positions as crash points. */
const EXTRA_POINTS = env("EXTRA_POINTS", 0);

test.before(() => need("qemu-img"));

interface Variant { name: string; compat: boolean; clusterBits: number; size: number; bigFirst: number }

const variants: Variant[] = [
  { name: "extended L2, 64 KiB clusters", compat: false, clusterBits: 16, size: 8 * MiB, bigFirst: 0 },
  { name: "standard L2, 64 KiB clusters", compat: true, clusterBits: 16, size: 8 * MiB, bigFirst: 0 },
  // 16 MiB per L2 table: new tables are made during the workload
  { name: "extended L2, 16 KiB clusters", compat: false, clusterBits: 14, size: 20 * MiB, bigFirst: 0 },
  // 2 MiB per L2 table, 8 MiB of file per refcount block: a first 9 MiB write makes a new
  // refcount block (committed with its own syncs), and the workload makes new L2 tables
  { name: "standard L2, 4 KiB clusters", compat: true, clusterBits: 12, size: 12 * MiB, bigFirst: 9 * MiB },
];

/** A guest operation: bytes written (data) or zeroed (data null). */
interface GuestOp { off: number; len: number; data: Uint8Array | null }

/** Marker tags in the recording: op i issued = i; ops [0, n) acknowledged durable = -n. */
interface Recorded { initial: Uint8Array; log: RecordingFile["log"]; ops: GuestOp[] }

async function runWorkload(v: Variant, d: string, basePath: string, seed: number): Promise<Recorded> {
  const ov = join(d, `ov-${seed}.qcow2`);
  createOverlayFile(ov, basePath, { compat: v.compat, clusterBits: v.clusterBits });
  const initial = new Uint8Array(readFileSync(ov));
  let rec: RecordingFile | null = null;
  const img = openImage(ov, { readOnly: false, lock: false, log: () => {}, wrapFile: (f) => (rec = new RecordingFile(f)) });
  const r = rec as unknown as RecordingFile;
  const rng = new Rng(seed);
  const ops: GuestOp[] = [];
  const cs = 2 ** v.clusterBits;
  const hot: number[] = [];
  const running: Promise<void>[] = [];
  let failed: unknown = null;
  const issue = async (op: GuestOp, act: () => unknown, durableAfter: boolean) => {
    r.mark(ops.length);
    ops.push(op);
    await act();
    if (durableAfter) r.mark(-ops.length);
  };
  if (v.bigFirst > 0) {
    const data = rng.bytes(v.bigFirst);
    await issue({ off: 0, len: data.length, data }, () => img.pwrite(data, 0, 0), false);
  }
  for (let k = 0; k < OPS; k++) {
    const kind = rng.int(100);
    if (kind < 22) {
      // every op issued before the flush is acknowledged durable once it returns; a third of the
      // flushes are left running while the next operations are issued (they land between its syncs)
      const n = ops.length;
      const f = img.flush(0).then(() => r.mark(-n));
      if (rng.int(3) === 0) running.push(f.catch((e: unknown) => { failed ??= e; }));
      else await f;
      continue;
    }
    const shape = rng.int(10);
    let len = shape < 3 ? 1 + rng.int(16) : shape < 6 ? 512 * (1 + rng.int(8)) : shape < 9 ? 1 + rng.int(3 * cs) : 1 + rng.int(256 * KiB);
    len = Math.min(len, v.size);
    let off: number;
    if (hot.length > 0 && rng.int(2) === 0) off = Math.min(v.size - len, Math.max(0, hot[rng.int(hot.length)]! + rng.int(2 * cs) - cs));
    else off = rng.int(v.size - len + 1);
    if (rng.int(3) === 0) off -= off % cs;
    hot.push(off);
    if (kind < 75) {
      const data = rng.bytes(len);
      const fua = rng.int(6) === 0;
      await issue({ off, len, data }, () => img.pwrite(data, off, fua ? FUA : 0), fua);
    } else if (kind < 90) {
      const flags = (rng.int(2) === 0 ? MAY_TRIM : 0) | (rng.int(8) === 0 ? FUA : 0);
      await issue({ off, len, data: null }, () => img.zero(off, len, flags), (flags & FUA) !== 0);
    } else {
      await issue({ off, len, data: null }, () => img.trim(off, len, 0), false);
    }
  }
  await Promise.all(running);
  if (failed !== null) throw failed;
  // the last state: what the file holds without a final flush
  return { initial, log: r.log, ops };
}

interface Stats { points: number; states: number; torn: number; leaky: number; qemu: number; qemuLeaks: number; repaired: number }

async function checkAll(v: Variant, d: string, base: Uint8Array, rec: Recorded, seed: number, stats: Stats): Promise<void> {
  const { log, ops } = rec;
  // per log position: ops issued before it, ops acknowledged durable before it
  const issued = new Int32Array(log.length + 1);
  const acked = new Int32Array(log.length + 1);
  for (let i = 0, is = 0, ak = 0; i <= log.length; i++) {
    issued[i] = is;
    acked[i] = ak;
    const e = log[i];
    if (e?.kind === "mark") {
      if (e.tag >= 0) is = e.tag + 1;
      else ak = Math.max(ak, -e.tag);
    }
  }
  const durableGuest = base.slice(0, v.size);
  let durableOps = 0;
  const guest = new Uint8Array(v.size);
  const rng = new Rng(seed * 7919);
  const statePath = join(d, "state.qcow2");
  let n = 0;
  const pointRng = new Rng(seed * 104729);
  const pick = (_at: number, beforeSync: boolean) => beforeSync || (EXTRA_POINTS > 0 && pointRng.int(1e6) < EXTRA_POINTS * 1e6);
  await walkCrashPoints(rec.initial, log, pick, async (p, image: FileImage) => {
    stats.points++;
    for (; durableOps < acked[p.at]!; durableOps++) applyOp(durableGuest, ops[durableOps]!);
    const maybe = ops.slice(durableOps, issued[p.at]!);
    for (const s of statesFor(p.pending, rng, RANDOM, true, MAX)) {
      await image.with(s.writes, async (img) => writeFileSync(statePath, img.view()));
      const where = `${v.name}, seed ${seed}, log entry ${p.at} (${p.pending.length} pending writes), state "${s.name}"`;
      stats.states++;
      if (s.torn) stats.torn++;
      const leaks = await readState(statePath, guest, where);
      if (leaks > 0) stats.leaky++;
      checkGuest(guest, durableGuest, maybe, where);
      if (++n % QEMU_EVERY === 1 || QEMU_EVERY === 1) await qemuSide(statePath, guest, leaks, where, stats, d);
    }
  });
}

/** Open a crash state read-only with our code: it must open and scan without errors. Returns the leaks. */
async function readState(path: string, guest: Uint8Array, where: string): Promise<number> {
  let img: Qcow2Overlay;
  try {
    img = openImage(path, { readOnly: true, lock: false, log: () => {} });
  } catch (e) {
    assert.unreachable(`${where}: the image does not open: ${(e as Error).message}`);
    throw e;
  }
  try {
    const r = img.scan(false);
    if (r.errors.length > 0) assert.unreachable(`${where}: refcount scan: ${r.errors.slice(0, 4).join("; ")}`);
    await img.pread(guest, 0, 0);
    return r.leaks;
  } finally {
    await img.close();
  }
}

function applyOp(to: Uint8Array, op: GuestOp): void {
  if (op.data) to.set(op.data, op.off);
  else to.fill(0, op.off, op.off + op.len);
}

/**
 * Acknowledged bytes exact; bytes of ops since the last acknowledgement old or new (the value of
 * any of them). Compared with memcmp run by run; byte by byte only where a run differs.
 */
function checkGuest(now: Uint8Array, durable: Uint8Array, maybe: GuestOp[], where: string): void {
  const runs = maybe.map((o) => [o.off, o.off + o.len] as [number, number]).sort((a, b) => a[0] - b[0]);
  const merged: [number, number][] = [];
  for (const r of runs) {
    const last = merged[merged.length - 1];
    if (last && r[0] <= last[1]) last[1] = Math.max(last[1], r[1]);
    else merged.push([r[0], r[1]]);
  }
  let p = 0;
  for (const [a, b] of [...merged, [now.length, now.length] as [number, number]]) {
    if (!same(now, durable, p, a)) exact(now, durable, p, a, where);
    if (a < b && !same(now, durable, a, b)) {
      for (let i = a; i < b; i++) {
        const v = now[i]!;
        if (v === durable[i] || maybe.some((o) => i >= o.off && i < o.off + o.len && v === (o.data ? o.data[i - o.off] : 0))) continue;
        assert.unreachable(`${where}: guest byte ${i} (0x${i.toString(16)}) is ${v}: neither its acknowledged value ${durable[i]} nor one written since`);
      }
    }
    p = b;
  }
}

function same(x: Uint8Array, y: Uint8Array, a: number, b: number): boolean {
  return a >= b || Buffer.compare(x.subarray(a, b), y.subarray(a, b)) === 0;
}

function exact(now: Uint8Array, want: Uint8Array, a: number, b: number, where: string): void {
  for (let i = a; i < b; i++) {
    if (now[i] !== want[i]) assert.unreachable(`${where}: guest byte ${i} (0x${i.toString(16)}) is ${now[i]}, acknowledged value ${want[i]}, and no write touched it since`);
  }
}

/** QEMU's view of a state: check (0 or leaks only), the same bytes, and leaks repaired by our read-write open. */
async function qemuSide(path: string, guest: Uint8Array, leaks: number, where: string, stats: Stats, d: string): Promise<void> {
  stats.qemu++;
  const chk = await run(["qemu-img", "check", "--output=json", path]);
  assert.ok(chk.code === 0 || chk.code === 3, `${where}: qemu-img check exit ${chk.code}: ${chk.stdout}${chk.stderr}`);
  if (chk.code === 3) {
    stats.qemuLeaks++;
    assert.ok(leaks > 0, `${where}: qemu-img check finds leaks our scan missed: ${chk.stdout}`);
  }
  const raw = join(d, "state.raw");
  const cv = await run(["qemu-img", "convert", "-O", "raw", path, raw]);
  assert.is(cv.code, 0, `${where}: qemu-img convert: ${cv.stderr}`);
  if (Buffer.compare(new Uint8Array(readFileSync(raw)), guest) !== 0) assert.unreachable(`${where}: QEMU reads other bytes than we do`);
  if (leaks > 0) {
    const img = openImage(path, { readOnly: false, lock: false, log: () => {} });
    await img.close();
    stats.repaired++;
    const after = await run(["qemu-img", "check", "--output=json", path]);
    assert.is(after.code, 0, `${where}: after a read-write open repaired the leaks, qemu-img check: ${after.stdout}`);
  }
}

for (const v of variants) {
  test(`power loss at every fdatasync: ${v.name}`, async () => {
    const d = join(dir, `${v.compat ? "std" : "ext"}-${v.clusterBits}`);
    mkdirSync(d, { recursive: true });
    const basePath = join(d, "base.img");
    const base = makeBase(basePath, v.size, v.clusterBits);
    const stats: Stats = { points: 0, states: 0, torn: 0, leaky: 0, qemu: 0, qemuLeaks: 0, repaired: 0 };
    const t0 = Date.now();
    let syncs = 0;
    let writes = 0;
    for (let s = 1; s <= SEEDS; s++) {
      const seed = v.clusterBits * 1000 + (v.compat ? 500 : 0) + s;
      const rec = await runWorkload(v, d, basePath, seed);
      syncs += rec.log.filter((e) => e.kind === "sync").length;
      writes += rec.log.filter((e) => e.kind === "write").length;
      await checkAll(v, d, base, rec, seed, stats);
    }
    console.log(`  ${v.name}: ${SEEDS} workload(s) of ${OPS} ops, ${writes} file writes, ${syncs} syncs; ` +
      `${stats.points} crash points, ${stats.states} states (${stats.torn} torn), ${stats.leaky} with leaks; ` +
      `${stats.qemu} through qemu-img check/convert (${stats.qemuLeaks} leaky, ${stats.repaired} repaired by a rw open); ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    assert.ok(stats.states > 20, "enough crash states");
  });
}

test.run();
