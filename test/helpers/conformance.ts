// One conformance suite for every BlockDevice (plugins and filter stacks): run it with a factory
// that makes a fresh device and, for read-only devices, the bytes the device must hold.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { CheckedExport, ExtentList } from "../../src/devices/checked.ts";
import { type BlockDevice, EXTENT_ZERO, FUA, isPromise, MAY_TRIM } from "../../src/devices/types.ts";
import { NbdError } from "../../src/protocol/errors.ts";
import { bytesEqual } from "./assert.ts";

export interface ConformanceTarget {
  /** A fresh device. `expected` (read-only devices) is what it must read as. */
  make(): Promise<{ device: BlockDevice; expected?: Uint8Array; cleanup?: () => void | Promise<void> }>;
  /** Number of random operations (default 300). */
  ops?: number;
}

const aw = async (r: unknown) => { if (isPromise(r)) await r; };

/** xorshift32: a seeded generator so failures reproduce. */
export function rng(seed: number) {
  let x = seed >>> 0 || 1;
  return (n: number) => {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    return x % n;
  };
}

export function conformance(name: string, target: ConformanceTarget): void {
  const S = suite(`conformance: ${name}`);

  S("size is a safe integer; capabilities are consistent", async () => {
    const { device, cleanup } = await target.make();
    const size = device.size();
    assert.ok(Number.isInteger(size) && size >= 0 && size <= 2 ** 53);
    const c = device.capabilities();
    if (!c.canWrite) assert.not.ok(c.canTrim || c.canZero || c.canFua || c.canFastZero, "a read-only device offers no write-side capability");
    if (c.canWrite) assert.type(device.pwrite, "function");
    await cleanup?.();
  });

  S("reads match the model at random offsets and lengths; writes read back", async () => {
    const { device, expected, cleanup } = await target.make();
    const size = device.size();
    const model = new Uint8Array(size);
    const writable = device.capabilities().canWrite;
    if (expected) model.set(expected);
    else await aw(device.pread(model, 0, 0)); // start from whatever the device holds
    const r = rng(0x5eed);
    const ops = target.ops ?? 300;
    for (let i = 0; i < ops; i++) {
      const len = 1 + r(r(4) === 0 ? 200000 : 9000);
      const off = r(Math.max(1, size - len));
      const n = Math.min(len, size - off);
      const op = writable ? r(5) : 0;
      if (op === 0 || op === 1) {
        const b = new Uint8Array(n);
        await aw(device.pread(b, off, 0));
        bytesEqual(b, model.subarray(off, off + n), `op ${i}: read [${off}, +${n})`);
      } else if (op === 2 || op === 3) {
        const b = Uint8Array.from({ length: n }, (_, k) => (k * 31 + i) & 255);
        await aw(device.pwrite!(b, off, op === 3 ? FUA : 0));
        model.set(b, off);
      } else {
        await aw(device.zero?.(off, n, r(2) ? MAY_TRIM : 0) ?? device.pwrite!(new Uint8Array(n), off, 0));
        model.fill(0, off, off + n);
      }
    }
    await aw(device.flush?.(0));
    const all = new Uint8Array(size);
    await aw(device.pread(all, 0, 0));
    bytesEqual(all, model, "whole device after the random operations");
    await cleanup?.();
  });

  S("extents cover the range in order, and ZERO extents read as zeros", async () => {
    const { device, cleanup } = await target.make();
    const size = device.size();
    if (!device.extents || size === 0) { await cleanup?.(); return; }
    if (device.capabilities().canWrite) {
      await aw(device.pwrite!(new Uint8Array(4096).fill(7), Math.floor(size / 2 / 4096) * 4096, 0));
      await aw(device.zero?.(0, Math.min(size, 65536), MAY_TRIM));
    }
    const list = new ExtentList();
    const exp = new CheckedExport({ name: "x", device });
    await aw(exp.extents(exp.contexts[0]!, 0, size, 0, list));
    const total = list.lengths.reduce((a, b) => a + b, 0);
    assert.is(total, size, "extents cover the device exactly");
    let off = 0;
    for (let i = 0; i < list.lengths.length; i++) {
      const len = list.lengths[i]!;
      assert.ok(len > 0);
      if (list.types[i]! & EXTENT_ZERO) {
        const b = new Uint8Array(Math.min(len, 1 << 20));
        await aw(device.pread(b, off, 0));
        assert.ok(b.every((x) => x === 0), `extent at ${off} is reported zero but is not`);
      }
      off += len;
    }
    await cleanup?.();
  });

  S("the checked wrapper rejects out-of-range and read-only requests", async () => {
    const { device, cleanup } = await target.make();
    const exp = new CheckedExport({ name: "x", device });
    const size = exp.size;
    const errno = async (f: () => unknown) => { try { await aw(f()); return 0; } catch (e) { return (e as NbdError).errno; } };
    assert.is(await errno(() => exp.read(new Uint8Array(2), size - 1)), 22);
    if (exp.caps.canWrite) assert.is(await errno(() => exp.write(new Uint8Array(2), size - 1, 0)), 28);
    else assert.is(await errno(() => exp.write(new Uint8Array(1), 0, 0)), 1);
    await cleanup?.();
  });

  S.run();
}
