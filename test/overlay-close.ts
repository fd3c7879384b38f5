// Closing a qcow2 overlay twice at once (a shutdown racing the last lease's release) flushes and
// closes its file once: both callers resolve, the file is a clean qcow2, and the descriptor number
// is not closed a second time under whoever opened a file next.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { fstatSync, openSync, closeSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { need, runOk, scratch } from "./helpers/env.ts";
import { openOverlay } from "../src/devices/qcow2/index.ts";

const test = suite("overlay close");
const dir = scratch("bun-nbd-ovclose-");

test("two concurrent close() calls: one flush, one close, both resolve", async () => {
  need("qemu-img");
  const base = join(dir, "base.img");
  writeFileSync(base, new Uint8Array(1 << 20).fill(7));
  const ov = await openOverlay({ base, overlay: join(dir, "ov.qcow2"), log: () => {} });
  const r = ov.pwrite(new Uint8Array(4096).fill(9), 8192, 0);
  if (r instanceof Promise) await r;
  const a = ov.close();
  const b = ov.close();
  // a file opened while the closes run gets a descriptor that must survive them
  const other = openSync(base, "r");
  try {
    await Promise.all([a, b]);
    assert.ok(fstatSync(other).size === 1 << 20, "the other file's descriptor is still open");
  } finally {
    closeSync(other);
  }
  await runOk(["qemu-img", "check", join(dir, "ov.qcow2")]);
});

test.run();
