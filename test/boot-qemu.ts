// QEMU boots from bun-nbd exports (SeaBIOS int 13h): IDE and virtio disks against a copy of
// examples/boot.img and against an 8 GiB sparse image (its last-LBA read is above 4 GiB), an
// El Torito CD-ROM served read-only, an overlay export (writes go to a qcow2, the base stays), and
// a 1.44M FAT12 floppy (if=floppy -boot a, CHS reads and a write). Checked from the host: QEMU exit
// status 33, every serial line in order, and the sector the guest wrote, both over a fresh NBD
// connection and in the file.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { copyFileSync, mkdirSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { bytesEqual } from "./helpers/assert.ts";
import { need, ROOT, run, runOk, scratch } from "./helpers/env.ts";
import { boot, fileBytes, type BootMode } from "./e2e/boot.ts";
import { expectedWrittenSector, GiB, hdExpectations, makeCdIso, makeFloppyImage, makeHdImage, MiB } from "./e2e/images.ts";
import { nbdRead, nbdSize } from "./e2e/nbdhost.ts";
import { BACKEND, startServer } from "./e2e/server.ts";

const test = suite("boot");
const dir = scratch("bun-nbd-boot-");
const timings: string[] = [];

test.before(() => need("qemu-system-x86_64", "qemu-img", "xorriso", "mkfs.fat"));
test.after(() => console.log(`  boot tests (${BACKEND}): ${timings.join(", ")}`));

async function hdCase(mode: BootMode, image: string, size: number) {
  const want = hdExpectations(size);
  const server = await startServer([image]);
  try {
    const uri = server.uri("boot");
    assert.is(await nbdSize(uri), size, "export size seen by libnbd");
    bytesEqual(await nbdRead(uri, want.writeLba * 512, 512), new Uint8Array(512), "target sector before boot");
    const { run, problems } = await boot(mode, uri, want.expect, join(dir, `log-${mode}-${size}`));
    timings.push(`${mode} ${size >= GiB ? size / GiB + "GiB" : size / MiB + "MiB"} qemu ${run.seconds.toFixed(2)}s`);
    assert.ok(problems.length === 0, problems.join("\n"));
    bytesEqual(await nbdRead(uri, want.writeLba * 512, 512), expectedWrittenSector(), "written sector over a fresh NBD connection");
  } finally {
    assert.is(await server.stop(), 0, "server exit status after SIGTERM");
  }
  bytesEqual(fileBytes(image, want.writeLba * 512, 512), expectedWrittenSector(), "written sector in the image file");
}

// copies named boot.img in per-case directories, so the export is always called "boot"
function copyOfExample(tag: string): string {
  const d = join(dir, tag);
  mkdirSync(d, { recursive: true });
  const p = join(d, "boot.img");
  copyFileSync(join(ROOT, "examples/boot.img"), p);
  return p;
}
function bigImage(tag: string): string {
  const d = join(dir, tag);
  mkdirSync(d, { recursive: true });
  return makeHdImage(join(d, "boot.img"), 8 * GiB).path;
}

test("IDE disk: copy of examples/boot.img", () => hdCase("ide", copyOfExample("ide-4m"), 4 * MiB));
test("virtio disk: copy of examples/boot.img", () => hdCase("virtio", copyOfExample("virtio-4m"), 4 * MiB));
test("IDE disk: 8 GiB sparse image (last LBA above 4 GiB)", async () => {
  const p = bigImage("ide-8g");
  await hdCase("ide", p, 8 * GiB);
  assert.ok(statSync(p).blocks * 512 < 16 * MiB, "image stays sparse");
});
test("virtio disk: 8 GiB sparse image", () => hdCase("virtio", bigImage("virtio-8g"), 8 * GiB));

