// CUE sheet parsing: one test per lenient quirk (accepted, with the right layout), one per strict
// rejection (the message names the line), and hostile sheets (a quick, clear error).
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { copyFileSync, mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseCue } from "../src/devices/cd/cue.ts";
import { loadDisc } from "../src/devices/cd/index.ts";
import type { CdDisc } from "../src/devices/cd/disc.ts";
import { scratch } from "./helpers/env.ts";
import { fix } from "./cd-helpers.ts";

const test = suite("cd cue");
const dir = scratch("bun-nbd-cue-");
copyFileSync(fix("disc1/disc1.bin"), join(dir, "data.bin"));
copyFileSync(fix("mixed/mixed.bin"), join(dir, "Mixed Disc.BIN"));
mkdirSync(join(dir, "Sub Dir"));
copyFileSync(fix("disc1/disc1.bin"), join(dir, "Sub Dir", "Track01.bin"));

const STD = `FILE "data.bin" BINARY\n  TRACK 01 MODE1/2352\n    INDEX 01 00:00:00\n`;
let n = 0;

function write(text: string | Uint8Array): string {
  const p = join(dir, `sheet${++n}.cue`);
  writeFileSync(p, text);
  return p;
}

function load(text: string | Uint8Array): CdDisc {
  const d = loadDisc(write(text));
  d.close();
  return d;
}

/** Loading must fail quickly with a message matching `re` (and naming the line when given). */
function rejects(text: string | Uint8Array, re: RegExp, line?: number): string {
  const p = write(text);
  const t0 = performance.now();
  let msg = "";
  try {
    loadDisc(p).close();
  } catch (e) {
    msg = (e as Error).message;
  }
  const ms = performance.now() - t0;
  assert.ok(msg !== "", `expected an error for ${p}`);
  assert.match(msg, re);
  if (line !== undefined) assert.ok(msg.startsWith(`${p}:${line}:`), `message names line ${line}: ${msg}`);
  assert.ok(ms < 2000, `took ${ms.toFixed(0)} ms`);
  return msg;
}

function layout(d: CdDisc): string {
  return d.tracks.map((t) => `${t.number}:${t.mode.name}@${t.index1Lba}+${t.length}`).join(" ") + ` lo=${d.leadout}`;
}

// ---- lenient quirks -------------------------------------------------------------------------

test("the standard sheet", () => {
  const d = load(STD);
  assert.is(layout(d), "1:MODE1/2352@0+448 lo=448");
  assert.equal(d.warnings, []);
});

test("keywords in any case", () => {
  assert.is(layout(load(`file "data.bin" binary\n  track 01 mode1/2352\n    Index 01 00:00:00\n`)), "1:MODE1/2352@0+448 lo=448");
});

test("CRLF, CR-only and mixed line ends", () => {
  assert.is(layout(load(STD.replace(/\n/g, "\r\n"))), "1:MODE1/2352@0+448 lo=448");
  assert.is(layout(load(STD.replace(/\n/g, "\r"))), "1:MODE1/2352@0+448 lo=448");
  assert.is(layout(load(`FILE "data.bin" BINARY\r\n  TRACK 01 MODE1/2352\r    INDEX 01 00:00:00\n`)), "1:MODE1/2352@0+448 lo=448");
});

test("UTF-8 BOM, UTF-16 BOMs, and latin-1 names", () => {
  assert.is(layout(load(Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from(STD)]))), "1:MODE1/2352@0+448 lo=448");
  assert.is(layout(load(Buffer.concat([Buffer.from([0xff, 0xfe]), Buffer.from(STD, "utf16le")]))), "1:MODE1/2352@0+448 lo=448");
  const be = Buffer.from(STD, "utf16le").swap16();
  assert.is(layout(load(Buffer.concat([Buffer.from([0xfe, 0xff]), be]))), "1:MODE1/2352@0+448 lo=448");
  copyFileSync(fix("disc1/disc1.bin"), join(dir, "caf\u00e9.bin"));
  const latin1 = Buffer.from(`FILE "caf\u00e9.bin" BINARY\n TRACK 01 MODE1/2352\n INDEX 01 00:00:00\n`, "latin1");
  assert.is(layout(load(latin1)), "1:MODE1/2352@0+448 lo=448");
});

test("tabs, indentation and trailing junk after the needed tokens", () => {
  const d = load(`FILE\t"data.bin"\tBINARY   \n\tTRACK\t01\tMODE1/2352  junk\n\t\tINDEX\t01\t00:00:00 extra words\n   \n`);
  assert.is(layout(d), "1:MODE1/2352@0+448 lo=448");
  assert.ok(d.warnings.some((w) => /trailing text after TRACK/.test(w)));
});

