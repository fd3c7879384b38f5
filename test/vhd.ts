// VHD against QEMU: fixed and dynamic images written by `qemu-img create -f vpc` (then qemu-io
// writes) and by `qemu-img convert -O vpc` read byte-identical to `qemu-img convert -f vpc -O raw`
// of the same file; a fixed VHD is written through the raw plugin and QEMU reads the writes back;
// damaged footers, BATs past the end, differencing disks and truncated files are refused by name.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { copyFileSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { openExports } from "../src/devices/open.ts";
import type { BlockDevice } from "../src/devices/types.ts";
import { vhdChecksum } from "../src/devices/vhd/format.ts";
import { bytesEqual } from "./helpers/assert.ts";
import { conformance, rng } from "./helpers/conformance.ts";
import { need, runOk, scratch } from "./helpers/env.ts";

need("qemu-img", "qemu-io");
const dir = scratch("bun-nbd-vhd-");
const p = (f: string) => join(dir, f);
const MiB = 1024 * 1024;
const quiet = { log: () => {} };

async function open(file: string, readOnly = true): Promise<{ device: BlockDevice; description: string }> {
  const [e] = await openExports([p(file)], { ...quiet, readOnly });
  return { device: e!.device, description: e!.description ?? "" };
}

function readAll(d: BlockDevice): Uint8Array {
  const b = new Uint8Array(d.size());
  d.pread(b, 0, 0);
  return b;
}

/** What QEMU reads from a VHD. */
async function qemuRaw(file: string): Promise<Uint8Array> {
  const out = p(`${file}.qemu.raw`);
  await runOk(["qemu-img", "convert", "-f", "vpc", "-O", "raw", p(file), out]);
  return new Uint8Array(readFileSync(out));
}

const writes = ["write -P 0x5a 1M 64k", "write -P 0xa5 3583k 2k", "write -P 0x11 9M 4k", "write -P 0x77 0 512"];

async function refused(file: string, re: RegExp): Promise<void> {
  try {
    const { device } = await open(file);
    await device.close?.();
  } catch (e) {
    assert.match((e as Error).message, re);
    return;
  }
  assert.unreachable(`${file} was opened; expected ${re}`);
}

