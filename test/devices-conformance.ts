// The device conformance suite run against the plugins the core owns (other devices run it in
// their own test files): the memory device, the raw file device read-write and read-only, and
// qcow2 overlays over a raw base, over a CD image's cooked view and over a slow asynchronous base.
import { copyFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { MemoryDevice } from "../src/devices/memory.ts";
import { RawFile } from "../src/devices/file.ts";
import { conformance } from "./helpers/conformance.ts";
import { ROOT, scratch } from "./helpers/env.ts";
import { SlowDevice } from "./helpers/slow-device.ts";

const dir = scratch();
const base = join(dir, "base.img");
const content = Uint8Array.from({ length: 3 * 1024 * 1024 + 1234 }, (_, i) => (i * 13) & 255);
writeFileSync(base, content);
let n = 0;

conformance("MemoryDevice", { make: async () => ({ device: new MemoryDevice(5 * 1024 * 1024 + 512) }) });

conformance("RawFile read-write", {
  make: async () => {
    const p = join(dir, `rw${n++}.img`);
    copyFileSync(base, p);
    const device = RawFile.open(p);
    return { device, cleanup: () => device.close() };
  },
});

conformance("RawFile read-only", {
  make: async () => {
    const device = RawFile.open(base, { readOnly: true });
    return { device, expected: content, cleanup: () => device.close() };
  },
});

conformance("qcow2 overlay over a raw base", {
  make: async () => {
    const { openOverlay } = await import("../src/devices/qcow2/index.ts");
    const ov = join(dir, `ov${n++}.qcow2`);
    const device = await openOverlay({ base, overlay: ov, log: () => {} });
    return { device, cleanup: () => device.close?.() };
  },
});

conformance("qcow2 overlay, standard L2, read-only view of the base", {
  make: async () => {
    const { openOverlay } = await import("../src/devices/qcow2/index.ts");
    const ov = join(dir, `ovc${n++}.qcow2`);
    const device = await openOverlay({ base, overlay: ov, compat: true, log: () => {} });
    return { device, expected: content, cleanup: () => device.close?.() };
  },
  ops: 100,
});

conformance("qcow2 overlay over a CD image's cooked view (BIN/CUE)", {
  make: async () => {
    const { openOverlayBase } = await import("../src/devices/open.ts");
    const { openOverlay } = await import("../src/devices/qcow2/index.ts");
    const { base } = await openOverlayBase(join(ROOT, "test/fixtures/cd/disc1/disc1.cue"), { log: () => {} });
    const device = await openOverlay({ base, overlay: join(dir, `cd${n++}.qcow2`), log: () => {} });
    await base.release();
    return { device, cleanup: () => device.close() };
  },
  ops: 150,
});

conformance("qcow2 overlay over a slow asynchronous base", {
  make: async () => {
    const { deviceBase, openOverlay } = await import("../src/devices/qcow2/index.ts");
    const slow = new SlowDevice(content, { maxDelayMs: 2, seed: n + 1 });
    const base = await deviceBase(slow, { kind: "test", location: "/nonexistent/slow", stack: "slow asynchronous test device" });
    const device = await openOverlay({ base, overlay: join(dir, `slow${n++}.qcow2`), log: () => {} });
    await base.release();
    return { device, cleanup: () => device.close() };
  },
  ops: 150,
});
