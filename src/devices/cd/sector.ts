// Raw CD sector layouts (ECMA-130 / CD-ROM XA): sync pattern, BCD MSF headers, the EDC (a
// CRC-32 over the CD polynomial) and the RSPC P/Q parity of Mode 1 and Mode 2 Form 1 sectors.
// Pure code: no I/O. The encoder is used to synthesize raw sectors (`cd make`, raw views of
// cooked tracks, empty gap sectors); the checker (`cd verify`) evaluates the syndromes with
// explicit powers of alpha, a different code path from the encoder.

export const RAW_SECTOR = 2352;
export const COOKED_SECTOR = 2048;
export const FORM2_DATA = 2324;
/** Sectors before LBA 0 (the 2-second pregap of track 1): header MSF = LBA + 150. */
export const MSF_OFFSET = 150;
export const FRAMES_PER_SECOND = 75;

/** Submode bits of the XA subheader (sector offset 18). */
export const SUBMODE_EOR = 0x01;
export const SUBMODE_DATA = 0x08;
export const SUBMODE_FORM2 = 0x20;
export const SUBMODE_EOF = 0x80;

const SYNC = new Uint8Array([0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00]);

/** True if the 12 bytes at `off` are the data-sector sync pattern. */
export function hasSync(buf: Uint8Array, off: number): boolean {
  if (off < 0 || off + 12 > buf.length) return false;
  for (let i = 0; i < 12; i++) if (buf[off + i] !== SYNC[i]) return false;
  return true;
}

export function toBcd(n: number): number {
  return ((n / 10) | 0) * 16 + (n % 10);
}

/** Decodes a BCD byte; -1 if either nibble is not a decimal digit. */
export function fromBcd(b: number): number {
  const hi = b >> 4, lo = b & 15;
  return hi > 9 || lo > 9 ? -1 : hi * 10 + lo;
}

/** Writes sync + header (BCD MSF of lba + 150, mode byte) at `off`. */
export function writeHeader(buf: Uint8Array, off: number, lba: number, mode: number): void {
  buf.set(SYNC, off);
  let a = lba + MSF_OFFSET;
  const f = a % FRAMES_PER_SECOND;
  a = (a - f) / FRAMES_PER_SECOND;
  const s = a % 60;
  const m = (a - s) / 60;
  buf[off + 12] = toBcd(m % 100);
  buf[off + 13] = toBcd(s);
  buf[off + 14] = toBcd(f);
  buf[off + 15] = mode;
}

/** The LBA a raw sector header at `off` names, or -1 if the BCD is invalid. */
export function headerLba(buf: Uint8Array, off: number): number {
  const m = fromBcd(buf[off + 12]!), s = fromBcd(buf[off + 13]!), f = fromBcd(buf[off + 14]!);
  if (m < 0 || s < 0 || f < 0 || s >= 60 || f >= FRAMES_PER_SECOND) return -1;
  return (m * 60 + s) * FRAMES_PER_SECOND + f - MSF_OFFSET;
}

// ---- EDC ---------------------------------------------------------------------------------------
// P(x) = (x^16 + x^15 + x^2 + 1)(x^16 + x^2 + x + 1). Data is fed LSB first, so the table uses the
// bit-reversed polynomial. Both are derived here rather than written as magic numbers.

function polyMul(a: number, b: number): number {
  // Carry-less multiply of two polynomials of degree <= 16 (result degree <= 32, above 2^32).
  const bits: number[] = new Array(33).fill(0);
  for (let i = 0; i <= 16; i++) {
    if (!((a >>> i) & 1)) continue;
    for (let j = 0; j <= 16; j++) if ((b >>> j) & 1) bits[i + j] = bits[i + j]! ^ 1;
  }
  let v = 0;
  for (let k = 32; k >= 0; k--) v = v * 2 + bits[k]!;
  return v;
}