const setup = (async () => {
  const r = rng(5);
  const raw = Uint8Array.from({ length: 12 * MiB }, (_, i) => (i >> 20) % 3 === 1 ? 0 : r(256));
  writeFileSync(p("src.raw"), raw);
  for (const sub of ["fixed", "dynamic"]) {
    await runOk(["qemu-img", "create", "-q", "-f", "vpc", "-o", `subformat=${sub}`, p(`${sub}.vhd`), "20M"]);
    await runOk(["qemu-io", "-f", "vpc", ...writes.flatMap((w) => ["-c", w]), p(`${sub}.vhd`)]);
    await runOk(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", `subformat=${sub}`, p("src.raw"), p(`conv-${sub}.vhd`)]);
  }
})();

const test = suite("vhd");
test.before(() => setup);

for (const f of ["fixed.vhd", "dynamic.vhd", "conv-fixed.vhd", "conv-dynamic.vhd"]) {
  test(`${f} reads byte-identical to qemu-img convert -f vpc -O raw`, async () => {
    const want = await qemuRaw(f);
    const { device, description } = await open(f);
    assert.match(description, f.includes("fixed") ? /fixed VHD, .* MiB \(made by qemu/ : /dynamic VHD, .* blocks of 2 MiB allocated \(made by qemu/);
    bytesEqual(readAll(device), want, f);
    const r = rng(f.length);
    for (let i = 0; i < 40; i++) {
      const len = 1 + r(300_000);
      const off = r(want.length - len);
      const b = new Uint8Array(len);
      device.pread(b, off, 0);
      bytesEqual(b, want.subarray(off, off + len), `${f} [${off}, +${len})`);
    }
    await device.close?.();
  });
}

test("a dynamic VHD reports unallocated blocks as holes", async () => {
  const { device } = await open("dynamic.vhd");
  const ext: [number, number, number][] = [];
  device.extents!(0, device.size(), 0, { add: (o, l, t) => { ext.push([o, l, t]); return true; } });
  assert.equal(ext[0], [0, 2 * MiB, 0], "block 0 holds data");
  assert.equal(ext[2], [4 * MiB, 2 * MiB, 3], "block 2 was never written");
  await device.close?.();
});

test("a fixed VHD is read-write: QEMU reads back what was written, the footer is untouched", async () => {
  copyFileSync(p("fixed.vhd"), p("rw.vhd"));
  const footer = readFileSync(p("rw.vhd")).subarray(-512);
  const { device } = await open("rw.vhd", false);
  assert.ok(device.capabilities().canWrite);
  const range = { fd: -1, offset: -1 };
  assert.ok(device.fileRange?.(4096, 65536, range) && range.offset === 4096, "reads go out with sendfile");
  const data = Uint8Array.from({ length: 100_000 }, (_, i) => i * 7);
  device.pwrite!(data, 5 * MiB + 3, 0);
  device.flush!(0);
  await device.close?.();
  const back = await qemuRaw("rw.vhd");
  bytesEqual(back.subarray(5 * MiB + 3, 5 * MiB + 3 + data.length), data, "QEMU sees the write");
  bytesEqual(readFileSync(p("rw.vhd")).subarray(-512), footer, "footer unchanged");
});

test("damaged VHDs are refused by name", async () => {
  const f = new Uint8Array(readFileSync(p("dynamic.vhd")));
  const end = f.length - 512;
  const bad = new Uint8Array(f);
  bad[end + 100]! ^= 1;
  writeFileSync(p("badsum.vhd"), bad);
  await refused("badsum.vhd", /VHD footer checksum mismatch \(stored 0x[0-9a-f]{8}, computed 0x[0-9a-f]{8}\)/);
  // BAT entry 0 pointing far past the end (header copy at 0 says where the BAT is).
  const dv = new DataView(f.buffer);
  const bat = Number(dv.getBigUint64(512 + 16));
  const past = new Uint8Array(f);
  new DataView(past.buffer).setUint32(bat, 0x00100000);
  writeFileSync(p("batpast.vhd"), past);
  await refused("batpast.vhd", /BAT entry 0 points past the end of the file/);
  // A differencing disk (type 4, checksum fixed up).
  const diff = new Uint8Array(f);
  const foot = diff.subarray(end);
  new DataView(foot.buffer, foot.byteOffset).setUint32(60, 4);
  new DataView(foot.buffer, foot.byteOffset).setUint32(64, vhdChecksum(foot, 64));
  writeFileSync(p("diff.vhd"), diff);
  await refused("diff.vhd", /is a differencing VHD .*not supported/);
  // Truncated: the end footer is gone (only the copy at the start says "VHD").
  writeFileSync(p("cut.vhd"), f.subarray(0, f.length - 4096));
  await refused("cut.vhd", /no "conectix" cookie/);
  const fx = new Uint8Array(readFileSync(p("fixed.vhd")));
  const fxFoot = fx.slice(-512);
  writeFileSync(p("fixcut.vhd"), Buffer.concat([fx.subarray(0, 4 * MiB), fxFoot]));
  await refused("fixcut.vhd", /the footer says \d+ bytes, but only \d+ precede it \(truncated\?\)/);
});

test.run();

conformance("fixed VHD (read-write)", {
  make: async () => {
    await setup;
    const name = `c${Math.random().toString(36).slice(2)}.vhd`;
    copyFileSync(p("conv-fixed.vhd"), p(name));
    const { device } = await open(name, false);
    return { device, cleanup: () => device.close?.() };
  },
  ops: 100,
});

conformance("dynamic VHD (read-only)", {
  make: async () => {
    await setup;
    const expected = await qemuRaw("dynamic.vhd");
    const { device } = await open("dynamic.vhd");
    return { device, expected, cleanup: () => device.close?.() };
  },
  ops: 100,
});
