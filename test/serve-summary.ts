// What `serve` says about each export: one short phrase from inspect and a QEMU line that fits
// (if=floppy for floppies, media=cdrom for CDs, readonly=on and virtio for read-only disks, OVMF
// for a disk that only boots with UEFI), also as the export's description in LIST.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { join } from "node:path";
import { need, ROOT, runOk, scratch, SYSTEM_PATH } from "./helpers/env.ts";
import { fsImage, makeDisk, makeIso, MiB } from "./helpers/images.ts";
import { serve } from "./helpers/server.ts";

const test = suite("serve: per-export summaries");
const dir = scratch("bun-nbd-summary-");

test.before(() => need("xorriso", "sgdisk", "sfdisk", "mkfs.fat", "mkfs.ext4", "nbdinfo"));

/** The two lines serve prints under export `name`. */
function under(out: string, name: string): [string, string] {
  const lines = out.split("\n");
  const i = lines.findIndex((l) => new RegExp(`^  ${name.replace(/[/.]/g, "\\$&")} +\\d`).test(l));
  assert.ok(i >= 0, `no line for ${name} in:\n${out}`);
  return [lines[i + 1]!.trim(), lines[i + 2]!.trim()];
}

test("an El Torito ISO, a CUE sheet, a UEFI-only GPT disk and a bare ext4 image", async () => {
  const iso = await makeIso(dir, "cd.iso", "SUMMARYCD");
  const gpt = await makeDisk(dir, "uefi.img", "gpt", 64 * MiB, [
    { size: 34 * MiB, type: "ef00", fs: "fat16", label: "ESP", name: "EFI system" },
    { size: "rest", type: "8300", fs: "ext4", label: "root" },
  ]);
  const ext = await fsImage(dir, "data.img", "ext4", 16 * MiB, "DATA");
  const s = await serve([iso, join(ROOT, "test/fixtures/cd/disc1/disc1.cue"), gpt.path, ext]);
  try {
    const out = s.output();
    let [phrase, qemu] = under(out, "cd");
    assert.is(phrase, `ISO 9660 "SUMMARYCD", El Torito`);
    assert.match(qemu, /-drive file=nbd:\/\/127\.0\.0\.1:\d+\/cd,format=raw,media=cdrom,readonly=on -boot d$/);
    [phrase, qemu] = under(out, "disc1");
    assert.match(phrase, /^ISO 9660/);
    assert.match(qemu, /media=cdrom,readonly=on/);
    [phrase, qemu] = under(out, "uefi");
    assert.is(phrase, "GPT: ESP + ext4, bootable (UEFI)");
    assert.match(qemu, /-bios \/usr\/share\/ovmf\/OVMF\.fd -drive file=nbd:\/\/127\.0\.0\.1:\d+\/uefi,format=raw$/);
    [phrase, qemu] = under(out, "data");
    assert.is(phrase, `ext4 "DATA"`);
    assert.match(qemu, /-drive file=nbd:\/\/127\.0\.0\.1:\d+\/data,format=raw$/);
    const list = JSON.parse((await runOk(["nbdinfo", "--list", "--json", s.uri()], { env: { PATH: SYSTEM_PATH } })).stdout).exports as { "export-name": string; description: string }[];
    assert.is(list.find((e) => e["export-name"] === "uefi")?.description, "raw image uefi.img: GPT: ESP + ext4, bootable (UEFI)");
  } finally { await s.stop(); }
});

test("a read-only export gets readonly=on, and a disk goes on virtio (QEMU has no read-only IDE disk)", async () => {
  const ext = await fsImage(dir, "ro.img", "ext4", 8 * MiB, "RO");
  const s = await serve(["-r", ext]);
  try {
    const [, qemu] = under(s.output(), "ro");
    assert.match(qemu, /-drive file=nbd:\/\/127\.0\.0\.1:\d+\/ro,format=raw,if=virtio,readonly=on$/);
  } finally { await s.stop(); }
});

test.run();