test("^Z and NUL padding at the end of the file", () => {
  assert.is(layout(load(STD + "\u001a")), "1:MODE1/2352@0+448 lo=448");
  assert.is(layout(load(Buffer.concat([Buffer.from(STD), Buffer.alloc(64)]))), "1:MODE1/2352@0+448 lo=448");
});

test("unquoted file name with spaces: everything up to the last token", () => {
  const d = load(`FILE Mixed Disc.BIN BINARY\n TRACK 01 MODE1/2352\n  INDEX 01 00:00:00\n TRACK 02 AUDIO\n  INDEX 01 00:05:73\n`);
  assert.is(layout(d), "1:MODE1/2352@0+448 2:AUDIO@448+750 lo=1198");
});

test("backslash separators and case-insensitive lookup per path component", () => {
  const d = load(`FILE "sub dir\\TRACK01.BIN" BINARY\n TRACK 01 MODE1/2352\n  INDEX 01 00:00:00\n`);
  assert.is(d.files[0]!.path, join(dir, "Sub Dir", "Track01.bin"));
  assert.ok(d.warnings.some((w) => /resolved to/.test(w)), "a case mismatch is reported");
});

test("file-name case mismatch next to the cue; absolute Windows path falls back to the basename", () => {
  assert.is(load(`FILE "DATA.BIN" BINARY\n TRACK 01 MODE1/2352\n  INDEX 01 00:00:00\n`).files[0]!.path, join(dir, "data.bin"));
  assert.is(load(`FILE "C:\\Users\\me\\Games\\data.bin" BINARY\n TRACK 01 MODE1/2352\n  INDEX 01 00:00:00\n`).files[0]!.path, join(dir, "data.bin"));
});

test("unpadded MSF times (0:0:0, 0:5:73)", () => {
  const d = load(`FILE "Mixed Disc.BIN" BINARY\n TRACK 01 MODE1/2352\n  INDEX 01 0:0:0\n TRACK 02 AUDIO\n  PREGAP 0:2:0\n  INDEX 01 0:5:73\n`);
  assert.is(layout(d), "1:MODE1/2352@0+448 2:AUDIO@598+750 lo=1348");
});

test("known metadata commands are ignored; unknown ones warn; a missing CDTEXTFILE is not fatal", () => {
  const d = load(`REM GENRE Rock\nCATALOG 1234567890123\nCDTEXTFILE "missing.cdt"\nTITLE "x"\nPERFORMER "y"\nFOO bar\n${STD}  FLAGS DCP\n  ISRC ABCDE1234567\n`);
  assert.is(layout(d), "1:MODE1/2352@0+448 lo=448");
  assert.equal(d.warnings.length, 1);
  assert.match(d.warnings[0]!, /:6: unknown command "FOO"/);
});

test("a FILE without TRACK is ignored with a warning", () => {
  const d = load(`FILE "nothere.bin" BINARY\n${STD}`);
  assert.is(layout(d), "1:MODE1/2352@0+448 lo=448");
  assert.ok(d.warnings.some((w) => /:1: FILE "nothere.bin" has no TRACK/.test(w)));
});

test("PREGAP (not in the file) and INDEX 00 (in the file) as in the mixed fixture", () => {
  const d = loadDisc(fix("mixed/mixed.cue"));
  d.close();
  const t = d.tracks;
  assert.is(layout(d), "1:MODE1/2352@0+448 2:AUDIO@598+375 3:AUDIO@1048+300 lo=1348");
  assert.is(t[1]!.index0Lba, 448);
  assert.is(t[1]!.pregap, 150);
  assert.is(t[1]!.byteOffset, 448 * 2352);
  assert.is(t[2]!.index0Lba, 973);
  assert.is(t[2]!.byteOffset, 823 * 2352);
});

test("multi-FILE (Redump split) gives the same layout", () => {
  const d = loadDisc(fix("split/mixed.cue"));
  d.close();
  assert.is(layout(d), "1:MODE1/2352@0+448 2:AUDIO@598+375 3:AUDIO@1048+300 lo=1348");
  assert.is(d.files.length, 3);
  assert.is(d.tracks[1]!.index0Lba, 448);
});

test("sector sizes differ inside one BIN: byte offsets accumulate per track", () => {
  const d = loadDisc(fix("mixedsizes/ms.cue"));
  d.close();
  assert.is(d.tracks[1]!.byteOffset, 917504);
  assert.is(d.tracks[1]!.index1Lba, 598);
});

