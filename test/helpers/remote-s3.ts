// Shared setup of the S3 remote-image suites (test/remote-s3*.ts): each file starts its own Ceph
// RGW (test/services/rgw.ts) with a bucket, runs its tests against it (skipped, saying why, only
// where the Ceph packages cannot be installed) and stops it; plus the small checks they share.
import * as assert from "uvu/assert";
import { deadline } from "./assert.ts";
import { need, run } from "./env.ts";
import type { Served } from "./server.ts";
import { guardedSuite } from "../interop-lib.ts";
import { startRgw, type Rgw } from "../services/rgw.ts";

export const MiB = 1024 * 1024;
export const BUCKET = "images";

/**
 * A suite over a fresh RGW holding the bucket BUCKET; `setup` uploads what its tests need.
 * s3test(): a test that needs the store (skipped when there is none); run() also stops the store.
 */
export function s3Suite(name: string, setup: (g: Rgw) => Promise<void>) {
  let rgw: Rgw | null = null;
  const { test, run: runSuite } = guardedSuite(name, async () => {
    need("nbdcopy", "nbdinfo", "cmp", "curl");
    rgw = await startRgw();
    if (rgw === null) return;
    await rgw.createBucket(BUCKET);
    await setup(rgw);
  });
  const s3test = (title: string, ms: number, fn: (g: Rgw) => Promise<void>) =>
    test(title, () => rgw === null ? Promise.resolve() : deadline(ms, title, () => fn(rgw!)));
  return {
    s3test,
    run() {
      test("stop the store", async () => { await rgw?.stop(); });
      runSuite();
    },
  };
}

export async function same(a: string, b: string): Promise<void> {
  const r = await run(["cmp", a, b], { timeoutMs: 120_000 });
  assert.is(r.code, 0, `${a} and ${b} differ: ${r.stdout}${r.stderr}`);
}

export async function stopped(s: Served): Promise<void> {
  assert.is(await s.stop(), 0, `server exit status; output:\n${s.output()}`);
}

export async function waitFor(cond: () => boolean, what: string, s: Served, ms = 5000): Promise<void> {
  for (const end = Date.now() + ms; !cond(); await Bun.sleep(25)) {
    if (Date.now() > end) assert.unreachable(`${what}: not seen in ${ms} ms; server output:\n${s.output().slice(-3000)}`);
  }
}

/** Until `cond()` holds (the ops log is written after the responses, later under load), or `ms` passes. */
export async function eventually(cond: () => boolean, ms = 10_000): Promise<boolean> {
  for (const end = Date.now() + ms; !cond(); await Bun.sleep(100)) if (Date.now() > end) return false;
  return true;
}
