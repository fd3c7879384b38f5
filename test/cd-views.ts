// CD exports: every fixture's cooked view, audio tracks and whole-disc raw view against the
// README's hashes; unaligned reads; XA Form 2 sectors as EIO; MOTOROLA audio; synthesized gaps;
// CloneCD and lone raw .bin images; file handles released on close; the device conformance suite.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { copyFileSync, readFileSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { isCdImage, loadDisc, openCdImage } from "../src/devices/cd/index.ts";
import { checkSector, encodeMode1, encodeMode2Form2, RAW_SECTOR } from "../src/devices/cd/sector.ts";
import { NbdError } from "../src/protocol/errors.ts";
import { bytesEqual } from "./helpers/assert.ts";
import { conformance } from "./helpers/conformance.ts";
import { scratch } from "./helpers/env.ts";
import { byName, closeAll, fix, H, readAll, sha256 } from "./cd-helpers.ts";

const test = suite("cd views");
const dir = scratch("bun-nbd-cdviews-");
const iso = new Uint8Array(readFileSync(fix("disc1_2048/disc1.iso")));
const quiet = { log: () => {} };

async function exportsOf(path: string, name?: string) {
  const logs: string[] = [];
  const exps = await openCdImage(path, { name, log: (m) => logs.push(m) });
  return { exps, logs };
}

const CASES: [string, string][] = [
  ["disc1/disc1.cue", "disc1"], ["disc1_2048/disc1.cue", "disc1"], ["mixed/mixed.cue", "mixed"],
  ["split/mixed.cue", "mixed"], ["mode2/mode2.cue", "mode2"], ["mode2_2336/mode2.cue", "mode2"],
  ["mixedsizes/ms.cue", "ms"],
];

for (const [cue, base] of CASES) {
  test(`${cue}: the cooked view equals the expected ISO`, async () => {
    const { exps } = await exportsOf(fix(cue));
    try {
      const e = byName(exps, base);
      assert.is(e.device.size(), 448 * 2048);
      assert.is(e.device.capabilities().canWrite, false);
      assert.is(sha256(readAll(e.device)), H.cooked);
      assert.is(sha256(readAll(e.device, 65536 + 123)), H.cooked, "odd chunk sizes");
      assert.is(sha256(readAll(byName(exps, `${base}/t01`).device, 2047)), H.cooked, "t01 in 2047-byte reads");
      assert.match(e.description ?? "", /track 01 MODE[12]\/\d+, cooked 2048-byte sectors, LBA 0-447 \(448 sectors\)/);
    } finally {
      await closeAll(exps);
    }
  });
}

for (const cue of ["mixed/mixed.cue", "split/mixed.cue"]) {
  test(`${cue}: audio tracks and the whole-disc raw view`, async () => {
    const { exps } = await exportsOf(fix(cue));
    try {
      assert.equal(exps.map((e) => e.name), ["mixed", "mixed/t01", "mixed/t01.raw", "mixed/t02.raw", "mixed/t03.raw", "mixed/raw"]);
      assert.is(sha256(readAll(byName(exps, "mixed/t01.raw").device)), H.disc1Bin);
      assert.is(sha256(readAll(byName(exps, "mixed/t02.raw").device)), H.mixedT2);
      assert.is(sha256(readAll(byName(exps, "mixed/t03.raw").device, 10000)), H.mixedT3);
      const raw = byName(exps, "mixed/raw");
      assert.is(raw.device.size(), 3170496);
      assert.is(sha256(readAll(raw.device, 99999)), H.mixedDiscRaw);
      // track 3 from INDEX 00 is the disc raw view from LBA 973
      const all = readAll(raw.device);
      assert.is(sha256(all.subarray(973 * RAW_SECTOR, 1348 * RAW_SECTOR)), H.mixedT3FromIndex0);
      assert.match(raw.description ?? "", /LBA 0-1347, lead-out 1348, 3 track\(s\), 1 session/);
      assert.match(byName(exps, "mixed/t02.raw").description ?? "", /AUDIO, 16-bit LE PCM .*LBA 598-972 \(375 sectors\)/);
    } finally {
      await closeAll(exps);
    }
  });
}

