// CD images end to end through the real `serve` CLI: NBD_OPT_LIST shows the CD exports with their
// descriptions (nbdinfo --list); nbdcopy fetches a cooked export and isoinfo lists its files; and
// QEMU boots an El Torito CD (SeaBIOS, -accel tcg) from the cooked export of a MODE1/2352 BIN, of a
// data track followed by audio in one BIN, and of a MODE2/2352 BIN, each made in the test from an
// xorriso ISO with `bun-nbd cd make` and checked with `cd verify` first; and from the ISO itself,
// served as a CD, plain and xz-compressed.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { BUN, CLI, need, ROOT, run, runOk, scratch } from "./helpers/env.ts";
import { serve, type Served } from "./helpers/server.ts";
import { fix, H, fileSha } from "./cd-helpers.ts";

const test = suite("cd serve");
const dir = scratch("bun-nbd-cdserve-");
// The El Torito boot program is shared with the boot tests (source: test/e2e/boot/cdboot.S).
const cdboot = join(ROOT, "test/e2e/boot/cdboot.bin");
let server: Served | null = null;
let expectSerial: string[] = [];

function hash31(data: Uint8Array): string {
  let h = 0;
  for (const b of data) h = (Math.imul(h, 31) + b) >>> 0;
  return h.toString(16).toUpperCase().padStart(8, "0");
}

/** The El Torito test ISO around cdboot.bin, and the serial lines its boot must print. */
async function makeBootIso(path: string): Promise<void> {
  const root = join(dir, "iso-root");
  mkdirSync(root, { recursive: true });
  copyFileSync(cdboot, join(root, "cdboot.bin"));
  writeFileSync(join(root, "MARKER.TXT"), "CD-MARKER-FILE-CONTENT\n");
  const data = new Uint8Array(32768);
  const dv = new DataView(data.buffer);
  for (let i = 0; i < 32768; i += 8) dv.setUint32(i + 4, i); // 8-byte big-endian words = their offset
  writeFileSync(join(root, "DATA.BIN"), data);
  await runOk(["xorriso", "-as", "mkisofs", "-quiet", "-o", path, "-V", "NBDTESTCD",
    "-b", "cdboot.bin", "-no-emul-boot", "-boot-load-size", "4", root], { timeoutMs: 60_000 });
  expectSerial = ["CDBOOT OK drive=E0", "BPS=0800", "PVD CD001 VOLID=NBDTESTCD", ": CD-MARKER-FILE-CONTENT",
    "HASH31 DATA.BIN 16 BLOCKS", `: ${hash31(data)}`, "ALL-OK"];
}

test.before(async () => {
  need("qemu-system-x86_64", "xorriso", "isoinfo", "nbdinfo", "nbdcopy");
  const iso = join(dir, "boot.iso");
  await makeBootIso(iso);
  const cd = (...a: string[]) => runOk([BUN, CLI, "cd", ...a], { timeoutMs: 60_000 });
  await cd("make", iso, join(dir, "m1.cue"));
  await cd("make", iso, join(dir, "m2.cue"), "--mode", "MODE2");
  // data + two audio tracks in one BIN: the MODE1 BIN followed by the mixed fixture's audio
  const m1 = readFileSync(join(dir, "m1.bin"));
  const audio = readFileSync(fix("mixed/mixed.bin")).subarray(448 * 2352);
  writeFileSync(join(dir, "da.bin"), Buffer.concat([m1, audio]));
  const n = m1.length / 2352;
  const msf = (f: number) => `${String(Math.floor(f / 4500)).padStart(2, "0")}:${String(Math.floor(f / 75) % 60).padStart(2, "0")}:${String(f % 75).padStart(2, "0")}`;
  writeFileSync(join(dir, "da.cue"), `FILE "da.bin" BINARY\n  TRACK 01 MODE1/2352\n    INDEX 01 00:00:00\n  TRACK 02 AUDIO\n    PREGAP 00:02:00\n    INDEX 01 ${msf(n)}\n  TRACK 03 AUDIO\n    INDEX 00 ${msf(n + 375)}\n    INDEX 01 ${msf(n + 450)}\n`);
  for (const c of ["m1.cue", "m2.cue", "da.cue"]) {
    const v = await cd("verify", join(dir, c));
    assert.match(v.stdout, new RegExp(`${n} data sectors checked, 0 bad`));
  }
  // The ISO itself, served like a CD, and an xz-compressed copy of it (multi-block, random access).
  copyFileSync(iso, join(dir, "bootxz.iso"));
  await runOk(["xz", "-T1", "--block-size=65536", join(dir, "bootxz.iso")]);
  server = await serve([join(dir, "m1.cue"), join(dir, "m2.cue"), join(dir, "da.cue"), fix("mixed/mixed.cue"), iso, join(dir, "bootxz.iso.xz")]);
});

