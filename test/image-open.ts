// The sniffing opener and the CD/ISO mistakes users make: content decides (an ISO named .img is
// served as an ISO, raw CD sectors named .raw as a CD, a sheet named .txt as a sheet, a qcow2
// overlay as itself); a CUE that says MODE1/2352 over a 2048-byte ISO, MODE1/2048 over raw
// sectors, or an ISO renamed .cue is refused with the fix in the message (also through `serve` and
// `cd info`); `cd make` does not overwrite without --force; `cd verify` summarises a wholly wrong
// image instead of printing a line per sector.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { copyFileSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { openExports } from "../src/devices/open.ts";
import { sniff } from "../src/devices/sniff.ts";
import type { ExportSpec } from "../src/devices/types.ts";
import { fix, H, readAll, sha256 } from "./cd-helpers.ts";
import { conformance } from "./helpers/conformance.ts";
import { BUN, CLI, need, run, runOk, scratch } from "./helpers/env.ts";

const test = suite("image opener");
const dir = scratch("bun-nbd-open-");
const p = (f: string) => join(dir, f);
const quiet = { log: () => {} };
const cli = (...a: string[]) => run([BUN, CLI, ...a], { timeoutMs: 60_000 });

async function opened(file: string, opts = {}): Promise<ExportSpec[]> {
  return openExports([file], { ...quiet, ...opts });
}
async function closeAll(es: ExportSpec[]): Promise<void> { for (const e of es) await e.device.close?.(); }
async function refused(file: string, re: RegExp): Promise<void> {
  try {
    await closeAll(await opened(file));
  } catch (e) {
    assert.match((e as Error).message, re);
    return;
  }
  assert.unreachable(`${file} was opened; expected ${re}`);
}

test("sniff: magic numbers decide, not names", () => {
  const probe = (head: number[] | Uint8Array, size = 1 << 20) => sniff({ head: Uint8Array.from(head), tail: new Uint8Array(0), size, name: "x" });
  assert.is(probe([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0]), "xz");
  assert.is(probe([0x1f, 0x8b, 8, 0]), "gzip");
  assert.is(probe([0x50, 0x4b, 3, 4]), "zip");
  assert.is(probe([0x51, 0x46, 0x49, 0xfb]), "qcow2");
  assert.is(probe(new TextEncoder().encode('REM x\r\nFILE "a.bin" BINARY\r\n'), 40), "cue");
  assert.is(probe(new TextEncoder().encode("[CloneCD]\nVersion=3\n"), 40), "ccd");
  assert.is(probe(new TextEncoder().encode("hello world, a plain text file\n"), 40), "raw");
  assert.is(probe(new Uint8Array(4096)), "raw");
  const iso = new Uint8Array(readFileSync(fix("disc1_2048/disc1.iso")).subarray(0, 36864));
  assert.is(probe(iso, 448 * 2048), "iso");
  assert.is(probe(iso, 448 * 2048 + 512), "raw", "an ISO's size is a whole number of 2048-byte sectors");
  const bin = new Uint8Array(readFileSync(fix("disc1/disc1.bin")).subarray(0, 36864));
  assert.is(probe(bin, 448 * 2352), "rawcd");
  const vhd = new Uint8Array(512);
  vhd.set(new TextEncoder().encode("conectix"));
  assert.is(sniff({ head: new Uint8Array(512), tail: vhd, size: 1 << 20, name: "d" }), "vhd");
});

test("an ISO named .img is served as an ISO; raw CD sectors named .raw as a CD; a sheet named .txt as a sheet", async () => {
  copyFileSync(fix("disc1_2048/disc1.iso"), p("disk.img"));
  const iso = await opened(p("disk.img"));
  assert.is(iso.length, 1);
  assert.match(iso[0]!.description ?? "", /^disk\.img: CD image, 0\.9 MiB of 2048-byte sectors$/);
  assert.not.ok(iso[0]!.device.capabilities().canWrite, "read-only");
  assert.equal(iso[0]!.device.blockSize?.(), { minimum: 2048, preferred: 2048, maximum: 32 * 1024 * 1024 });
  assert.is(sha256(readAll(iso[0]!.device)), H.cooked);
  await closeAll(iso);
  copyFileSync(fix("disc1/disc1.bin"), p("disc.raw"));
  const cd = await opened(p("disc.raw"));
  assert.equal(cd.map((e) => e.name), ["disc", "disc/t01", "disc/t01.raw", "disc/raw"]);
  assert.is(sha256(readAll(cd[0]!.device)), H.cooked);
  await closeAll(cd);
  copyFileSync(fix("disc1/disc1.bin"), p("disc1.bin"));
  writeFileSync(p("sheet.txt"), `FILE "disc1.bin" BINARY\n  TRACK 01 MODE1/2352\n    INDEX 01 00:00:00\n`);
  const sheet = await opened(p("sheet.txt"));
  assert.is(sheet[0]!.name, "sheet");
  assert.is(sha256(readAll(sheet[0]!.device)), H.cooked);
  await closeAll(sheet);
  writeFileSync(p("plain.img"), new Uint8Array(65536).fill(3));
  const plain = await opened(p("plain.img"));
  assert.match(plain[0]!.description ?? "", /raw image plain\.img/);
  assert.ok(plain[0]!.device.capabilities().canWrite, "a raw image stays read-write");
  await closeAll(plain);
});

