// Overlays over CD images through the real `serve` CLI: --snapshot and --overlay on a .cue, a
// CloneCD .ccd and a lone raw .bin serve the cooked data-track view (one export) with writes going
// to the overlay and the BIN untouched; the overlay records the disc, refuses another one, and
// QEMU's tools can check and compare it given the cooked bytes; commit is refused.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { copyFileSync, existsSync, mkdirSync, readFileSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { bytesEqual } from "./helpers/assert.ts";
import { BUN, CLI, need, run, runOk, scratch } from "./helpers/env.ts";
import { serve, type Served } from "./helpers/server.ts";
import { connect } from "../src/client/index.ts";
import { fix, H } from "./cd-helpers.ts";
import { assertClean, assertIdentical, noBacking, rawBacking, Rng, sha256 } from "./overlay-support.ts";

const test = suite("overlay-cd");
const dir = scratch("bun-nbd-overlay-cd-");
const COOKED = 448 * 2048;
const iso = fix("disc1_2048/disc1.iso"); // the cooked view's bytes, as a file (the source ISO)

test.before(() => need("qemu-img", "nbdinfo"));

function discDir(name: string): string {
  const d = join(dir, name);
  mkdirSync(d, { recursive: true });
  copyFileSync(fix("disc1/disc1.bin"), join(d, "disc1.bin"));
  copyFileSync(fix("disc1/disc1.cue"), join(d, "disc1.cue"));
  return d;
}

async function listed(srv: Served): Promise<{ name: string; size: number; description?: string }[]> {
  const r = await runOk(["nbdinfo", "--json", "--list", srv.uri()]);
  return (JSON.parse(r.stdout).exports as { "export-name": string; "export-size": number; description?: string }[])
    .map((e) => ({ name: e["export-name"], size: e["export-size"], description: e.description }));
}

/** Serve, check the single cooked export, write through it; returns what it now holds. */
async function writeThrough(args: string[], sock: string, name: string, seed: number, start?: Uint8Array): Promise<Uint8Array> {
  const srv = await serve(args, { socket: sock });
  try {
    const ex = await listed(srv);
    assert.is(ex.length, 1, `one export: ${JSON.stringify(ex)}`);
    assert.is(ex[0]!.name, name);
    assert.is(ex[0]!.size, COOKED, "the cooked view's size");
    assert.match(ex[0]!.description ?? "", /track 01 MODE1\/2352, cooked 2048-byte sectors.* through /);
    const nbd = await connect(srv.uri(name));
    const view = await nbd.read(0, COOKED);
    if (start) bytesEqual(view, start, "what the overlay held before");
    else assert.is(sha256Bytes(view), H.cooked, "the cooked view through the overlay");
    const rng = new Rng(seed);
    for (let k = 0; k < 20; k++) {
      const len = 1 + rng.int(30000);
      const off = rng.int(COOKED - len);
      const data = rng.bytes(len);
      view.set(data, off);
      await nbd.pwrite(data, off);
    }
    await nbd.zero(65536, 65536);
    view.fill(0, 65536, 131072);
    await nbd.flush();
    bytesEqual(await nbd.read(0, COOKED), view, "writes read back");
    await nbd.close();
    return view;
  } finally {
    assert.is(await srv.stop(), 0, srv.output());
  }
}

const sha256Bytes = (b: Uint8Array) => new Bun.CryptoHasher("sha256").update(b).digest("hex");

test("--snapshot disc.cue serves the cooked view; writes are thrown away, the BIN is untouched", async () => {
  const d = discDir("snap");
  const tmp = join(d, "tmp");
  mkdirSync(tmp);
  const saved = process.env.TMPDIR;
  process.env.TMPDIR = tmp;
  try {
    await writeThrough(["--snapshot", join(d, "disc1.cue")], join(d, "sock"), "disc1", 1);
    await writeThrough(["--snapshot", join(d, "disc1.cue")], join(d, "sock2"), "disc1", 2); // fresh again
  } finally {
    if (saved === undefined) delete process.env.TMPDIR; else process.env.TMPDIR = saved;
  }
  assert.equal(readdirSync(tmp), [], "nothing left behind");
  assert.is(sha256(join(d, "disc1.bin")), H.disc1Bin, "BIN unchanged");
});