test.after(async () => {
  if (server) assert.is(await server.stop(), 0, "server exit status after SIGTERM");
});

test("nbdinfo --list shows every CD export with its description", async () => {
  const r = await runOk(["nbdinfo", "--list", "--json", server!.uri("")], { timeoutMs: 30_000 });
  const list = JSON.parse(r.stdout).exports as { "export-name": string; description?: string; "export-size": number; is_read_only: boolean }[];
  const get = (name: string) => {
    const e = list.find((x) => x["export-name"] === name);
    assert.ok(e, `export ${name} listed`);
    return e!;
  };
  for (const name of ["m1", "m1/t01", "m1/t01.raw", "m1/raw", "m2", "da", "da/t02.raw", "da/t03.raw", "mixed", "mixed/t01", "mixed/t02.raw", "mixed/t03.raw", "mixed/raw"]) {
    assert.ok(get(name).is_read_only, `${name} is read-only`);
  }
  assert.match(get("mixed").description ?? "", /mixed\.cue track 01 MODE1\/2352, cooked 2048-byte sectors, LBA 0-447 \(448 sectors\)/);
  assert.match(get("mixed/t03.raw").description ?? "", /AUDIO, 16-bit LE PCM .*LBA 1048-1347 \(300 sectors\)/);
  assert.match(get("m2").description ?? "", /MODE2\/2352/);
  assert.is(get("mixed")["export-size"], 917504);
  assert.is(get("mixed/raw")["export-size"], 3170496);
});

test("an .iso is served like a CD: read-only, 2048-byte blocks, described as ISO 9660 with El Torito", async () => {
  const r = await runOk(["nbdinfo", "--json", server!.uri("boot")], { timeoutMs: 30_000 });
  const e = JSON.parse(r.stdout).exports[0];
  assert.ok(e.is_read_only, "read-only without an overlay");
  assert.equal([e.block_size_minimum, e.block_size_preferred], [2048, 2048]);
  assert.match(e.description, /^boot\.iso: CD image, [\d.]+ MiB of 2048-byte sectors: ISO 9660 "NBDTESTCD".*El Torito/);
  const x = JSON.parse((await runOk(["nbdinfo", "--json", server!.uri("bootxz")], { timeoutMs: 30_000 })).stdout).exports[0];
  assert.match(x.description, /^bootxz\.iso\.xz: xz, \d+ blocks, .* uncompressed: CD image, .*: ISO 9660 "NBDTESTCD".*El Torito/);
  assert.equal([x.block_size_minimum, x["export-size"], x.is_read_only], [2048, e["export-size"], true]);
});

test("nbdcopy of the cooked export equals the ISO; isoinfo lists its files", async () => {
  const out = join(dir, "fetched.iso");
  await runOk(["nbdcopy", server!.uri("mixed"), out], { timeoutMs: 60_000 });
  assert.is(fileSha(out), H.cooked);
  const r = await runOk(["isoinfo", "-l", "-i", out], { timeoutMs: 30_000 });
  for (const f of ["README.TXT", "RANDOM.BIN", "PATTERN.TXT"]) assert.match(r.stdout, new RegExp(f.replace(".", "\\.")));
  const raw = join(dir, "fetched.raw");
  await runOk(["nbdcopy", server!.uri("mixed/raw"), raw], { timeoutMs: 60_000 });
  assert.is(fileSha(raw), H.mixedDiscRaw);
});

async function bootCd(name: string): Promise<void> {
  const t0 = performance.now();
  const r = await run(["qemu-system-x86_64", "-accel", "tcg", "-nodefaults", "-display", "none", "-serial", "stdio",
    "-no-reboot", "-boot", "reboot-timeout=0", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
    "-drive", `file=${server!.uri(name)},format=raw,media=cdrom,readonly=on`], { timeoutMs: 60_000 });
  const secs = ((performance.now() - t0) / 1000).toFixed(2);
  const serial = r.stdout.replace(/\r/g, "");
  const why = `export ${name}: QEMU exit ${r.code} in ${secs} s\n${serial}\n${r.stderr}`;
  assert.is(r.code, 33, why);
  let from = 0;
  for (const e of expectSerial) {
    const i = serial.indexOf(e, from);
    assert.ok(i >= 0, `missing serial text ${JSON.stringify(e)}; ${why}`);
    from = i;
  }
}

test("QEMU boots the cooked export of a MODE1/2352 BIN", () => bootCd("m1"));
test("QEMU boots the cooked export of a data + audio BIN", () => bootCd("da"));
test("QEMU boots the cooked export of a MODE2/2352 BIN", () => bootCd("m2"));
test("QEMU boots the .iso served directly (2048-byte minimum block size)", () => bootCd("boot"));
test("QEMU boots an .iso.xz served from its compressed blocks", () => bootCd("bootxz"));

test.run();