test("a qcow2 overlay given as FILE is served as the overlay (base bytes, writable)", async () => {
  need("qemu-img");
  writeFileSync(p("base.img"), new Uint8Array(1 << 20).fill(9));
  await runOk(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.img", "-F", "raw", p("ov.qcow2")]);
  const es = await opened(p("ov.qcow2"));
  assert.match(es[0]!.description ?? "", /qcow2 overlay ov\.qcow2/);
  const b = new Uint8Array(4096);
  es[0]!.device.pread(b, 8192, 0);
  assert.ok(b.every((x) => x === 9), "reads the base through the overlay");
  assert.ok(es[0]!.device.capabilities().canWrite);
  await closeAll(es);
});

test("MODE1/2352 over a 2048-byte ISO, MODE1/2048 over raw sectors, an ISO named .cue: refused with the fix", async () => {
  copyFileSync(fix("disc1_2048/disc1.iso"), p("disc1.iso"));
  writeFileSync(p("wrong.cue"), `FILE "disc1.iso" BINARY\n  TRACK 01 MODE1/2352\n    INDEX 01 00:00:00\n`);
  await refused(p("wrong.cue"), /wrong\.cue:2: track 01 is declared MODE1\/2352, but "disc1\.iso" is a 2048-byte-sector ISO 9660 image \(no sync pattern, CD001 at byte 32769\): write MODE1\/2048 in the sheet, or make a real raw image with `bun-nbd cd make disc1\.iso NEW\.cue`, or serve the \.iso directly/);
  writeFileSync(p("cooked.cue"), `FILE "disc1.bin" BINARY\n  TRACK 01 MODE1/2048\n    INDEX 01 00:00:00\n`);
  await refused(p("cooked.cue"), /declared MODE1\/2048, but "disc1\.bin" holds raw 2352-byte sectors .*write MODE1\/2352/);
  copyFileSync(fix("disc1_2048/disc1.iso"), p("renamed.cue"));
  await refused(p("renamed.cue"), /renamed\.cue is not a CUE sheet but an ISO 9660 image \(CD001 at byte 32769\): rename it to \.iso and serve it directly/);
  // The same messages from the CLI, as one line and exit status 1, before anything listens.
  const s = await cli("serve", "-p", "0", p("wrong.cue"));
  assert.is(s.code, 1);
  assert.match(s.stderr, /bun-nbd serve: .*write MODE1\/2048 in the sheet/);
  const i = await cli("cd", "info", p("renamed.cue"));
  assert.is(i.code, 1);
  assert.match(i.stderr, /is not a CUE sheet but an ISO 9660 image/);
});

test("cd make does not overwrite an existing BIN/CUE without --force", async () => {
  const cue = p("made.cue");
  assert.is((await cli("cd", "make", fix("disc1_2048/disc1.iso"), cue)).code, 0);
  writeFileSync(p("made.bin"), "precious");
  const again = await cli("cd", "make", fix("disc1_2048/disc1.iso"), cue);
  assert.is(again.code, 1);
  assert.match(again.stderr, /made\.cue and .*made\.bin already exist: not overwriting \(use --force to replace\)/);
  assert.is(readFileSync(p("made.bin"), "utf8"), "precious");
  const forced = await cli("cd", "make", fix("disc1_2048/disc1.iso"), cue, "--force");
  assert.is(forced.code, 0, forced.stderr);
  assert.is(sha256(readFileSync(p("made.bin"))), H.disc1Bin);
});

test("cd verify lists the first bad sectors, then summarises", async () => {
  const bin = new Uint8Array(readFileSync(fix("disc1/disc1.bin")));
  for (let s = 0; s < 448; s++) bin[s * 2352 + 100]! ^= 0xff; // every sector's user data: EDC and ECC wrong
  writeFileSync(p("allbad.bin"), bin);
  writeFileSync(p("mode.cue"), `FILE "allbad.bin" BINARY\n  TRACK 01 MODE1/2352\n    INDEX 01 00:00:00\n`);
  const r = await cli("cd", "verify", p("mode.cue"));
  assert.is(r.code, 1);
  const lines = r.stdout.trim().split("\n");
  assert.is(lines.filter((l) => l.startsWith("bad sector")).length, 10, r.stdout);
  assert.match(r.stdout, /\.\.\. 438 more bad sectors, LBA 10-447: .*\(track 1: 438\)/);
  assert.match(r.stdout, /448 data sectors checked, 448 bad/);
  assert.ok(lines.length <= 13, `${lines.length} lines`);
});

test.run();

conformance("ISO view (an ISO named .img)", {
  make: async () => {
    copyFileSync(fix("disc1_2048/disc1.iso"), p("conf.img"));
    const [e] = await opened(p("conf.img"));
    return { device: e!.device, expected: new Uint8Array(readFileSync(fix("disc1_2048/disc1.iso"))), cleanup: () => e!.device.close?.() };
  },
  ops: 100,
});