test("a BIN that is not a whole number of sectors: the partial sector is dropped with a warning", () => {
  const p = join(dir, "partial.bin");
  writeFileSync(p, Buffer.concat([Buffer.from(new Uint8Array(2352 * 3)), Buffer.alloc(1000)]));
  const d = load(`FILE "partial.bin" BINARY\n TRACK 01 AUDIO\n  INDEX 01 00:00:00\n`);
  assert.is(d.tracks[0]!.length, 3);
  assert.ok(d.warnings.some((w) => /partial 2352-byte sector \(1000 bytes\); dropped/.test(w)));
});

test("REM SESSION: session 2 starts after lead-out 6750 + lead-in 4500 + a 150-sector pregap", () => {
  const d = load(`REM SESSION 01\nFILE "Mixed Disc.BIN" BINARY\n TRACK 01 AUDIO\n  INDEX 01 00:00:00\nREM SESSION 02\nFILE "data.bin" BINARY\n TRACK 02 MODE1/2352\n  INDEX 01 00:00:00\n`);
  assert.is(d.tracks[1]!.session, 2);
  assert.is(d.tracks[1]!.index1Lba, 1198 + 11400);
  assert.is(d.leadout, 1198 + 11400 + 448);
  const d3 = load(`FILE "data.bin" BINARY\n TRACK 01 MODE1/2352\n  INDEX 01 00:00:00\nREM SESSION 02\nFILE "data.bin" BINARY\n TRACK 02 MODE1/2352\n  INDEX 01 00:00:00\nREM SESSION 03\nFILE "data.bin" BINARY\n TRACK 03 MODE1/2352\n  INDEX 01 00:00:00\n`);
  assert.is(d3.tracks[2]!.index1Lba, d3.tracks[1]!.end + 2250 + 4500 + 150, "later sessions: lead-out 2250");
});

test("POSTGAP adds synthesized sectors after the track", () => {
  const d = load(`${STD}    POSTGAP 00:00:10\n`);
  assert.is(d.tracks[0]!.postgap, 10);
  assert.is(d.leadout, 458);
});

// ---- strict rejections ----------------------------------------------------------------------

test("a missing FILE names the line", () => {
  rejects(`REM x\nFILE "nope.bin" BINARY\n TRACK 01 MODE1/2352\n  INDEX 01 00:00:00\n`, /FILE "nope.bin" not found/, 2);
});

test("an unknown track mode names the line", () => {
  rejects(`FILE "data.bin" BINARY\n TRACK 01 MODE3/2352\n  INDEX 01 00:00:00\n`, /unknown track mode "MODE3\/2352"/, 2);
  rejects(`FILE "data.bin" BINARY\n TRACK 01\n  INDEX 01 00:00:00\n`, /has no mode/, 2);
});

test("MSF with ss >= 60 or ff >= 75 names the line", () => {
  rejects(`FILE "data.bin" BINARY\n TRACK 01 MODE1/2352\n  INDEX 01 00:60:00\n`, /seconds >= 60/, 3);
  rejects(`FILE "data.bin" BINARY\n TRACK 01 MODE1/2352\n  INDEX 01 00:00:75\n`, /frames >= 75/, 3);
  rejects(`FILE "data.bin" BINARY\n TRACK 01 MODE1/2352\n  PREGAP 1:2\n  INDEX 01 00:00:00\n`, /bad time "1:2"/, 3);
});

