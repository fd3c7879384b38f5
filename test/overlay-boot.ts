// End to end: QEMU (SeaBIOS, TCG) boots examples/boot.img through a bun-nbd overlay export; the
// guest writes its sector; the base stays byte-for-byte the same; then the overlay file boots
// directly in QEMU (`-drive file=overlay.qcow2`, no bun-nbd) and the guest sees the changes made
// through bun-nbd (a marker the host rewrote over NBD, and the sector the first guest wrote).
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { copyFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { bytesEqual } from "./helpers/assert.ts";
import { need, ROOT, runOk, scratch } from "./helpers/env.ts";
import { serve } from "./helpers/server.ts";
import { boot, BOOT_TIMEOUT_MS, fileBytes } from "./e2e/boot.ts";
import { expectedWrittenSector, HD, hdExpectations } from "./e2e/images.ts";
import { runQemu, tail } from "./e2e/qemu.ts";
import { connect } from "../src/client/index.ts";
import { assertClean, sha256 } from "./overlay-support.ts";

const test = suite("overlay-boot");
const dir = scratch("bun-nbd-overlay-boot-");

test.before(() => need("qemu-system-x86_64", "qemu-img"));

const NEW_MID = "OVERLAY-MARKER-1MiB";

test("QEMU boots through an overlay export, then boots the overlay file directly", async () => {
  const basePath = join(dir, "boot.img");
  copyFileSync(join(ROOT, "examples/boot.img"), basePath);
  const size = statSync(basePath).size;
  const want = hdExpectations(size);
  const baseSha = sha256(basePath);
  const ov = join(dir, "boot.qcow2");

  const srv = await serve(["--overlay", ov, basePath], { socket: join(dir, "sock") });
  try {
    const uri = srv.uri("boot");
    const nbd = await connect(uri);
    // the target sector starts out cleared (through the overlay), as the boot recipe does
    await nbd.pwrite(new Uint8Array(512), want.writeLba * 512);
    await nbd.flush();
    await nbd.close();
    const { run, problems } = await boot("ide", uri, want.expect, join(dir, "log-nbd"));
    assert.ok(problems.length === 0, problems.join("\n"));
    const after = await connect(uri);
    bytesEqual(await after.read(want.writeLba * 512, 512), expectedWrittenSector(), "the guest's sector over NBD");
    // a change the direct boot must show: the marker the guest prints from LBA 2048
    await after.pwrite(new TextEncoder().encode(NEW_MID + "\0"), HD.MID_LBA * 512);
    await after.flush();
    await after.close();
    console.log(`  boot through the overlay export: qemu ${run.seconds.toFixed(2)}s`);
  } finally {
    assert.is(await srv.stop(), 0, `server exit status\n${srv.output()}`);
  }
  assert.is(sha256(basePath), baseSha, "base unchanged after the guest wrote");
  await assertClean(ov, "after the NBD boot");
  const info = JSON.parse((await runOk(["qemu-img", "info", "--output=json", ov])).stdout);
  assert.is(info["backing-filename"], "boot.img");

  // QEMU's own block layer sees the guest's sector in the overlay
  const raw = join(dir, "converted.raw");
  await runOk(["qemu-img", "convert", "-O", "raw", ov, raw]);
  bytesEqual(fileBytes(raw, want.writeLba * 512, 512), expectedWrittenSector(), "the guest's sector, read by qemu-img convert");

  // direct boot of the overlay file, no bun-nbd involved
  const expect = want.expect.map((l) => l.includes(HD.MID_TEXT) ? l.replace(HD.MID_TEXT, NEW_MID) : l);
  const direct = await runQemu(["-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot", "-boot", "reboot-timeout=0",
    "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-drive", `file=${ov},format=qcow2,if=ide`], { timeoutMs: BOOT_TIMEOUT_MS, logDir: join(dir, "log-direct") });
  assert.is(direct.code, 33, `direct boot exit status\n${tail(direct)}`);
  let from = 0;
  for (const e of expect) {
    const i = direct.lines.findIndex((l, k) => k >= from && l.text.includes(e));
    assert.ok(i >= 0, `direct boot: missing serial line ${JSON.stringify(e)}\n${tail(direct)}`);
    from = i;
  }
  console.log(`  direct boot of the overlay: qemu ${direct.seconds.toFixed(2)}s`);
  assert.is(sha256(basePath), baseSha, "base unchanged after the direct boot");
  await assertClean(ov, "after the direct boot");
});

test.run();