/** The full 33-bit EDC generator polynomial (0x1_8001_801B). */
export const EDC_POLY = polyMul((1 << 16) | (1 << 15) | (1 << 2) | 1, (1 << 16) | (1 << 2) | (1 << 1) | 1);

function reflect32(v: number): number {
  let r = 0;
  for (let i = 0; i < 32; i++) r = (r << 1) | ((v >>> i) & 1);
  return r >>> 0;
}

/** The reflected constant the table-driven form uses (0xD8018001). */
export const EDC_REFLECTED = reflect32(EDC_POLY % 0x100000000);

const EDC_TABLE = new Uint32Array(256);
for (let i = 0; i < 256; i++) {
  let c = i;
  for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ EDC_REFLECTED : c >>> 1;
  EDC_TABLE[i] = c >>> 0;
}

/** EDC over buf[start, end): init 0, no final XOR; stored little-endian. */
export function edc(buf: Uint8Array, start: number, end: number): number {
  let c = 0;
  const t = EDC_TABLE;
  for (let i = start; i < end; i++) c = (c >>> 8) ^ t[(c ^ buf[i]!) & 0xff]!;
  return c >>> 0;
}

/** Bit-serial EDC (one bit at a time), used by the tests to cross-check the table form. */
export function edcBitwise(buf: Uint8Array, start: number, end: number): number {
  let c = 0;
  for (let i = start; i < end; i++) {
    c ^= buf[i]!;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ EDC_REFLECTED : c >>> 1;
  }
  return c >>> 0;
}

function putLe32(buf: Uint8Array, off: number, v: number): void {
  buf[off] = v & 0xff;
  buf[off + 1] = (v >>> 8) & 0xff;
  buf[off + 2] = (v >>> 16) & 0xff;
  buf[off + 3] = (v >>> 24) & 0xff;
}

function getLe32(buf: Uint8Array, off: number): number {
  return (buf[off]! | (buf[off + 1]! << 8) | (buf[off + 2]! << 16) | (buf[off + 3]! << 24)) >>> 0;
}

// ---- GF(2^8) and RSPC ----------------------------------------------------------------------------
// Primitive polynomial x^8 + x^4 + x^3 + x^2 + 1, alpha = 2.

const GF_EXP = new Uint8Array(512);
const GF_LOG = new Uint8Array(256);
{
  let x = 1;
  for (let i = 0; i < 255; i++) {
    GF_EXP[i] = x;
    GF_LOG[x] = i;
    x <<= 1;
    if (x & 0x100) x ^= 0x11d;
  }
  for (let i = 255; i < 512; i++) GF_EXP[i] = GF_EXP[i - 255]!;
}
/** Multiply by alpha. */
const MUL2 = new Uint8Array(256);
/** Divide by (alpha + 1) = 3. */
const DIV3 = new Uint8Array(256);
for (let i = 0; i < 256; i++) {
  MUL2[i] = i === 0 ? 0 : GF_EXP[GF_LOG[i]! + 1]!;
  DIV3[i] = i === 0 ? 0 : GF_EXP[GF_LOG[i]! + 255 - GF_LOG[3]!]!;
}

// The 2340 bytes at sector offsets 12..2351 are 1170 words; the two byte planes are coded
// separately. P: 43 columns x 26 rows (rows 24, 25 parity). Q: 26 diagonals x 45 words.
const P_COLS = 43, P_ROWS = 26;
const Q_DIAGS = 26, Q_LEN = 45;
const PARITY_P = 2076, PARITY_Q = 2248;

/** Byte offsets (relative to the sector start) of each Q codeword's 43 data words, plane 0. */
const Q_INDEX = new Uint16Array(Q_DIAGS * (Q_LEN - 2));
for (let d = 0; d < Q_DIAGS; d++) {
  for (let m = 0; m < Q_LEN - 2; m++) Q_INDEX[d * (Q_LEN - 2) + m] = 12 + 2 * ((44 * m + 43 * d) % 1118);
}