test("mixedsizes: the audio track after a MODE1/2048 track", async () => {
  const { exps } = await exportsOf(fix("mixedsizes/ms.cue"));
  try {
    assert.is(sha256(readAll(byName(exps, "ms/t02.raw").device)), H.mixedT2);
    // the MODE1/2048 track as raw sectors is synthesized with EDC/ECC: it equals disc1.bin
    assert.is(sha256(readAll(byName(exps, "ms/t01.raw").device, 5000)), H.disc1Bin);
  } finally {
    await closeAll(exps);
  }
});

test("export names: opts.name replaces the base", async () => {
  const { exps } = await exportsOf(fix("mode2/mode2.cue"), "game");
  assert.equal(exps.map((e) => e.name), ["game", "game/t01", "game/t01.raw", "game/raw"]);
  await closeAll(exps);
});

for (const cue of ["mode2_2336/mode2.cue", "disc1/disc1.cue"]) {
  // (MODE2/2336 has a subheader to check per sector; MODE1/2352 does not)
  test(`single-sector and unaligned reads match the ISO at many offsets (${cue})`, async () => {
    const { exps } = await exportsOf(fix(cue));
    const dev = exps[0]!.device;
    try {
      for (const [off, len] of [[0, 1], [2047, 2], [2048, 2048], [2048, 4096], [100, 5000], [4096, 6144 + 1], [917504 - 3, 3], [400000, 123456], [0, 917504]] as const) {
        const b = new Uint8Array(len);
        dev.pread(b, off, 0);
        bytesEqual(b, iso.subarray(off, off + len), `read ${off}+${len}`);
      }
    } finally {
      await closeAll(exps);
    }
  });
}

test("an XA Form 2 sector inside a cooked view reads as EIO; the raw views still read it", async () => {
  const bin = new Uint8Array(readFileSync(fix("mode2/mode2.bin")));
  const o = 100 * RAW_SECTOR;
  bin.fill(0x33, o + 24, o + 24 + 2324);
  encodeMode2Form2(bin, o, 100);
  writeFileSync(join(dir, "form2.bin"), bin);
  writeFileSync(join(dir, "form2.cue"), `FILE "form2.bin" BINARY\n  TRACK 01 MODE2/2352\n    INDEX 01 00:00:00\n`);
  const { exps } = await exportsOf(join(dir, "form2.cue"));
  try {
    const dev = exps[0]!.device;
    let err: unknown;
    try { dev.pread(new Uint8Array(8192), 98 * 2048, 0); } catch (e) { err = e; }
    assert.instance(err, NbdError);
    assert.is((err as NbdError).errno, 5);
    assert.match((err as Error).message, /LBA 100 is XA Form 2/);
    const ok = new Uint8Array(2048);
    dev.pread(ok, 101 * 2048, 0);
    bytesEqual(ok, iso.subarray(101 * 2048, 102 * 2048), "the next sector");
    const raw = new Uint8Array(RAW_SECTOR);
    byName(exps, "form2/raw").device.pread(raw, o, 0);
    bytesEqual(raw, bin.subarray(o, o + RAW_SECTOR), "raw view of the Form 2 sector");
    assert.is(checkSector(raw, 0, 100), null, "a valid Form 2 sector");
  } finally {
    await closeAll(exps);
  }
});

test("MOTOROLA audio is byte-swapped to little-endian PCM", async () => {
  const le = readFileSync(fix("mixed/mixed.bin")).subarray(448 * RAW_SECTOR, 823 * RAW_SECTOR);
  const be = Buffer.from(le).swap16();
  assert.is(sha256(be), H.mixedT2Motorola);
  writeFileSync(join(dir, "moto.bin"), be);
  writeFileSync(join(dir, "moto.cue"), `FILE "moto.bin" MOTOROLA\n  TRACK 01 AUDIO\n    INDEX 01 00:00:00\n`);
  const { exps, logs } = await exportsOf(join(dir, "moto.cue"));
  try {
    assert.equal(exps.map((e) => e.name), ["moto/t01.raw", "moto/raw"], "no cooked export for an audio disc");
    assert.ok(logs.some((l) => /no data track/.test(l)));
    assert.is(sha256(readAll(exps[0]!.device, 3333)), H.mixedT2);
    assert.is(sha256(readAll(exps[1]!.device)), H.mixedT2);
  } finally {
    await closeAll(exps);
  }
});

