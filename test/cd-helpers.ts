// Shared by the CD tests (not a test file itself: it defines no suite). Fixture paths with the
// expected hashes from test/fixtures/cd/README.md, and small helpers to read whole devices.
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import type { BlockDevice, ExportSpec } from "../src/devices/types.ts";
import { ROOT } from "./helpers/env.ts";

export const FIX = join(ROOT, "test/fixtures/cd");
export const fix = (p: string) => join(FIX, p);

/** Expected hashes (test/fixtures/cd/README.md). */
export const H = {
  cooked: "7facc0d4a27371e4aa3bd840a90ffc3ad849565974d1a5ca6c5abab9cac803d1",
  disc1Bin: "80e45aef82ceb13f2c89d8ab6542360ea3bf44f7c9672c500ff5cf2dc6ede344",
  mixedBin: "8471c508a33f5b733f6d60d8cce0e9cf95a65e7949e39050010fd7c3e3f578c1",
  mixedT2: "683ee8589cb7a46ba09fd36d8ded7237aa052ec05b2cef09162e494eeadb07a9",
  mixedT3: "c8d0cd878b285f0cce126050ccdf47688afa0643b79fd70732b3ce667472eff8",
  mixedT3FromIndex0: "537c063ae98fb88b4bdd4a5ea05eba20469252eafed73c96374f444879992093",
  mixedDiscRaw: "e368b5c2e97abac619da44b35f976ae2b6c1b920dc8a1fe70fa16b0770d2c1d3",
  mixedT2Motorola: "1729e516bb1ca2000e5f250245e7b4510065695d658bb945a723f3e8c039bb0e",
  splitT2: "718c91804bc2dfb87a8444b431b934ac3b3f81e75cf361623bcab424195091a1",
  mode2Bin: "2adb9a38bebeb8e504a1121f365d0b09a017014c5d1d925a79adcd36207f348e",
  mode2_2336Bin: "835bad7ecf098707ceecb6672c7d32dca1be547597c03325fd1111128133582e",
};

export function sha256(b: Uint8Array): string {
  return createHash("sha256").update(b).digest("hex");
}

export function fileSha(path: string): string {
  return sha256(readFileSync(path));
}

/** Reads a whole device, in chunks of `chunk` bytes (odd sizes exercise unaligned paths). */
export function readAll(dev: BlockDevice, chunk = 1 << 20): Uint8Array {
  const size = dev.size();
  const out = new Uint8Array(size);
  for (let off = 0; off < size; off += chunk) {
    const r = dev.pread(out.subarray(off, Math.min(size, off + chunk)), off, 0);
    if (r instanceof Promise) throw new Error("CD devices read synchronously");
  }
  return out;
}

export function byName(exps: ExportSpec[], name: string): ExportSpec {
  const e = exps.find((x) => x.name === name);
  if (!e) throw new Error(`no export ${name}; have ${exps.map((x) => x.name).join(", ")}`);
  return e;
}

export async function closeAll(exps: ExportSpec[]): Promise<void> {
  for (const e of exps) await e.device.close?.();
}