function encodeP(s: Uint8Array, o: number): void {
  for (let plane = 0; plane < 2; plane++) {
    for (let col = 0; col < P_COLS; col++) {
      let a = 0, h = 0;
      let p = o + 12 + 2 * col + plane;
      for (let row = 0; row < P_ROWS - 2; row++, p += 2 * P_COLS) {
        const v = s[p]!;
        a ^= v;
        h = MUL2[h]! ^ v;
      }
      const b = MUL2[MUL2[h]!]!;
      const p0 = DIV3[a ^ b]!;
      s[o + PARITY_P + 2 * col + plane] = p0;
      s[o + PARITY_P + 2 * P_COLS + 2 * col + plane] = a ^ p0;
    }
  }
}

function encodeQ(s: Uint8Array, o: number): void {
  for (let plane = 0; plane < 2; plane++) {
    for (let d = 0; d < Q_DIAGS; d++) {
      let a = 0, h = 0;
      const base = d * (Q_LEN - 2);
      for (let m = 0; m < Q_LEN - 2; m++) {
        const v = s[o + Q_INDEX[base + m]! + plane]!;
        a ^= v;
        h = MUL2[h]! ^ v;
      }
      const b = MUL2[MUL2[h]!]!;
      const p0 = DIV3[a ^ b]!;
      s[o + PARITY_Q + 2 * d + plane] = p0;
      s[o + PARITY_Q + 2 * Q_DIAGS + 2 * d + plane] = a ^ p0;
    }
  }
}

/** P then Q parity over the sector at `o` (P must be computed first: Q covers it). */
function encodeEcc(s: Uint8Array, o: number): void {
  encodeP(s, o);
  encodeQ(s, o);
}

/** Syndromes of one codeword read at the given byte offsets: both must be zero. */
function codewordOk(s: Uint8Array, offs: number[]): boolean {
  const n = offs.length;
  let s0 = 0, s1 = 0;
  for (let i = 0; i < n; i++) {
    const v = s[offs[i]!]!;
    s0 ^= v;
    if (v !== 0) s1 ^= GF_EXP[(GF_LOG[v]! + (n - 1 - i)) % 255]!;
  }
  return s0 === 0 && s1 === 0;
}

const P_CODEWORDS: number[][] = [];
const Q_CODEWORDS: number[][] = [];
for (let plane = 0; plane < 2; plane++) {
  for (let col = 0; col < P_COLS; col++) {
    const offs: number[] = [];
    for (let row = 0; row < P_ROWS; row++) offs.push(12 + 2 * (P_COLS * row + col) + plane);
    P_CODEWORDS.push(offs);
  }
  for (let d = 0; d < Q_DIAGS; d++) {
    const offs: number[] = [];
    for (let m = 0; m < Q_LEN - 2; m++) offs.push(12 + 2 * ((44 * m + 43 * d) % 1118) + plane);
    offs.push(12 + 2 * (1118 + d) + plane, 12 + 2 * (1144 + d) + plane);
    Q_CODEWORDS.push(offs);
  }
}

function eccOk(s: Uint8Array, o: number, words: number[][]): boolean {
  const view = o === 0 ? s : s.subarray(o, o + RAW_SECTOR);
  for (const offs of words) if (!codewordOk(view, offs)) return false;
  return true;
}

// ---- Sector encoders ------------------------------------------------------------------------------

/**
 * Completes a Mode 1 sector whose 2048 user bytes are already at o+16: sync, header, EDC over
 * 0..2063, 8 zero bytes, P and Q parity.
 */
export function encodeMode1(s: Uint8Array, o: number, lba: number): void {
  writeHeader(s, o, lba, 1);
  putLe32(s, o + 2064, edc(s, o, o + 2064));
  s.fill(0, o + 2068, o + 2076);
  encodeEcc(s, o);
}

/**
 * Completes a Mode 2 XA Form 1 sector whose user data is already at o+24: sync, header, subheader
 * (written twice), EDC over 16..2071, and P/Q parity computed with the header bytes as zero.
 */
