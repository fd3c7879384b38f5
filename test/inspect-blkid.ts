// Differential test of src/inspect against util-linux: every image the real mkfs tools, sfdisk,
// sgdisk and xorriso make is inspected by bun-nbd and by `blkid -p -o export` (with -O/-S for each
// partition) and `sfdisk --json`; type, version, label, UUID, PTTYPE/PTUUID and every partition's
// start, size, type, bootable flag, GPT name and UUID must match. Prints how much was compared.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { join } from "node:path";
import { RawFile } from "../src/devices/file.ts";
import { deviceSource } from "../src/devices/partition-exports.ts";
import { inspect, type FsInfo, type Report } from "../src/inspect/index.ts";
import { need, scratch } from "./helpers/env.ts";
import { blkid, fsImage, makeDisk, makeIso, MiB, sfdiskLayout, type FsKind } from "./helpers/images.ts";

const test = suite("inspect vs blkid/sfdisk");
const dir = scratch("bun-nbd-inspect-");
let images = 0, fields = 0;

test.before(() => need("blkid", "sfdisk", "sgdisk", "mkfs.fat", "mkfs.exfat", "mkfs.ntfs", "mkfs.ext4", "mkswap", "mkfs.xfs", "mkfs.btrfs", "mkudffs", "xorriso"));
test.after(() => console.log(`  differential: ${images} images, ${fields} fields compared with blkid/sfdisk, all equal`));

async function inspectFile(path: string): Promise<Report> {
  const f = RawFile.open(path, { readOnly: true });
  try { return await inspect(deviceSource(f), { source: path }); } finally { f.close(); }
}

/** Compare one file system with blkid's view of the same bytes. */
function sameFs(what: string, mine: FsInfo | undefined, theirs: Record<string, string>): void {
  assert.is(mine?.type, theirs.TYPE, `${what}: TYPE`);
  assert.is(mine?.version, theirs.VERSION, `${what}: VERSION`);
  assert.is(mine?.label, theirs.LABEL, `${what}: LABEL`);
  assert.is(mine?.uuid, theirs.UUID, `${what}: UUID`);
  fields += 4;
}

const WHOLE: [FsKind, number, string][] = [
  ["fat12", 1474560, "FLOPPY144"], ["fat12", 737280, "FLOPPY720"], ["fat16", 32 * MiB, "MYFAT16"], ["fat32", 64 * MiB, "MYFAT32"],
  ["exfat", 16 * MiB, "EXLABEL"], ["ntfs", 16 * MiB, "NTLABEL"], ["ext2", 8 * MiB, "EXT2"], ["ext3", 16 * MiB, "EXT3"],
  ["ext4", 16 * MiB, "EXT4"], ["swap", 8 * MiB, "SWAPL"], ["xfs", 300 * MiB, "XFSL"], ["btrfs", 128 * MiB, "BTRL"], ["udf", 16 * MiB, "UDFL"],
];

for (const [kind, size, label] of WHOLE) {
  test(`whole-device ${kind} (${size} bytes)`, async () => {
    const p = await fsImage(dir, `${kind}-${size}.img`, kind, size, label);
    const [mine, theirs] = await Promise.all([inspectFile(p), blkid(p)]);
    sameFs(p, mine.filesystem, theirs);
    assert.is(mine.table?.type, theirs.PTTYPE === "dos" && kind === "exfat" ? undefined : theirs.PTTYPE, "PTTYPE");
    fields++;
    assert.equal(mine.warnings, [], "no warnings");
    images++;
  });
}

test("El Torito ISO with Joliet (xorriso)", async () => {
  const p = await makeIso(dir, "cd.iso", "MY_CD_LABEL");
  const [mine, theirs] = await Promise.all([inspectFile(p), blkid(p)]);
  sameFs(p, mine.filesystem, theirs);
  const et = mine.boot.elTorito ?? [];
  assert.is(et.length, 1, "one El Torito entry");
  assert.is(et[0]!.emulation, "1.44M floppy");
  assert.is(et[0]!.platform, "x86 BIOS");
  assert.ok(et[0]!.bootable);
  assert.is(theirs.BOOT_SYSTEM_ID, "EL TORITO SPECIFICATION", "blkid sees the boot record too");
  images++;
});

async function comparePartitions(path: string, mine: Report): Promise<void> {
  const layout = await sfdiskLayout(path);
  const disk = await blkid(path);
  assert.is(mine.table?.type, disk.PTTYPE, "PTTYPE");
  assert.is(mine.table?.id, disk.PTUUID, "PTUUID");
  fields += 2;
  const parts = mine.table!.partitions;
  assert.equal(parts.map((p) => p.number), layout.partitions.map((p) => Number(/(\d+)$/.exec(p.node)![1])), "partition numbers");
  for (const [i, sp] of layout.partitions.entries()) {
    const p = parts[i]!;
    const what = `${path} p${p.number}`;
    assert.is(p.start, sp.start * 512, `${what}: start`);
    assert.is(p.size, sp.size * 512, `${what}: size`);
    assert.is(p.type, sp.type.toLowerCase() === sp.type ? sp.type : sp.type.toUpperCase(), `${what}: type`);
    assert.is(p.bootable, sp.bootable ?? /LegacyBIOSBootable/.test(sp.attrs ?? ""), `${what}: bootable`);
    assert.is(p.name, sp.name, `${what}: name`);
    assert.is(p.uuid, sp.uuid, `${what}: uuid`);
    fields += 7;
    if (p.kind === "extended") continue;
    sameFs(what, p.filesystem, await blkid(path, p.start, p.size));
  }
}

test("dos disk (sfdisk): primaries, extended and logicals holding FAT32, ext4, ext2, NTFS and swap", async () => {
  const d = await makeDisk(dir, "dos.img", "dos", 200 * MiB, [
    { size: 64 * MiB, type: "c", fs: "fat32", label: "BOOTPART", bootable: true },
    { size: 16 * MiB, type: "83", fs: "ext4", label: "rootfs" },
    { size: "rest", type: "5" },
    { size: 8 * MiB, type: "83", fs: "ext2", label: "logical5" },
    { size: 16 * MiB, type: "7", fs: "ntfs", label: "WinData" },
    { size: 8 * MiB, type: "82", fs: "swap", label: "swap7" },
  ]);
  const mine = await inspectFile(d.path);
  await comparePartitions(d.path, mine);
  assert.equal(mine.warnings, []);
  assert.is(mine.boot.activePartition, 1);
  images++;
});

test("gpt disk (sgdisk): ESP, ext4, exFAT and swap with names", async () => {
  const d = await makeDisk(dir, "gpt.img", "gpt", 128 * MiB, [
    { size: 40 * MiB, type: "ef00", fs: "fat16", label: "ESP", name: "EFI system partition" },
    { size: 32 * MiB, type: "8300", fs: "ext4", label: "root", name: "Linux root" },
    { size: 16 * MiB, type: "0700", fs: "exfat", label: "SHARED", name: "data", bootable: true },
    { size: "rest", type: "8200", fs: "swap", label: "swap", name: "swap" },
  ]);
  const mine = await inspectFile(d.path);
  await comparePartitions(d.path, mine);
  assert.equal(mine.warnings, []);
  assert.equal(mine.boot.esp, [1]);
  assert.is(mine.table?.firstLba, (await sfdiskLayout(d.path) as unknown as { firstlba: number }).firstlba);
  images++;
});

test.run();
