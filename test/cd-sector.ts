// Raw sector code: EDC constants derived from the polynomial, table vs bit-serial EDC, and the
// encoder against the fixtures' independently made BINs (rewrapping each fixture's cooked view must
// reproduce its BIN byte for byte); the checker finds single-byte corruptions in every region.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { readFileSync } from "node:fs";
import { wrapSector } from "../src/devices/cd/make.ts";
import {
  checkSector, EDC_POLY, EDC_REFLECTED, edc, edcBitwise, emptyDataSector, encodeMode2Form2, fromBcd, headerLba,
  RAW_SECTOR, toBcd, writeHeader,
} from "../src/devices/cd/sector.ts";
import { bytesEqual } from "./helpers/assert.ts";
import { fix, H, sha256 } from "./cd-helpers.ts";

const test = suite("cd sector");
const iso = new Uint8Array(readFileSync(fix("disc1_2048/disc1.iso")));
const SECTORS = iso.length / 2048;

function rewrap(mode: "MODE1" | "MODE2"): Uint8Array {
  const out = new Uint8Array(SECTORS * RAW_SECTOR);
  for (let i = 0; i < SECTORS; i++) wrapSector(iso, i * 2048, out, i * RAW_SECTOR, i, mode, i === SECTORS - 1);
  return out;
}

test("EDC constants come from (x^16+x^15+x^2+1)(x^16+x^2+x+1)", () => {
  assert.is(EDC_POLY, 0x18001801b);
  assert.is(EDC_REFLECTED, 0xd8018001);
});

test("table EDC equals the bit-serial EDC", () => {
  const b = new Uint8Array(4096);
  for (let i = 0; i < b.length; i++) b[i] = (i * 131 + 7) & 255;
  for (const [s, e] of [[0, 0], [0, 1], [3, 2064], [16, 2072], [100, 4096]] as const) {
    assert.is(edc(b, s, e), edcBitwise(b, s, e), `range ${s}-${e}`);
  }
});

test("BCD and header addresses: LBA 0 is 00:02:00, LBA 16 is 00:02:16", () => {
  assert.is(toBcd(59), 0x59);
  assert.is(fromBcd(0x74), 74);
  assert.is(fromBcd(0x7a), -1);
  const s = new Uint8Array(RAW_SECTOR);
  writeHeader(s, 0, 0, 1);
  assert.equal([...s.subarray(12, 16)], [0x00, 0x02, 0x00, 0x01]);
  writeHeader(s, 0, 16, 2);
  assert.equal([...s.subarray(12, 16)], [0x00, 0x02, 0x16, 0x02]);
  writeHeader(s, 0, 11700, 1);
  assert.is(headerLba(s, 0), 11700);
});

test("MODE1/2352: rewrapping the cooked view reproduces disc1.bin byte for byte", () => {
  const out = rewrap("MODE1");
  assert.is(sha256(out), H.disc1Bin);
  bytesEqual(out, new Uint8Array(readFileSync(fix("disc1/disc1.bin"))), "disc1.bin");
});

test("MODE2/2352 (XA Form 1): rewrapping reproduces mode2.bin byte for byte", () => {
  assert.is(sha256(rewrap("MODE2")), H.mode2Bin);
});

test("MODE2/2336: bytes 16..2351 of the rewrapped Form 1 sectors reproduce mode2_2336's BIN", () => {
  const raw = rewrap("MODE2");
  const out = new Uint8Array(SECTORS * 2336);
  for (let i = 0; i < SECTORS; i++) out.set(raw.subarray(i * RAW_SECTOR + 16, (i + 1) * RAW_SECTOR), i * 2336);
  assert.is(sha256(out), H.mode2_2336Bin);
});

test("mixed.bin's data track is the rewrapped cooked view", () => {
  const mixed = new Uint8Array(readFileSync(fix("mixed/mixed.bin")));
  assert.is(sha256(mixed), H.mixedBin);
  bytesEqual(rewrap("MODE1"), mixed.subarray(0, SECTORS * RAW_SECTOR), "mixed.bin track 1");
});

test("checker: every fixture sector is good; a flipped byte in each region is found", () => {
  const m1 = new Uint8Array(readFileSync(fix("disc1/disc1.bin")));
  const m2 = new Uint8Array(readFileSync(fix("mode2/mode2.bin")));
  for (let i = 0; i < SECTORS; i++) {
    assert.is(checkSector(m1, i * RAW_SECTOR, i), null, `mode1 LBA ${i}`);
    assert.is(checkSector(m2, i * RAW_SECTOR, i), null, `mode2 LBA ${i}`);
  }
  const o = 7 * RAW_SECTOR;
  const cases: [Uint8Array, number, string][] = [
    [m1, 3, "sync"], [m1, 14, "address"], [m1, 15, "mode"], [m1, 500, "edc"], [m1, 2066, "edc"],
    [m1, 2100, "ecc-p"], [m1, 2300, "ecc-q"],
    [m2, 18, "subheader"], [m2, 24, "edc"], [m2, 2073, "edc"], [m2, 2200, "ecc-p"], [m2, 2350, "ecc-q"],
  ];
  for (const [buf, at, want] of cases) {
    buf[o + at]! ^= 0x10;
    assert.is(checkSector(buf, o, 7), want, `byte ${at} flipped`);
    buf[o + at]! ^= 0x10;
    assert.is(checkSector(buf, o, 7), null, "restored");
  }
  // the XA Form 1 ECC ignores the header: a wrong address is caught by the address check only
  assert.is(checkSector(m2, o, 8), "address");
  assert.is(checkSector(m2, o, -1), null, "no address check");
});

test("empty synthesized sectors and Form 2 sectors are valid", () => {
  const s = new Uint8Array(RAW_SECTOR * 3);
  emptyDataSector(s, 0, 1234, 1);
  emptyDataSector(s, RAW_SECTOR, 1235, 2);
  s.fill(0x5a, 2 * RAW_SECTOR + 24, 2 * RAW_SECTOR + 24 + 2324);
  encodeMode2Form2(s, 2 * RAW_SECTOR, 1236);
  assert.is(checkSector(s, 0, 1234), null);
  assert.is(checkSector(s, RAW_SECTOR, 1235), null);
  assert.is(checkSector(s, 2 * RAW_SECTOR, 1236), null);
  assert.is(s[RAW_SECTOR + 18]! & 0x20, 0x20, "Form 2 submode bit");
  s[2 * RAW_SECTOR + 1000]! ^= 1;
  assert.is(checkSector(s, 2 * RAW_SECTOR, 1236), "edc");
  // a Form 2 EDC of zero means "not computed" and is accepted
  s.fill(0, 2 * RAW_SECTOR + 2348, 3 * RAW_SECTOR);
  assert.is(checkSector(s, 2 * RAW_SECTOR, 1236), null);
});

test.run();
