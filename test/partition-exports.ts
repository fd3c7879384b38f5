// Partition exports: the PartitionView filter passes the device conformance suite; `serve` offers
// disk/p1, disk/p2, ... (MBR primaries and logicals, GPT) in LIST with descriptions; nbdcopy of a
// partition export equals dd of the partition; mtools and debugfs read the file systems through the
// export (via nbdfuse); writes stay inside the partition; block status is clipped to it;
// --no-partitions turns it off; `inspect` reads the same disk from a file, from bun-nbd and from
// nbdkit.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { copyFileSync, existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { MemoryDevice } from "../src/devices/memory.ts";
import { RawFile } from "../src/devices/file.ts";
import { PartitionView, shareDevice } from "../src/devices/partition-view.ts";
import { bytesEqual } from "./helpers/assert.ts";
import { conformance } from "./helpers/conformance.ts";
import { BUN, CLI, need, run, runOk, scratch, SYSTEM_PATH } from "./helpers/env.ts";
import { makeDisk, MiB, type Disk } from "./helpers/images.ts";
import { serve } from "./helpers/server.ts";

// ---- the filter, against the shared conformance suite ---------------------------------------
const cdir = scratch("bun-nbd-pview-");
const base = join(cdir, "base.img");
const content = Uint8Array.from({ length: 4 * MiB }, (_, i) => (i * 7 + (i >> 12)) & 255);
writeFileSync(base, content);
let n = 0;
const START = 512 * 2049, LEN = 2 * MiB + 3 * 512;

conformance("PartitionView over a raw file, read-write", {
  make: async () => {
    const p = join(cdir, `rw${n++}.img`);
    copyFileSync(base, p);
    const disk = RawFile.open(p);
    const [own, view] = shareDevice(disk, 2);
    const device = new PartitionView(view!, START, LEN);
    return {
      device,
      cleanup: async () => {
        // nothing outside the view was touched
        const all = readFileSync(p);
        bytesEqual(all.subarray(0, START), content.subarray(0, START), "bytes before the partition");
        bytesEqual(all.subarray(START + LEN), content.subarray(START + LEN), "bytes after the partition");
        await device.close();
        await own!.close?.();
      },
    };
  },
});

conformance("PartitionView over a raw file, read-only", {
  make: async () => {
    const disk = RawFile.open(base, { readOnly: true });
    return { device: new PartitionView(disk, START, LEN), expected: content.subarray(START, START + LEN), cleanup: () => disk.close() };
  },
});

conformance("PartitionView over a sparse memory device", {
  make: async () => ({ device: new PartitionView(new MemoryDevice(64 * MiB), 7 * MiB, 5 * MiB) }),
});

// ---- serve ---------------------------------------------------------------------------------
const test = suite("partition exports");
const dir = scratch("bun-nbd-parts-");
let dos: Disk, gpt: Disk;
const env = { PATH: SYSTEM_PATH };
const HELLO = "hello from a partition\n";

test.before(async () => {
  need("sfdisk", "sgdisk", "mkfs.fat", "mkfs.ext4", "mkfs.ext2", "mcopy", "mdir", "debugfs", "nbdcopy", "nbdinfo", "nbdkit", "nbdfuse", "fusermount3");
  const files = join(dir, "files");
  mkdirSync(files, { recursive: true });
  writeFileSync(join(files, "hello.txt"), HELLO);
  dos = await makeDisk(dir, "disk.img", "dos", 96 * MiB, [
    { size: 34 * MiB, type: "e", fs: "fat16", label: "PARTONE", bootable: true },
    { size: 24 * MiB, type: "83", fs: "ext4", label: "parttwo", files },
    { size: "rest", type: "5" },
    { size: 16 * MiB, type: "83", fs: "ext2", label: "logical" },
  ]);
  // a file on the FAT partition, written with mtools at the partition's offset
  writeFileSync(join(dir, "dos.txt"), "FAT FILE\r\n");
  await runOk(["mcopy", "-i", `${dos.path}@@${dos.parts[0]!.start}`, join(dir, "dos.txt"), "::DOS.TXT"], { env: { ...env, MTOOLS_SKIP_CHECK: "1" } });
  gpt = await makeDisk(dir, "gdisk.img", "gpt", 64 * MiB, [
    { size: 16 * MiB, type: "ef00", fs: "fat16", label: "ESP", name: "EFI system" },
    { size: "rest", type: "8300", fs: "ext4", label: "groot", name: "root" },
  ]);
});