test("synthesized gaps: data PREGAP/POSTGAP are valid empty sectors; cooked postgap reads as zeros", async () => {
  copyFileSync(fix("disc1/disc1.bin"), join(dir, "gaps.bin"));
  writeFileSync(join(dir, "gaps.cue"), `FILE "gaps.bin" BINARY\n  TRACK 01 MODE1/2352\n    PREGAP 00:00:05\n    INDEX 01 00:00:00\n    POSTGAP 00:00:20\n`);
  const { exps } = await exportsOf(join(dir, "gaps.cue"));
  try {
    const cooked = readAll(byName(exps, "gaps").device, 7777);
    assert.is(cooked.length, 468 * 2048);
    bytesEqual(cooked.subarray(0, 448 * 2048), iso, "track data");
    assert.ok(cooked.subarray(448 * 2048).every((b) => b === 0), "postgap as zeros");
    const raw = readAll(byName(exps, "gaps/raw").device);
    assert.is(raw.length, (5 + 448 + 20) * RAW_SECTOR);
    for (let lba = 0; lba < 5; lba++) assert.is(checkSector(raw, lba * RAW_SECTOR, lba), null, `pregap LBA ${lba}`);
    for (let lba = 453; lba < 473; lba++) assert.is(checkSector(raw, lba * RAW_SECTOR, lba), null, `postgap LBA ${lba}`);
    bytesEqual(raw.subarray(5 * RAW_SECTOR, 453 * RAW_SECTOR), new Uint8Array(readFileSync(fix("disc1/disc1.bin"))), "track data from LBA 5");
  } finally {
    await closeAll(exps);
  }
});

test("multi-session: data in session 2 at LBA 11700, session gap synthesized", async () => {
  // session 1: 150 sectors of audio; session 2: the ISO mastered at LBA 150 + 11400 = 11550
  const audio = new Uint8Array(150 * RAW_SECTOR).fill(0x11);
  const start = 150 + 11400;
  const data = new Uint8Array(448 * RAW_SECTOR);
  for (let i = 0; i < 448; i++) {
    data.set(iso.subarray(i * 2048, (i + 1) * 2048), i * RAW_SECTOR + 16);
    encodeMode1(data, i * RAW_SECTOR, start + i);
  }
  writeFileSync(join(dir, "extra (Track 1).bin"), audio);
  writeFileSync(join(dir, "extra (Track 2).bin"), data);
  writeFileSync(join(dir, "extra.cue"), [
    "REM SESSION 01", `FILE "extra (Track 1).bin" BINARY`, "  TRACK 01 AUDIO", "    INDEX 01 00:00:00",
    "REM SESSION 02", `FILE "extra (Track 2).bin" BINARY`, "  TRACK 02 MODE1/2352", "    INDEX 01 00:00:00", "",
  ].join("\r\n"));
  const { exps, logs } = await exportsOf(join(dir, "extra.cue"));
  try {
    assert.equal(logs, [], "headers agree with the computed LBAs");
    assert.equal(exps.map((e) => e.name), ["extra", "extra/t02", "extra/t01.raw", "extra/t02.raw", "extra/raw"]);
    assert.match(exps[0]!.description ?? "", /track 02 MODE1\/2352, cooked 2048-byte sectors, LBA 11550-11997/);
    assert.is(sha256(readAll(exps[0]!.device)), H.cooked);
    const raw = byName(exps, "extra/raw").device;
    assert.is(raw.size(), (start + 448) * RAW_SECTOR);
    const gap = new Uint8Array(RAW_SECTOR * 2);
    raw.pread(gap, 5000 * RAW_SECTOR, 0);
    assert.ok(gap.every((b) => b === 0), "lead-out/lead-in after an audio session: silence");
    raw.pread(gap, (start - 2) * RAW_SECTOR, 0);
    assert.is(checkSector(gap, 0, start - 2), null, "the 150-sector pregap of the data track is empty Mode 1 sectors");
    assert.is(checkSector(gap, RAW_SECTOR, start - 1), null);
  } finally {
    await closeAll(exps);
  }
});