test("--overlay x.qcow2 disc.cue: writes persist in the overlay; QEMU checks and compares it over the cooked bytes", async () => {
  const d = discDir("persist");
  const ov = join(d, "x.qcow2");
  const args = ["--overlay", ov, join(d, "disc1.cue")];
  const first = await writeThrough(args, join(d, "sock"), "disc1", 3);
  const second = await writeThrough(args, join(d, "sock2"), "disc1", 4, first);
  assert.is(sha256(join(d, "disc1.bin")), H.disc1Bin, "BIN unchanged");
  const info = JSON.parse((await runOk(["qemu-img", "info", "--output=json", ov])).stdout);
  assert.is(info["backing-filename"], "disc1.cue");
  assert.is(info["backing-filename-format"], "bun-nbd", "QEMU refuses to read the CUE text as the base");
  const q = await run(["qemu-img", "compare", ov, iso]);
  assert.is(q.code, 2, "qemu-img compare cannot open it with its base");
  assert.match(q.stderr, /Unknown driver 'bun-nbd'/);
  await assertClean(noBacking(ov), "qemu-img check of the overlay");
  writeFileSync(join(d, "expected.raw"), second);
  await assertIdentical(rawBacking(ov, iso), join(d, "expected.raw"), "qemu-img compare over the cooked ISO");
  const oi = await run([BUN, CLI, "overlay", "info", ov]);
  assert.is(oi.code, 0, oi.stderr);
  assert.match(oi.stdout, /format bun-nbd/);
  assert.match(oi.stdout, /base: +cd .*disc1\.cue \(cooked 2048-byte view of track 01 \(MODE1\/2352\)\), 917504 bytes, version sample-sha256:/);
  const c = await run([BUN, CLI, "overlay", "commit", ov]);
  assert.is(c.code, 1);
  assert.match(c.stderr, /refusing to commit .*x\.qcow2: its base is cd .*disc1\.cue .*not a raw file/);
  assert.is(sha256(join(d, "disc1.bin")), H.disc1Bin, "BIN unchanged after the refused commit");
});