test("INDEX out of range names the line", () => {
  rejects(`FILE "data.bin" BINARY\n TRACK 01 MODE1/2352\n  INDEX 01 00:05:73\n`, /INDEX 01 of track 1 is out of range/, 3);
  rejects(`FILE "data.bin" BINARY\n TRACK 01 MODE1/2352\n  INDEX 01 00:00:00\n TRACK 02 AUDIO\n  INDEX 01 10:00:00\n`, /out of range: beyond the end/, 5);
  rejects(`FILE "data.bin" BINARY\n TRACK 01 MODE1/2352\n  INDEX 100 00:00:00\n`, /index number 100 is out of range/, 3);
  rejects(`FILE "data.bin" BINARY\n TRACK 01 MODE1/2352\n  INDEX 01 00:00:10\n  INDEX 02 00:00:05\n`, /INDEX 2 \(00:00:05\) is before INDEX 1/, 4);
  rejects(`FILE "data.bin" BINARY\n TRACK 01 MODE1/2352\n  INDEX 01 00:01:00\n TRACK 02 MODE1/2352\n  INDEX 01 00:00:10\n`, /not after track 1's INDEX 01/, 5);
});

test("structure errors name the line", () => {
  rejects(`TRACK 01 MODE1/2352\n INDEX 01 00:00:00\n`, /TRACK before any FILE/, 1);
  rejects(`FILE "data.bin" BINARY\nINDEX 01 00:00:00\n`, /INDEX before any TRACK/, 2);
  rejects(`FILE "data.bin" BINARY\n TRACK 01 MODE1/2352\n  INDEX 00 00:00:00\n`, /TRACK 01 has no INDEX 01/, 2);
  rejects(`FILE "data.bin" BINARY\n TRACK 01 MODE1/2352\n  INDEX 01 00:00:00\n TRACK 03 AUDIO\n  INDEX 01 00:01:00\n`, /track numbers must increase by 1/, 4);
  rejects(`FILE "data.bin" BINARY\n TRACK 01 MODE1/2352\n  INDEX 01 00:00:00\n  PREGAP 00:02:00\n`, /PREGAP must come before/, 4);
  rejects(`REM SESSION 02\n${STD}`, /REM SESSION 2 where session 1 was expected/, 1);
  rejects(`FILE "x.wav" WAVE\n TRACK 01 AUDIO\n  INDEX 01 00:00:00\n`, /FILE type WAVE needs decoding/, 1);
  rejects(`FILE "data.bin" ISO\n TRACK 01 AUDIO\n  INDEX 01 00:00:00\n`, /unknown FILE type "ISO"/, 1);
  rejects(`REM nothing here\n`, /no FILE with a TRACK found/);
  rejects(``, /no FILE with a TRACK found/);
});

// ---- hostile sheets -------------------------------------------------------------------------

test("huge numbers", () => {
  rejects(`FILE "data.bin" BINARY\n TRACK 4294967297 MODE1/2352\n  INDEX 01 00:00:00\n`, /bad track number/, 2);
  rejects(`FILE "data.bin" BINARY\n TRACK 100 MODE1/2352\n  INDEX 01 00:00:00\n`, /track number 100 is out of range \(1-99\)/, 2);
  rejects(`FILE "data.bin" BINARY\n TRACK 01 MODE1/2352\n  INDEX 01 99999999999:00:00\n`, /bad time/, 3);
  rejects(`FILE "data.bin" BINARY\n TRACK 01 MODE1/2352\n  PREGAP 9999:00:00\n  INDEX 01 00:00:00\n`, /out of range \(minutes > 999\)/, 3);
  rejects(`FILE "data.bin" BINARY\n TRACK 01 MODE1/2352\n  INDEX 01 999:59:74\n`, /out of range/, 3);
  rejects(`REM SESSION 1e9\n${STD}`, /bad session number/, 1);
});

test("10,000 tracks", () => {
  let s = `FILE "data.bin" BINARY\n`;
  for (let i = 1; i <= 10000; i++) s += ` TRACK ${String(i).padStart(2, "0")} MODE1/2352\n  INDEX 01 00:00:${String(i % 75).padStart(2, "0")}\n`;
  rejects(s, /track number 100 is out of range/, 2 * 99 + 2);
});

test("very long lines and oversized sheets", () => {
  rejects(`FILE "${"a".repeat(100000)}.bin" BINARY\n TRACK 01 MODE1/2352\n`, /line is 100018 characters long \(limit 4096\)/, 1);
  rejects(`FILE "${"a".repeat(2000)}.bin" BINARY\n TRACK 01 MODE1/2352\n  INDEX 01 00:00:00\n`, /FILE name is 2004 characters long/, 1);
  rejects(`REM ${"x".repeat(3000)}\n`.repeat(400), /too large for a disc descriptor/);
});

test("binary garbage", () => {
  const g = new Uint8Array(4096);
  let x = 12345;
  for (let i = 0; i < g.length; i++) { x = (x * 1103515245 + 12345) >>> 0; g[i] = x >>> 24; }
  g[0] = 0x41; // not a BOM
  rejects(g, /binary data|line is|no FILE/);
  rejects(Buffer.concat([Buffer.from(STD), Buffer.from([0x00, 0x01, 0x02]), Buffer.from("FILE x\n")]), /:4: binary data \(byte 0x00\)/);
  assert.throws(() => parseCue(new Uint8Array([0xff, 0xfe, 0x00, 0xd8, 0x41, 0x00]), "odd.cue"), /no FILE with a TRACK found/);
});

test.run();