test("a header that disagrees with the computed LBA is reported at load", async () => {
  // the session-2 data track of the previous test, but laid out as a single-session disc
  writeFileSync(join(dir, "wrong.cue"), `FILE "extra (Track 2).bin" BINARY\n  TRACK 01 MODE1/2352\n    INDEX 01 00:00:00\n`);
  const { exps, logs } = await exportsOf(join(dir, "wrong.cue"));
  await closeAll(exps);
  assert.ok(logs.some((l) => /track 1 sector at LBA 0: header address says LBA 11550, expected LBA 0/.test(l)), logs.join("\n"));
});

test("CloneCD: .ccd + .img (+ .sub) laid out from the TOC", async () => {
  const raw = await exportsOf(fix("mixed/mixed.cue"));
  writeFileSync(join(dir, "clone.img"), readAll(byName(raw.exps, "mixed/raw").device));
  await closeAll(raw.exps);
  writeFileSync(join(dir, "clone.sub"), new Uint8Array(1348 * 96));
  const entry = (n: number, point: string, control: number, plba: number, pmsf: [number, number, number]) =>
    `[Entry ${n}]\nSession=1\nPoint=${point}\nADR=0x01\nControl=0x0${control}\nTrackNo=0\nAMin=0\nASec=0\nAFrame=0\nALBA=-150\nZero=0\nPMin=${pmsf[0]}\nPSec=${pmsf[1]}\nPFrame=${pmsf[2]}\nPLBA=${plba}\n`;
  writeFileSync(join(dir, "clone.ccd"), [
    "[CloneCD]\nVersion=3\n[Disc]\nTocEntries=6\nSessions=1\nDataTracksScrambled=0\nCDTextLength=0\n[Session 1]\nPreGapMode=1\nPreGapSubC=0\n",
    entry(0, "0xa0", 4, 4350, [1, 0, 0]), entry(1, "0xa1", 0, 13350, [3, 0, 0]), entry(2, "0xa2", 0, 1348, [0, 19, 73]),
    entry(3, "0x01", 4, 0, [0, 2, 0]), entry(4, "0x02", 0, 598, [0, 9, 73]), entry(5, "0x03", 0, 1048, [0, 15, 73]),
    "[TRACK 1]\nMODE=1\nINDEX 1=0\n[TRACK 2]\nMODE=0\nINDEX 0=448\nINDEX 1=598\n[TRACK 3]\nMODE=0\nINDEX 0=973\nINDEX 1=1048\n",
  ].join("").replace(/\n/g, "\r\n"));
  assert.ok(isCdImage(join(dir, "clone.ccd")));
  const { exps } = await exportsOf(join(dir, "clone.ccd"));
  try {
    assert.equal(exps.map((e) => e.name), ["clone", "clone/t01", "clone/t01.raw", "clone/t02.raw", "clone/t03.raw", "clone/raw"]);
    assert.is(sha256(readAll(exps[0]!.device)), H.cooked);
    assert.is(sha256(readAll(byName(exps, "clone/t02.raw").device)), H.mixedT2);
    assert.is(sha256(readAll(byName(exps, "clone/t03.raw").device)), H.mixedT3);
    assert.is(sha256(readAll(byName(exps, "clone/raw").device)), H.mixedDiscRaw);
  } finally {
    await closeAll(exps);
  }
  writeFileSync(join(dir, "bad.ccd"), "[CloneCD]\nVersion=3\n[Entry 0]\nSession=1\nPoint=0x01\nPLBA=0\n[TRACK 1]\nMODE=7\n");
  copyFileSync(join(dir, "clone.img"), join(dir, "bad.img"));
  assert.throws(() => loadDisc(join(dir, "bad.ccd")), /bad\.ccd:8: unknown track mode MODE=7/);
  writeFileSync(join(dir, "empty.ccd"), "[CloneCD]\nVersion=3\n");
  assert.throws(() => loadDisc(join(dir, "empty.ccd")), /empty\.ccd: the TOC lists no tracks/);
  copyFileSync(join(dir, "clone.ccd"), join(dir, "nodata.ccd"));
  assert.throws(() => loadDisc(join(dir, "nodata.ccd")), /data file nodata\.img not found/);
  writeFileSync(join(dir, "junk.ccd"), "[CloneCD]\nthis is not a key\n");
  assert.throws(() => loadDisc(join(dir, "junk.ccd")), /junk\.ccd:2: expected "\[Section\]" or "key=value"/);
});