test("IDE disk: overlay export (--overlay), base image unchanged", async () => {
  if (BACKEND !== "bun-nbd") return console.log("  (overlay case needs bun-nbd)");
  const base = copyOfExample("overlay");
  const ov = join(dir, "overlay", "boot-overlay.qcow2");
  const want = hdExpectations(4 * MiB);
  const server = await startServer([base], { extra: ["--overlay", ov] });
  try {
    const { run, problems } = await boot("ide", server.uri("boot"), want.expect, join(dir, "log-overlay"));
    timings.push(`ide overlay qemu ${run.seconds.toFixed(2)}s`);
    assert.ok(problems.length === 0, problems.join("\n"));
    bytesEqual(await nbdRead(server.uri("boot"), want.writeLba * 512, 512), expectedWrittenSector(), "written sector over a fresh NBD connection");
  } finally {
    assert.is(await server.stop(), 0, "server exit status after SIGTERM");
  }
  bytesEqual(readFileSync(base), readFileSync(join(ROOT, "examples/boot.img")), "base image after the boot");
  const check = await run(["qemu-img", "check", ov], { timeoutMs: 60_000 });
  assert.is(check.code, 0, `qemu-img check: ${check.stdout}${check.stderr}`);
  const raw = join(dir, "overlay", "flat.raw");
  await runOk(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", ov, raw], { timeoutMs: 60_000 });
  bytesEqual(fileBytes(raw, want.writeLba * 512, 512), expectedWrittenSector(), "written sector in the overlay (qemu-img convert)");
});

test("virtio disk: --snapshot export, writes seen during the session, base unchanged", async () => {
  if (BACKEND !== "bun-nbd") return console.log("  (snapshot case needs bun-nbd)");
  const base = copyOfExample("snapshot");
  const want = hdExpectations(4 * MiB);
  const server = await startServer([base], { extra: ["--snapshot"] });
  try {
    const { run, problems } = await boot("virtio", server.uri("boot"), want.expect, join(dir, "log-snapshot"));
    timings.push(`virtio snapshot qemu ${run.seconds.toFixed(2)}s`);
    assert.ok(problems.length === 0, problems.join("\n"));
    bytesEqual(await nbdRead(server.uri("boot"), want.writeLba * 512, 512), expectedWrittenSector(), "written sector over a fresh NBD connection");
  } finally {
    assert.is(await server.stop(), 0, "server exit status after SIGTERM");
  }
  bytesEqual(readFileSync(base), readFileSync(join(ROOT, "examples/boot.img")), "base image after the boot");
});

test("floppy: 1.44M FAT12 image booted with if=floppy -boot a (CHS reads of several sectors, a write)", async () => {
  const d = join(dir, "floppy");
  mkdirSync(d, { recursive: true });
  const fd = await makeFloppyImage(join(d, "floppy.img"));
  const server = await startServer([fd.path]);
  try {
    const uri = server.uri("floppy");
    assert.is(await nbdSize(uri), 1474560, "export size seen by libnbd");
    const { run, problems } = await boot("floppy", uri, fd.expect, join(dir, "log-floppy"));
    timings.push(`floppy qemu ${run.seconds.toFixed(2)}s`);
    assert.ok(problems.length === 0, problems.join("\n"));
    bytesEqual(await nbdRead(uri, fd.writeLba * 512, 512), expectedWrittenSector(), "written sector over a fresh NBD connection");
    if (BACKEND === "bun-nbd") {
      assert.match(server.output(), /FAT12 floppy 1\.44M, bootable, 80\/2\/18 C\/H\/S/, "serve says what it serves");
      assert.match(server.output(), /-drive file=nbd:\/\/127\.0\.0\.1:\d+\/floppy,format=raw,if=floppy -boot a/, "and prints a QEMU line for a floppy");
    }
  } finally {
    assert.is(await server.stop(), 0, "server exit status after SIGTERM");
  }
  bytesEqual(fileBytes(fd.path, fd.writeLba * 512, 512), expectedWrittenSector(), "written sector in the image file");
  const fsck = await run(["fsck.fat", "-n", fd.path], { timeoutMs: 30_000 });
  assert.is(fsck.code, 0, `the FAT12 file system is still valid: ${fsck.stdout}${fsck.stderr}`);
});

test("CD-ROM: El Torito ISO served read-only (-r)", async () => {
  const iso = await makeCdIso(join(dir, "cd.iso"), dir);
  const server = await startServer([iso.path], { readOnly: true });
  try {
    const { run, problems } = await boot("cdrom", server.uri("cd"), iso.expect, join(dir, "log-cd"));
    timings.push(`cdrom qemu ${run.seconds.toFixed(2)}s`);
    assert.ok(problems.length === 0, problems.join("\n"));
  } finally {
    assert.is(await server.stop(), 0, "server exit status after SIGTERM");
  }
});

test.run();
