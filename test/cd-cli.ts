// `bun-nbd cd info|verify|make` run as the real CLI: the JSON track table, bad sectors found by
// LBA, and make's BIN/CUE round trip (byte-identical to the fixtures, then verified and read back).
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { copyFileSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { openCdImage } from "../src/devices/cd/index.ts";
import { BUN, CLI, run, scratch } from "./helpers/env.ts";
import { closeAll, fileSha, fix, H, readAll, sha256 } from "./cd-helpers.ts";

const test = suite("cd cli");
const dir = scratch("bun-nbd-cdcli-");
const cd = (...args: string[]) => run([BUN, CLI, "cd", ...args], { timeoutMs: 30_000 });

test("cd info --json: tracks, indexes, gaps, sessions and header checks of the mixed fixture", async () => {
  const r = await cd("info", fix("mixed/mixed.cue"), "--json");
  assert.is(r.code, 0, r.stderr);
  const d = JSON.parse(r.stdout);
  assert.is(d.format, "cue");
  assert.is(d.leadout, 1348);
  assert.equal(d.sessions, [{ number: 1, firstTrack: 1, lastTrack: 3, start: 0, end: 1348 }]);
  assert.equal(d.files, [{ name: "mixed.bin", path: fix("mixed/mixed.bin"), size: 2817696 }]);
  const pick = (t: Record<string, unknown>) => [t.number, t.mode, t.index00, t.index01, t.length, t.pregap, t.storedPregap, t.postgap, t.byteOffset];
  assert.equal(d.tracks.map(pick), [
    [1, "MODE1/2352", null, 0, 448, 0, 0, 0, 0],
    [2, "AUDIO", 448, 598, 375, 150, 0, 0, 448 * 2352],
    [3, "AUDIO", 973, 1048, 300, 0, 75, 0, 823 * 2352],
  ]);
  assert.equal(d.tracks[0].headers, { first: "ok", last: "ok" });
  assert.equal(d.tracks[1].headers, { first: "n/a", last: "n/a" });
  assert.equal(d.warnings, []);
});

test("cd info (text) and a wrong header reported with a non-zero exit", async () => {
  const r = await cd("info", fix("split/mixed.cue"));
  assert.is(r.code, 0, r.stderr);
  assert.match(r.stdout, /3 track\(s\), 1 session\(s\), lead-out LBA 1348 \(00:19:73\)/);
  assert.match(r.stdout, /02\s+1\s+AUDIO\s+448\s+598\s+375\s+0\s+150\s+0\s+n\/a\s+mixed \(Track 2\)\.bin/);
  // a MODE1 image whose first sector claims mode 2
  const bin = new Uint8Array(readFileSync(fix("disc1/disc1.bin")));
  bin[15] = 2;
  writeFileSync(join(dir, "hdr.bin"), bin);
  writeFileSync(join(dir, "hdr.cue"), `FILE "hdr.bin" BINARY\n TRACK 01 MODE1/2352\n  INDEX 01 00:00:00\n`);
  const bad = await cd("info", join(dir, "hdr.cue"), "--json");
  assert.is(bad.code, 1);
  const d = JSON.parse(bad.stdout);
  assert.equal(d.tracks[0].headers, { first: "mode byte 2, expected 1 for MODE1/2352", last: "ok" });
  assert.ok(d.warnings.some((w: string) => /LBA 0: mode byte 2/.test(w)));
});

test("cd verify: a clean image passes; corrupted sectors are reported by LBA", async () => {
  const ok = await cd("verify", fix("mixed/mixed.cue"));
  assert.is(ok.code, 0, ok.stdout + ok.stderr);
  assert.match(ok.stdout, /448 data sectors checked, 0 bad/);
  const bin = new Uint8Array(readFileSync(fix("mode2/mode2.bin")));
  bin[200 * 2352 + 1000]! ^= 0xff; // user data: EDC
  bin[301 * 2352 + 2300]! ^= 0x01; // Q parity
  writeFileSync(join(dir, "bad.bin"), bin);
  writeFileSync(join(dir, "bad.cue"), `FILE "bad.bin" BINARY\n TRACK 01 MODE2/2352\n  INDEX 01 00:00:00\n`);
  const r = await cd("verify", join(dir, "bad.cue"));
  assert.is(r.code, 1);
  assert.match(r.stdout, /bad sector LBA 200 \(00:04:50, track 1\): edc/);
  assert.match(r.stdout, /bad sector LBA 301 \(00:06:01, track 1\): ecc-q/);
  assert.match(r.stdout, /448 data sectors checked, 2 bad/);
  const cooked = await cd("verify", fix("disc1_2048/disc1.cue"));
  assert.is(cooked.code, 0);
  assert.match(cooked.stdout, /448 stored without EDC\/ECC \(not checked\)/);
});

test("cd make: MODE1 and MODE2 reproduce the fixtures; the result verifies and reads back", async () => {
  for (const [mode, want] of [["MODE1", H.disc1Bin], ["MODE2", H.mode2Bin]] as const) {
    const cue = join(dir, `made-${mode}.cue`);
    const r = await cd("make", fix("disc1_2048/disc1.iso"), cue, "--mode", mode.toLowerCase());
    assert.is(r.code, 0, r.stderr);
    assert.match(r.stdout, new RegExp(`448 ${mode}/2352 sectors`));
    assert.is(fileSha(join(dir, `made-${mode}.bin`)), want);
    assert.is(readFileSync(cue, "utf8"), `FILE "made-${mode}.bin" BINARY\n  TRACK 01 ${mode}/2352\n    INDEX 01 00:00:00\n`);
    const v = await cd("verify", cue);
    assert.is(v.code, 0, v.stdout);
    const exps = await openCdImage(cue, { log: () => {} });
    assert.is(sha256(readAll(exps[0]!.device)), H.cooked);
    await closeAll(exps);
  }
});

test("cd: usage and input errors are clear, with exit status 2 or 1", async () => {
  const none = await cd();
  assert.is(none.code, 2);
  assert.match(none.stderr, /no command given/);
  const help = await cd("--help");
  assert.is(help.code, 0);
  assert.match(help.stdout, /cd make IN\.iso OUT\.cue/);
  assert.is((await cd("frobnicate", "x")).code, 2);
  assert.is((await cd("make", fix("disc1_2048/disc1.iso"), join(dir, "x.cue"), "--mode", "MODE3")).code, 2);
  copyFileSync(fix("disc1/disc1.cue"), join(dir, "odd.iso"));
  const odd = await cd("make", join(dir, "odd.iso"), join(dir, "odd.cue"));
  assert.is(odd.code, 1);
  assert.match(odd.stderr, /odd\.iso: size 68 is not a whole number of 2048-byte sectors/);
  writeFileSync(join(dir, "broken.cue"), `FILE "disc1.bin" BINARY\n TRACK 01 MODE1/2352\n  INDEX 01 00:61:00\n`);
  const broken = await cd("info", join(dir, "broken.cue"));
  assert.is(broken.code, 1);
  assert.match(broken.stderr, /broken\.cue:3: INDEX: time 00:61:00 has seconds >= 60/);
});

test.run();