interface Listed { "export-name": string; description?: string; "export-size": number }
async function listing(uri: string): Promise<Listed[]> {
  const r = await runOk(["nbdinfo", "--list", "--json", uri], { env });
  return JSON.parse(r.stdout).exports;
}

test("LIST offers disk/p1, disk/p2, disk/p5 (not the extended one) with type, label and size", async () => {
  const s = await serve([dos.path]);
  try {
    const ex = await listing(s.uri());
    assert.equal(ex.map((e) => e["export-name"]), ["disk", "disk/p1", "disk/p2", "disk/p5"]);
    const byName = new Map(ex.map((e) => [e["export-name"], e]));
    assert.match(byName.get("disk")!.description!, /MBR: FAT16 \+ ext4 \+ ext2/);
    assert.match(byName.get("disk/p1")!.description!, /partition 1 of disk, W95 FAT16 \(LBA\) \(e\), FAT16 "PARTONE", 34 MiB/);
    assert.match(byName.get("disk/p2")!.description!, /Linux \(83\), ext4 "parttwo", 24 MiB/);
    assert.match(byName.get("disk/p5")!.description!, /ext2 "logical", 16 MiB/);
    assert.is(byName.get("disk/p2")!["export-size"], dos.parts[1]!.size);
    assert.match(s.output(), /disk\/p2 .*nbd:\/\/127\.0\.0\.1:\d+\/disk\/p2/);
    assert.match(s.output(), /qemu-system-x86_64 .*-drive file=nbd:\/\/127\.0\.0\.1:\d+\/disk,format=raw/);
  } finally { await s.stop(); }
});

test("nbdcopy of disk/p2 equals dd of that partition; GPT partitions too", async () => {
  const s = await serve([dos.path, gpt.path]);
  try {
    for (const [disk, name, part] of [[dos, "disk/p2", dos.parts[1]!], [dos, "disk/p5", dos.parts[3]!], [gpt, "gdisk/p1", gpt.parts[0]!], [gpt, "gdisk/p2", gpt.parts[1]!]] as const) {
      const out = join(dir, `${name.replace("/", "-")}.copy`);
      await runOk(["nbdcopy", s.uri(name), out], { env });
      const dd = join(dir, `${name.replace("/", "-")}.dd`);
      await runOk(["dd", `if=${disk.path}`, `of=${dd}`, "bs=1M", `skip=${part.start}`, `count=${part.size}`, "iflag=skip_bytes,count_bytes", "status=none"], { env });
      bytesEqual(readFileSync(out), readFileSync(dd), `${name} copy vs dd`);
    }
  } finally { await s.stop(); }
});

/** Mount `uri` with nbdfuse (read-only) and run `fn` on the file it shows. */
async function throughFuse<T>(uri: string, fn: (file: string) => Promise<T>): Promise<T> {
  const mnt = join(dir, `mnt${n++}`);
  mkdirSync(mnt, { recursive: true });
  const proc = Bun.spawn(["nbdfuse", "-r", mnt, uri], { env: { ...process.env, ...env }, stdout: "pipe", stderr: "pipe" });
  const file = join(mnt, "nbd");
  try {
    for (let i = 0; i < 200 && !existsSync(file); i++) {
      if (proc.exitCode !== null) throw new Error(`nbdfuse exited ${proc.exitCode}: ${await new Response(proc.stderr).text()}`);
      await Bun.sleep(25);
    }
    assert.ok(existsSync(file), "nbdfuse shows the export");
    return await fn(file);
  } finally {
    await run(["fusermount3", "-u", mnt], { env });
    const t = setTimeout(() => proc.kill("SIGKILL"), 5000);
    await proc.exited;
    clearTimeout(t);
  }
}

