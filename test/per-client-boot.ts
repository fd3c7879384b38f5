// End to end, the boot farm: one base (a copy of examples/boot.img) served from a config file with
// overlay = "per-client", and two QEMU guests (SeaBIOS, TCG) booting from it at the same time
// through base@vm1 and base@vm2. Before the boots the host gives each VM its own marker at LBA 2048
// through its own name; each guest prints the marker it reads there (its own only) and writes its
// sector. Afterwards each overlay holds its guest's sector and its marker, a client that never
// booted sees neither, the base file is byte for byte the same, and both overlays are clean qcow2.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { copyFileSync, mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { bytesEqual } from "./helpers/assert.ts";
import { need, ROOT, run, scratch } from "./helpers/env.ts";
import { serve } from "./helpers/server.ts";
import { boot } from "./e2e/boot.ts";
import { expectedWrittenSector, HD, hdExpectations } from "./e2e/images.ts";
import { connect } from "../src/client/index.ts";
import { sha256 } from "./overlay-support.ts";

const test = suite("per-client boot");
const dir = scratch("bun-nbd-farm-");

test.before(() => need("qemu-system-x86_64", "qemu-img"));

test("QEMU boots two VMs at once from one base through base@vm1 and base@vm2", async () => {
  const basePath = join(dir, "base.img");
  copyFileSync(join(ROOT, "examples/boot.img"), basePath);
  const ov = join(dir, "overlays");
  mkdirSync(ov);
  const cfg = join(dir, "farm.toml");
  writeFileSync(cfg, `[server]\nlisten = ["127.0.0.1:0"]\n\n[[export]]\nname = "base"\nfile = "base.img"\noverlay = "per-client"\noverlay-dir = "overlays"\n`);
  const want = hdExpectations(4 << 20);
  const baseSha = sha256(basePath);
  const marker = (vm: string) => `${vm.toUpperCase()}-OWN-MARKER`;
  const vms = ["vm1", "vm2"];

  const srv = await serve(["--config", cfg]);
  try {
    for (const vm of vms) {
      const c = await connect(srv.uri(`base@${vm}`));
      await c.pwrite(new TextEncoder().encode(marker(vm) + "\0"), HD.MID_LBA * 512);
      await c.pwrite(new Uint8Array(512), want.writeLba * 512); // the target sector starts out cleared
      await c.flush();
      await c.close();
    }
    const runs = await Promise.all(vms.map((vm, i) => {
      const expect = want.expect.map((l) => l.includes(HD.MID_TEXT) ? l.replace(HD.MID_TEXT, marker(vm)) : l);
      return boot(i === 0 ? "ide" : "virtio", srv.uri(`base@${vm}`), expect, join(dir, `log-${vm}`));
    }));
    runs.forEach((r, i) => {
      assert.ok(r.problems.length === 0, `${vms[i]}: ${r.problems.join("\n")}`);
      const other = marker(vms[1 - i]!);
      assert.not.ok(r.run.lines.some((l) => l.text.includes(other)), `${vms[i]} never sees ${other}`);
    });
    console.log(`  two guests at once: qemu ${runs.map((r) => r.run.seconds.toFixed(2) + "s").join(", ")}`);
    for (const vm of vms) {
      const c = await connect(srv.uri(`base@${vm}`));
      bytesEqual(await c.read(want.writeLba * 512, 512), expectedWrittenSector(), `${vm}: the sector its guest wrote`);
      const mid = await c.read(HD.MID_LBA * 512, 64);
      assert.is(new TextDecoder().decode(mid).split("\0")[0], marker(vm));
      await c.close();
    }
    const fresh = await connect(srv.uri("base@vm3"));
    bytesEqual(await fresh.read(want.writeLba * 512, 512), new Uint8Array(512), "vm3 (never booted) has neither guest's sector");
    assert.is(new TextDecoder().decode(await fresh.read(HD.MID_LBA * 512, 64)).split("\0")[0], HD.MID_TEXT);
    await fresh.close();
  } finally {
    assert.is(await srv.stop(), 0, srv.output());
  }
  assert.is(sha256(basePath), baseSha, "the base never changes");
  for (const vm of vms) {
    const r = await run(["qemu-img", "check", join(ov, `base@${vm}.qcow2`)]);
    assert.is(r.code, 0, `${vm}: ${r.stdout}${r.stderr}`);
  }
});

test.run();
