// Floppy images: the ten standard sizes are recognised with their geometry by `inspect` and in
// the export description; .ima, .vfd and .flp files are served like .img (read-write, byte for
// byte); a size that is not a whole number of sectors is reported.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { copyFileSync, readFileSync, truncateSync } from "node:fs";
import { join } from "node:path";
import { FLOPPIES, chs } from "../src/inspect/index.ts";
import { bytesEqual } from "./helpers/assert.ts";
import { BUN, CLI, need, runOk, scratch, SYSTEM_PATH } from "./helpers/env.ts";
import { blkid } from "./helpers/images.ts";
import { serve } from "./helpers/server.ts";

const test = suite("floppies");
const dir = scratch("bun-nbd-floppy-");
const env = { PATH: SYSTEM_PATH };
const inspectJson = async (p: string) => JSON.parse((await runOk([BUN, CLI, "inspect", "--json", p])).stdout);
const KIB: Record<string, number> = { "160K": 160, "180K": 180, "320K": 320, "360K": 360, "720K": 720, "1.2M": 1200, "1.44M": 1440, "1.68M DMF": 1680, "1.72M": 1722, "2.88M": 2880 };

test.before(() => need("mkfs.fat", "nbdinfo", "nbdcopy", "blkid"));

test("every standard floppy size is recognised with its geometry, and blkid agrees on the file system", async () => {
  for (const g of FLOPPIES) {
    const p = join(dir, `f${KIB[g.name]}.img`);
    await runOk(["mkfs.fat", "-F", "12", "-n", "FLOPPY", "-C", p, String(KIB[g.name])], { env });
    const r = await inspectJson(p);
    assert.equal(r.floppy, g, `${g.name}: geometry`);
    assert.is(r.filesystem.type, "vfat");
    const b = await blkid(p);
    assert.is(r.filesystem.version, b.VERSION, `${g.name}: FAT version as blkid`);
    assert.is(r.filesystem.uuid, b.UUID, `${g.name}: serial as blkid`);
    const text = (await runOk([BUN, CLI, "inspect", p])).stdout;
    assert.match(text, new RegExp(`floppy ${g.name.replace(".", "\\.")}: ${chs(g)} \\(cylinders/heads/sectors per track\\)`));
  }
});

test(".ima, .vfd and .flp are served like .img: read-write, byte for byte, described with geometry", async () => {
  const src = join(dir, "f1440.img");
  const files = ["disk.ima", "other.vfd", "third.flp"].map((n) => { const p = join(dir, n); copyFileSync(src, p); return p; });
  const s = await serve(files);
  try {
    const list = JSON.parse((await runOk(["nbdinfo", "--list", "--json", s.uri()], { env })).stdout).exports as { "export-name": string; description: string; "is_read_only": boolean }[];
    assert.equal(list.map((e) => e["export-name"]), ["disk", "other", "third"]);
    for (const e of list) {
      assert.match(e.description, /^raw image \w+\.(ima|vfd|flp): FAT12 floppy 1\.44M, not bootable, 80\/2\/18 C\/H\/S$/);
      assert.is(e.is_read_only, false);
    }
    for (const [i, f] of files.entries()) {
      const out = join(dir, `copy${i}`);
      await runOk(["nbdcopy", s.uri(list[i]!["export-name"]), out], { env });
      bytesEqual(readFileSync(out), readFileSync(f), `${f} over NBD`);
    }
    assert.match(s.output(), /if=floppy -boot a/);
  } finally { await s.stop(); }
});

test("a size that is not a whole number of sectors is reported; no floppy geometry is guessed", async () => {
  const p = join(dir, "odd.img");
  copyFileSync(join(dir, "f1440.img"), p);
  truncateSync(p, 1474560 + 100);
  const r = await inspectJson(p);
  assert.is(r.partialSector, 100);
  assert.is(r.floppy, undefined);
  assert.ok(r.warnings.some((w: string) => /not a whole number of 512-byte sectors \(100 bytes over\)/.test(w)), r.warnings.join("; "));
});

test.run();