test("an overlay refuses another disc, naming both", async () => {
  const d = discDir("other");
  const ov = join(d, "x.qcow2");
  const c = await run([BUN, CLI, "overlay", "create", ov, join(d, "disc1.cue")]);
  assert.is(c.code, 0, c.stderr);
  assert.match(c.stdout, /created .*x\.qcow2 over .*disc1\.cue \(cooked 2048-byte view of track 01 \(MODE1\/2352\)\)/);
  // the same disc with one changed byte of user data in sector 0
  const od = join(d, "changed");
  mkdirSync(od);
  const bin = new Uint8Array(readFileSync(join(d, "disc1.bin")));
  bin[16] = bin[16]! ^ 0xff;
  writeFileSync(join(od, "disc1.bin"), bin);
  copyFileSync(join(d, "disc1.cue"), join(od, "disc1.cue"));
  const r = await run([BUN, CLI, "serve", "-k", join(d, "sock"), "--overlay", ov, join(od, "disc1.cue")]);
  assert.is(r.code, 1);
  assert.match(r.stderr, /x\.qcow2: its base differs \(version\): it was made over cd .*\/other\/disc1\.cue .*; the base given is cd .*\/changed\/disc1\.cue/);
  // the same bytes as a MODE2 disc: another device stack
  const r2 = await run([BUN, CLI, "serve", "-k", join(d, "sock"), "--overlay", ov, fix("mode2/mode2.cue")]);
  assert.is(r2.code, 1);
  assert.match(r2.stderr, /its base differs \(device stack\)/);
  // the cooked bytes under another name: the opener sniffs an ISO (another device stack, same
  // version); and a plain raw file of the same size: not a device stack at all
  copyFileSync(iso, join(d, "cooked.raw"));
  const r3 = await run([BUN, CLI, "serve", "-k", join(d, "sock"), "--overlay", ov, join(d, "cooked.raw")]);
  assert.is(r3.code, 1);
  assert.match(r3.stderr, /its base differs \(kind, device stack\): it was made over cd .*disc1\.cue .*; the base given is iso .*cooked\.raw \(cooked\.raw: CD image/);
  writeFileSync(join(d, "zero.raw"), new Uint8Array(readFileSync(iso).length));
  const r4 = await run([BUN, CLI, "serve", "-k", join(d, "sock"), "--overlay", ov, join(d, "zero.raw")]);
  assert.is(r4.code, 1);
  assert.match(r4.stderr, /made over cd .*disc1\.cue .*not over the raw file .*zero\.raw/);
  assert.ok(!existsSync(join(d, "sock")));
});

test("while served, QEMU cannot write the BIN under the overlay", async () => {
  need("qemu-io");
  const d = discDir("lock");
  const srv = await serve(["--snapshot", join(d, "disc1.cue")], { socket: join(d, "sock") });
  try {
    const q = await run(["qemu-io", "-f", "raw", "-c", "write 0 512", join(d, "disc1.bin")]);
    assert.is.not(q.code, 0);
    assert.match(q.stderr + q.stdout, /Failed to get "write" lock/);
  } finally {
    await srv.stop();
  }
  await runOk(["qemu-io", "-f", "raw", "-c", "read 0 512", join(d, "disc1.bin")]);
  assert.is(sha256(join(d, "disc1.bin")), H.disc1Bin);
});

test("CloneCD .ccd and a lone raw .bin: --snapshot and --overlay serve the cooked view", async () => {
  const d = join(dir, "clone");
  mkdirSync(d, { recursive: true });
  copyFileSync(fix("disc1/disc1.bin"), join(d, "clone.img"));
  const entry = (n: number, point: string, plba: number, pmsf: [number, number, number]) =>
    `[Entry ${n}]\nSession=1\nPoint=${point}\nADR=0x01\nControl=0x04\nTrackNo=0\nAMin=0\nASec=0\nAFrame=0\nALBA=-150\nZero=0\nPMin=${pmsf[0]}\nPSec=${pmsf[1]}\nPFrame=${pmsf[2]}\nPLBA=${plba}\n`;
  writeFileSync(join(d, "clone.ccd"), [
    "[CloneCD]\nVersion=3\n[Disc]\nTocEntries=4\nSessions=1\nDataTracksScrambled=0\nCDTextLength=0\n[Session 1]\nPreGapMode=1\nPreGapSubC=0\n",
    entry(0, "0xa0", 4350, [1, 0, 0]), entry(1, "0xa1", 4350, [1, 0, 0]), entry(2, "0xa2", 448, [0, 7, 73]), entry(3, "0x01", 0, [0, 2, 0]),
    "[TRACK 1]\nMODE=1\nINDEX 1=0\n",
  ].join("").replace(/\n/g, "\r\n"));
  await writeThrough(["--snapshot", join(d, "clone.ccd")], join(d, "sock"), "clone", 5);
  const ccdOv = join(d, "clone.qcow2");
  await writeThrough(["--overlay", ccdOv, join(d, "clone.ccd")], join(d, "sock2"), "clone", 6);
  assert.is(sha256(join(d, "clone.img")), H.disc1Bin, "CloneCD image unchanged");
  copyFileSync(fix("disc1/disc1.bin"), join(d, "lone.bin"));
  await writeThrough(["--snapshot", join(d, "lone.bin")], join(d, "sock3"), "lone", 7);
  const loneOv = join(d, "lone.qcow2");
  const held = await writeThrough(["--overlay", loneOv, join(d, "lone.bin")], join(d, "sock4"), "lone", 8);
  await writeThrough(["--overlay", loneOv, join(d, "lone.bin")], join(d, "sock5"), "lone", 9, held);
  assert.is(sha256(join(d, "lone.bin")), H.disc1Bin, "lone BIN unchanged");
  // QEMU must not read the 2352-byte sectors as the base: the lone BIN is named with format bun-nbd
  const info = JSON.parse((await runOk(["qemu-img", "info", "--output=json", loneOv])).stdout);
  assert.equal([info["backing-filename"], info["backing-filename-format"]], ["lone.bin", "bun-nbd"]);
  await assertClean(noBacking(loneOv), "lone BIN overlay");
});

test.run();
