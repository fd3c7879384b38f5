// Overlays over what the sniffing opener serves, through the real `serve` CLI: --snapshot and
// --overlay over the CUE sheet kinds not covered by overlay-cd.ts (a MODE1/2048 sheet over an ISO,
// a multi-FILE Redump sheet), an ISO, compressed images (.img.xz, .img.gz, .zip) and VHDs (fixed
// and dynamic) give one writable export holding the bytes the image serves without an overlay;
// writes read back, persist in a named overlay across restarts, and never touch the image.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { connect } from "../src/client/index.ts";
import { bytesEqual } from "./helpers/assert.ts";
import { rng } from "./helpers/conformance.ts";
import { need, runOk, scratch } from "./helpers/env.ts";
import { serve } from "./helpers/server.ts";
import { fix } from "./cd-helpers.ts";

const test = suite("overlay formats");
const dir = scratch("bun-nbd-overlay-formats-");
const p = (f: string) => join(dir, f);
const MiB = 1 << 20;
const sha = (b: Uint8Array) => new Bun.CryptoHasher("sha256").update(b).digest("hex");
let raw: Uint8Array;
let n = 0;

test.before(async () => {
  need("xz", "gzip", "zip", "qemu-img");
  const r = rng(3);
  raw = Uint8Array.from({ length: 3 * MiB }, (_, i) => ((i >> 15) & 1 ? r(256) : i & 0x3f));
  writeFileSync(p("disk.img"), raw);
  await runOk(["sh", "-c", "xz -T1 --block-size=512KiB -c disk.img > x.img.xz && gzip -c disk.img > g.img.gz && zip -q z.zip disk.img"], { cwd: dir });
  await runOk(["qemu-img", "convert", "-f", "raw", "-O", "vpc", p("disk.img"), p("dyn.vhd")]);
  await runOk(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed", p("disk.img"), p("fix.vhd")]);
  mkdirSync(p("split"));
  for (const f of ["mixed.cue", "mixed (Track 1).bin", "mixed (Track 2).bin", "mixed (Track 3).bin"]) copyFileSync(fix(`split/${f}`), p(`split/${f}`));
  mkdirSync(p("c2048"));
  for (const f of ["disc1.cue", "disc1.iso"]) copyFileSync(fix(`disc1_2048/${f}`), p(`c2048/${f}`));
  copyFileSync(fix("disc1_2048/disc1.iso"), p("disc.iso"));
});

/** Serve FILE through an overlay; check the one export holds `want` (or `start`), write, read back. */
async function through(args: string[], name: string, want: Uint8Array, start?: Uint8Array): Promise<Uint8Array> {
  const srv = await serve(args, { socket: p(`s${n++}`) });
  try {
    const nbd = await connect(srv.uri(name));
    try {
      assert.ok(nbd.info.size >= want.length, `size ${nbd.info.size}`);
      const view = await nbd.read(0, want.length);
      bytesEqual(view, start ?? want, `${args.join(" ")}: the bytes through the overlay`);
      assert.not.ok(nbd.info.readOnly, "writable through the overlay");
      const r = rng(n);
      for (let k = 0; k < 10; k++) {
        const len = 1 + r(20000);
        const off = r(want.length - len);
        const data = Uint8Array.from({ length: len }, () => r(256));
        view.set(data, off);
        await nbd.pwrite(data, off);
      }
      await nbd.flush();
      bytesEqual(await nbd.read(0, want.length), view, "writes read back");
      return view;
    } finally {
      await nbd.close();
    }
  } finally {
    assert.is(await srv.stop(), 0, srv.output());
  }
}

for (const [file, name] of [["x.img.xz", "x"], ["g.img.gz", "g"], ["z.zip", "z"], ["dyn.vhd", "dyn"], ["fix.vhd", "fix"]] as const) {
  test(`--snapshot and --overlay over ${file}: writable, the image untouched, writes persist in the overlay`, async () => {
    const before = sha(readFileSync(p(file)));
    await through(["--snapshot", p(file)], name, raw);
    const ov = p(`${name}.qcow2`);
    const held = await through(["--overlay", ov, p(file)], name, raw);
    await through(["--overlay", ov, p(file)], name, raw, held);
    assert.is(sha(readFileSync(p(file))), before, `${file} unchanged`);
    const info = JSON.parse((await runOk(["qemu-img", "info", "--output=json", ov])).stdout);
    assert.is(info["backing-filename-format"], "bun-nbd", "a device-stack base, named so QEMU does not read the container as raw");
  });
}

test("--snapshot over an ISO, a MODE1/2048 sheet and a multi-FILE sheet serves the cooked bytes writable", async () => {
  const iso = new Uint8Array(readFileSync(fix("disc1_2048/disc1.iso")));
  await through(["--snapshot", p("disc.iso")], "disc", iso);
  await through(["--snapshot", p("c2048/disc1.cue")], "disc1", iso);
  await through(["--snapshot", p("split/mixed.cue")], "mixed", iso);
  assert.is(sha(readFileSync(p("disc.iso"))), sha(iso), "the ISO is unchanged");
});

test.run();