export function encodeMode2Form1(s: Uint8Array, o: number, lba: number, submode = SUBMODE_DATA, file = 0, channel = 0, coding = 0): void {
  writeHeader(s, o, lba, 2);
  writeSubheader(s, o, file, channel, submode & ~SUBMODE_FORM2, coding);
  putLe32(s, o + 2072, edc(s, o + 16, o + 2072));
  const m = s[o + 12]!, sec = s[o + 13]!, f = s[o + 14]!, mode = s[o + 15]!;
  s[o + 12] = 0; s[o + 13] = 0; s[o + 14] = 0; s[o + 15] = 0;
  encodeEcc(s, o);
  s[o + 12] = m; s[o + 13] = sec; s[o + 14] = f; s[o + 15] = mode;
}

/** Completes a Mode 2 XA Form 2 sector whose 2324 user bytes are at o+24: header, subheader, EDC. */
export function encodeMode2Form2(s: Uint8Array, o: number, lba: number, submode = SUBMODE_FORM2, file = 0, channel = 0, coding = 0): void {
  writeHeader(s, o, lba, 2);
  writeSubheader(s, o, file, channel, submode | SUBMODE_FORM2, coding);
  putLe32(s, o + 2348, edc(s, o + 16, o + 2348));
}

function writeSubheader(s: Uint8Array, o: number, file: number, channel: number, submode: number, coding: number): void {
  s[o + 16] = s[o + 20] = file;
  s[o + 17] = s[o + 21] = channel;
  s[o + 18] = s[o + 22] = submode;
  s[o + 19] = s[o + 23] = coding;
}

/** Fills a 2352-byte "empty" data sector (zero user data) with valid header, EDC and ECC. */
export function emptyDataSector(s: Uint8Array, o: number, lba: number, mode: 1 | 2): void {
  s.fill(0, o, o + RAW_SECTOR);
  if (mode === 1) encodeMode1(s, o, lba);
  else encodeMode2Form2(s, o, lba);
}

// ---- Checker ----------------------------------------------------------------------------------

/** What is wrong with a raw data sector, or null if its EDC/ECC (and header) are consistent. */
export type SectorProblem = "sync" | "mode" | "address" | "subheader" | "edc" | "ecc-p" | "ecc-q";

/**
 * Checks the raw 2352-byte sector at `o`. `lba` < 0 skips the address check. Mode 0 sectors are
 * accepted (no EDC); Mode 2 sectors are checked as XA Form 1/Form 2 by their submode (a Form 2 EDC
 * of 0 means "not computed" and is accepted).
 */
export function checkSector(s: Uint8Array, o: number, lba: number): SectorProblem | null {
  if (!hasSync(s, o)) return "sync";
  if (lba >= 0 && headerLba(s, o) !== lba) return "address";
  const mode = s[o + 15]!;
  if (mode === 0) return null;
  if (mode === 1) {
    if (edc(s, o, o + 2064) !== getLe32(s, o + 2064)) return "edc";
    if (!eccOk(s, o, P_CODEWORDS)) return "ecc-p";
    if (!eccOk(s, o, Q_CODEWORDS)) return "ecc-q";
    return null;
  }
  if (mode !== 2) return "mode";
  for (let i = 0; i < 4; i++) if (s[o + 16 + i] !== s[o + 20 + i]) return "subheader";
  if (s[o + 18]! & SUBMODE_FORM2) {
    const stored = getLe32(s, o + 2348);
    return stored === 0 || stored === edc(s, o + 16, o + 2348) ? null : "edc";
  }
  if (edc(s, o + 16, o + 2072) !== getLe32(s, o + 2072)) return "edc";
  const hdr = s.slice(o + 12, o + 16);
  s.fill(0, o + 12, o + 16);
  try {
    if (!eccOk(s, o, P_CODEWORDS)) return "ecc-p";
    if (!eccOk(s, o, Q_CODEWORDS)) return "ecc-q";
  } finally {
    s.set(hdr, o + 12);
  }
  return null;
}
