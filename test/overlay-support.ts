// Shared helpers of the overlay tests (no tests here): deterministic random numbers, base images
// with data and holes, random operation sequences applied to an overlay and to an expected raw
// copy, and the qemu-img oracles (check, compare, map).
import { createHash } from "node:crypto";
import { closeSync, ftruncateSync, openSync, readFileSync, writeSync } from "node:fs";
import * as assert from "uvu/assert";
import { run } from "./helpers/env.ts";

export const KiB = 1024;
export const MiB = 1024 * 1024;

/** xorshift32: the same sequence for the same seed, so a failure can be replayed. */
export class Rng {
  private s: number;
  constructor(seed: number) { this.s = (seed >>> 0) || 0x9e3779b9; }
  next(): number {
    let x = this.s;
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    this.s = x;
    return x;
  }
  int(n: number): number { return Math.floor((this.next() / 0x100000000) * n); }
  bytes(n: number): Uint8Array {
    const b = new Uint8Array(n);
    const v = new Uint32Array(b.buffer, 0, n >>> 2);
    for (let i = 0; i < v.length; i++) v[i] = this.next();
    for (let i = v.length * 4; i < n; i++) b[i] = this.next() & 255;
    return b;
  }
}

/**
 * Write a base image of `size` bytes: position-dependent data in most 64 KiB chunks, holes (never
 * written, so sparse) in every fifth one. Returns its bytes.
 */
export function makeBase(path: string, size: number, seed = 1): Uint8Array {
  const rng = new Rng(seed);
  const all = new Uint8Array(size);
  const fd = openSync(path, "w");
  try {
    for (let p = 0; p < size; p += 64 * KiB) {
      const n = Math.min(64 * KiB, size - p);
      if ((p / (64 * KiB)) % 5 === 3) continue;
      const chunk = rng.bytes(n);
      all.set(chunk, p);
      writeSync(fd, chunk, 0, n, p);
    }
    ftruncateSync(fd, size);
  } finally {
    closeSync(fd);
  }
  return all;
}

export function sha256(path: string): string {
  return createHash("sha256").update(readFileSync(path)).digest("hex");
}

/** The operations a sequence is made of, applied to both the overlay and the expected bytes. */
export interface Target {
  write(buf: Uint8Array, offset: number, fua: boolean): Promise<void> | void;
  zero(offset: number, length: number, mayTrim: boolean): Promise<void> | void;
  trim(offset: number, length: number): Promise<void> | void;
  flush(): Promise<void> | void;
}

export interface OpMix {
  count: number;
  size: number;
  /** Largest write, e.g. 32 MiB. */
  big: number;
}

/**
 * Random writes (unaligned, cross-cluster, tiny and big), zeroes, trims and flushes. `expected`
 * (a copy of the base, rounded up to the overlay's size) gets the same changes. Returns a log.
 */
export async function randomOps(t: Target, expected: Uint8Array, rng: Rng, mix: OpMix): Promise<string[]> {
  const log: string[] = [];
  for (let k = 0; k < mix.count; k++) {
    const r = rng.int(100);
    let len: number;
    const shape = rng.int(10);
    if (shape < 3) len = 1 + rng.int(16); // tiny
    else if (shape < 6) len = 512 * (1 + rng.int(16)); // sector-aligned sizes
    else if (shape < 9) len = 1 + rng.int(200 * KiB); // unaligned, often crossing clusters
    else len = 1 + rng.int(mix.big);
    if (k === 3) len = mix.big; // always one of the biggest
    len = Math.min(len, mix.size);
    let off = rng.int(mix.size - len + 1);
    if (rng.int(3) === 0) off -= off % 65536; // cluster-aligned starts too
    if (r < 60) {
      const b = rng.bytes(len);
      const fua = rng.int(10) === 0;
      log.push(`write ${off} ${len}${fua ? " fua" : ""}`);
      await t.write(b, off, fua);
      expected.set(b, off);
    } else if (r < 75) {
      const mayTrim = rng.int(2) === 0;
      log.push(`zero ${off} ${len}${mayTrim ? " may-trim" : ""}`);
      await t.zero(off, len, mayTrim);
      expected.fill(0, off, off + len);
    } else if (r < 88) {
      log.push(`trim ${off} ${len}`);
      await t.trim(off, len);
      expected.fill(0, off, off + len);
    } else {
      log.push("flush");
      await t.flush();
    }
  }
  return log;
}

export interface CheckResult { code: number; json: Record<string, unknown> }

/** qemu-img check --output=json; exit 0 clean, 2 corruptions, 3 leaks only. */
export async function qemuCheck(path: string): Promise<CheckResult> {
  const r = await run(["qemu-img", "check", "--output=json", path]);
  let json: Record<string, unknown> = {};
  try { json = JSON.parse(r.stdout); } catch { json = { raw: r.stdout + r.stderr }; }
  return { code: r.code, json };
}

export async function assertClean(path: string, what: string): Promise<void> {
  const c = await qemuCheck(path);
  assert.is(c.code, 0, `${what}: qemu-img check ${path}: ${JSON.stringify(c.json)}`);
}

export async function assertIdentical(a: string, b: string, what: string): Promise<void> {
  const r = await run(["qemu-img", "compare", a, b]);
  assert.is(r.code, 0, `${what}: qemu-img compare ${a} ${b}: ${r.stdout}${r.stderr}`);
}

/** The overlay alone, for qemu-img check of overlays QEMU cannot open with their base ("bun-nbd"). */
export const noBacking = (ov: string) => `json:${JSON.stringify({ driver: "qcow2", file: { driver: "file", filename: ov }, backing: null })}`;

/** The overlay over a raw file that holds its base's bytes, for qemu-img compare of such overlays. */
export const rawBacking = (ov: string, raw: string) =>
  `json:${JSON.stringify({ driver: "qcow2", file: { driver: "file", filename: ov }, backing: { driver: "raw", file: { driver: "file", filename: raw } } })}`;

export interface MapEntry { start: number; length: number; depth: number; zero: boolean; data: boolean }

export async function qemuMap(path: string): Promise<MapEntry[]> {
  const r = await run(["qemu-img", "map", "-U", "--output=json", path]);
  assert.is(r.code, 0, `qemu-img map ${path}: ${r.stderr}`);
  return JSON.parse(r.stdout) as MapEntry[];
}