test("mdir and debugfs read the file systems through the partition exports", async () => {
  const s = await serve(["-r", dos.path]);
  try {
    const mdir = await throughFuse(s.uri("disk/p1"), (f) => runOk(["mdir", "-i", f, "::"], { env: { ...env, MTOOLS_SKIP_CHECK: "1" } }));
    assert.match(mdir.stdout, /Volume in drive : is PARTONE/);
    assert.match(mdir.stdout, /DOS\s+TXT\s+10/);
    const cat = await throughFuse(s.uri("disk/p2"), (f) => runOk(["debugfs", "-R", "cat /hello.txt", f], { env }));
    assert.is(cat.stdout, HELLO);
  } finally { await s.stop(); }
});

test("writes stay inside the partition; block status covers exactly the partition", async () => {
  const copy = join(dir, "wdisk.img");
  copyFileSync(dos.path, copy);
  const p5 = dos.parts[3]!;
  const s = await serve([copy]);
  try {
    const uri = s.uri("wdisk/p5");
    const py = [
      "import nbd",
      `h = nbd.NBD(); h.connect_uri(${JSON.stringify(uri)})`,
      "size = h.get_size()",
      "h.pwrite(b'\\xa5' * 512, size - 512)",
      "h.pwrite(b'\\x5a' * 512, 0)",
      "h.flush()",
      "try:\n  h.pwrite(b'x' * 512, size - 256)\n  print('past-end-write-ok')\nexcept nbd.Error as e:\n  print('past-end-refused', e.errno)",
    ].join("\n");
    const r = await runOk(["python3", "-c", py], { env });
    assert.match(r.stdout, /past-end-refused/);
    const map = JSON.parse((await runOk(["nbdinfo", "--map", "--json", uri], { env })).stdout) as { offset: number; length: number }[];
    assert.is(map.reduce((a, e) => a + e.length, 0), p5.size, "extents cover the partition exactly");
    assert.is(map[0]!.offset, 0);
  } finally { await s.stop(); }
  const after = readFileSync(copy), before = readFileSync(dos.path);
  bytesEqual(after.subarray(p5.start, p5.start + 512), new Uint8Array(512).fill(0x5a), "first sector of p5 in the disk file");
  bytesEqual(after.subarray(p5.start + p5.size - 512, p5.start + p5.size), new Uint8Array(512).fill(0xa5), "last sector of p5 in the disk file");
  bytesEqual(after.subarray(0, p5.start), before.subarray(0, p5.start), "everything before p5 unchanged");
  bytesEqual(after.subarray(p5.start + p5.size), before.subarray(p5.start + p5.size), "everything after p5 unchanged");
});

test("--no-partitions offers the disk alone", async () => {
  const s = await serve(["--no-partitions", dos.path]);
  try {
    assert.equal((await listing(s.uri())).map((e) => e["export-name"]), ["disk"]);
  } finally { await s.stop(); }
});

test("inspect reads the same table from the file, from bun-nbd and from nbdkit", async () => {
  const inspect = async (target: string) => JSON.parse((await runOk([BUN, CLI, "inspect", "--json", target])).stdout);
  const file = await inspect(dos.path);
  assert.is(file.table.type, "dos");
  assert.equal(file.table.partitions.map((p: { number: number }) => p.number), [1, 2, 3, 5]);
  const s = await serve(["-r", dos.path]);
  try {
    const viaBun = await inspect(s.uri("disk"));
    assert.equal(viaBun.table, file.table);
    assert.is(viaBun.container.format, "nbd");
    const p2 = await inspect(s.uri("disk/p2"));
    assert.is(p2.filesystem.type, "ext4");
    assert.is(p2.filesystem.label, "parttwo");
  } finally { await s.stop(); }
  const sock = join(dir, "nbdkit.sock");
  const kit = Bun.spawn(["nbdkit", "-f", "-r", "-U", sock, "file", dos.path], { env: { ...process.env, ...env }, stdout: "ignore", stderr: "pipe" });
  try {
    for (let i = 0; i < 100 && !existsSync(sock); i++) await Bun.sleep(50);
    const viaKit = await inspect(`nbd+unix:///?socket=${sock}`);
    assert.equal(viaKit.table, file.table);
  } finally {
    kit.kill("SIGTERM");
    await kit.exited;
  }
});

test.run();