test("a lone raw .bin/.img is one cooked data track, with a notice; other files are not CD images", async () => {
  copyFileSync(fix("disc1/disc1.bin"), join(dir, "lone.img"));
  copyFileSync(fix("mode2/mode2.bin"), join(dir, "lone2.bin"));
  writeFileSync(join(dir, "plain.img"), new Uint8Array(2352 * 4));
  writeFileSync(join(dir, "odd.bin"), readFileSync(fix("disc1/disc1.bin")).subarray(0, 2352 * 3 + 1));
  assert.ok(isCdImage(join(dir, "lone.img")));
  assert.ok(isCdImage(join(dir, "lone2.bin")));
  assert.not.ok(isCdImage(join(dir, "plain.img")), "no sync pattern");
  assert.not.ok(isCdImage(join(dir, "odd.bin")), "size not a multiple of 2352");
  assert.not.ok(isCdImage(fix("disc1_2048/disc1.iso")));
  assert.not.ok(isCdImage(join(dir, "missing.bin")));
  assert.ok(isCdImage(join(dir, "whatever.CUE")), ".cue by extension");
  for (const f of ["lone.img", "lone2.bin"]) {
    const { exps, logs } = await exportsOf(join(dir, f));
    try {
      assert.ok(logs.some((l) => /no CUE sheet; serving it as one MODE[12]\/2352 data track of 448 sectors/.test(l)), logs.join());
      assert.is(sha256(readAll(exps[0]!.device)), H.cooked);
    } finally {
      await closeAll(exps);
    }
  }
});

test("files are opened read-only once and closed when the last export closes", async () => {
  const fds = () => readdirSync("/proc/self/fd").length;
  const before = fds();
  const { exps } = await exportsOf(fix("split/mixed.cue"));
  assert.is(fds(), before + 3, "one descriptor per BIN");
  await exps[0]!.device.close?.();
  await exps[0]!.device.close?.(); // twice is harmless
  assert.is(fds(), before + 3, "other exports still open");
  await closeAll(exps.slice(1));
  assert.is(fds(), before, "all closed");
  assert.throws(() => loadDisc(fix("split/missing.cue")), /ENOENT|no such file/i);
  assert.is(fds(), before, "nothing leaked by a failed load");
});

conformance("CD cooked view (MODE2/2352)", {
  make: async () => {
    const exps = await openCdImage(fix("mode2/mode2.cue"), quiet);
    return { device: exps[0]!.device, expected: iso, cleanup: () => closeAll(exps) };
  },
});
conformance("CD cooked view (MODE1/2352)", {
  make: async () => {
    const exps = await openCdImage(fix("disc1/disc1.cue"), quiet);
    return { device: exps[0]!.device, expected: iso, cleanup: () => closeAll(exps) };
  },
});
conformance("CD whole-disc raw view (mixed)", {
  make: async () => {
    const exps = await openCdImage(fix("mixed/mixed.cue"), quiet);
    const raw = byName(exps, "mixed/raw");
    const expected = readAll(raw.device);
    return { device: raw.device, expected, cleanup: () => closeAll(exps) };
  },
  ops: 100,
});

test.run();
