// Fuzz targets for every parser that reads user files, as one table: each entry makes valid seed
// files, mutates them (line-aware for text descriptors, field-aware for binary headers and tables)
// and runs the real open path on the result (CUE, CloneCD, qcow2 overlays, image inspection and
// partition exports, xz/gzip/zip and VHD containers). The oracle: a result, or a clean error (an Error
// naming the file, or an NbdError from a read) — never a TypeError/RangeError, a hang or a write
// outside the file. To add a reader (VHD, zip, gzip/xz index, partition tables): one more entry.
import fc from "fast-check";
import { closeSync, openSync, readFileSync, statSync, truncateSync, writeFileSync } from "node:fs";
import { basename, dirname, join } from "node:path";
import { NbdError } from "../../src/protocol/errors.ts";
import { caps, isPromise, type BlockDevice, type ExportSpec } from "../../src/devices/types.ts";
import { deviceSource, describeExports } from "../../src/devices/partition-exports.ts";
import { openExports } from "../../src/devices/open.ts";
import { inspect } from "../../src/inspect/index.ts";
import { need, runOk } from "../helpers/env.ts";
import { openCdImage } from "../../src/devices/cd/index.ts";
import { RAW_SECTOR } from "../../src/devices/cd/sector.ts";
import { openImage } from "../../src/devices/qcow2/index.ts";
import { writeNewImage } from "../../src/devices/qcow2/format.ts";
import { FuzzFailure, cdSectors } from "./session.ts";

/** One parser under fuzz. */
export interface ParserTarget {
  name: string;
  /** Valid inputs to mutate (made once, in `dir`). */
  seeds(dir: string): Promise<Uint8Array[]> | Uint8Array[];
  /** Offsets and sizes of fields worth setting to interesting values (binary formats). */
  fields?(seed: Uint8Array): Field[];
  /** Text formats get line-level mutations too. */
  text?: boolean;
  /** Run the real open path on `bytes` (written where it needs them, in `dir`). Throws FuzzFailure. */
  run(bytes: Uint8Array, dir: string): Promise<void> | void;
}

export interface Field { at: number; size: 2 | 4 | 8 }

/**
 * An error is clean when it is one the code means to throw: an NbdError, or a plain Error (or a
 * subclass made for it) with a message that names a file (`label`, or the base it points to) —
 * not a TypeError, RangeError or other engine error escaping from a bug.
 */
function clean(e: unknown, label: string): boolean {
  if (e instanceof NbdError) return true;
  if (!(e instanceof Error)) return false;
  if (e instanceof TypeError || e instanceof RangeError || e instanceof SyntaxError || e instanceof ReferenceError) return false;
  return e.message.includes(basename(label)) || e.message.includes(dirname(label));
}

function unclean(what: string, e: unknown): FuzzFailure {
  return new FuzzFailure("unclean error", `${what}: ${(e as Error)?.stack ?? String(e)}`);
}

async function aw(r: unknown): Promise<void> {
  if (isPromise(r)) await r;
}

/** A read may fail with an NbdError or an OS-style error (a `code` such as "EIO": damaged data), nothing else. */
function ioError(e: unknown): boolean {
  if (e instanceof NbdError) return true;
  return e instanceof Error && !(e instanceof TypeError || e instanceof RangeError) && typeof (e as { code?: unknown }).code === "string";
}

/** Read every export a few times (start, end, a middle piece); errors must be NbdErrors. */
async function exercise(specs: ExportSpec[], what: string): Promise<void> {
  for (const s of specs) {
    const d: BlockDevice = s.device;
    const size = d.size();
    if (!Number.isSafeInteger(size) || size < 0) throw new FuzzFailure("bad size", `${what} export ${s.name}: size ${size}`);
    for (const [off, len] of [[0, 4096], [Math.max(0, size - 5000), 5000], [Math.floor(size / 3), 70000]] as const) {
      const n = Math.max(0, Math.min(len, size - off));
      if (n === 0) continue;
      try { await aw(d.pread(new Uint8Array(n), off, 0)); } catch (e) { if (!ioError(e)) throw unclean(`${what} read ${s.name}`, e); }
    }
  }
}

// ---------------------------------------------------------------- CD images -----------------

const te = new TextEncoder();

const CUE_SEEDS = [
  `FILE "data.bin" BINARY\n  TRACK 01 MODE1/2352\n    INDEX 01 00:00:00\n`,
  `REM generated\nCATALOG 0000000000000\nFILE "data.bin" BINARY\n  TRACK 01 MODE1/2352\n    INDEX 01 00:00:00\n  TRACK 02 AUDIO\n    PREGAP 00:02:00\n    INDEX 00 00:00:40\n    INDEX 01 00:00:45\n    INDEX 02 00:00:50\n    POSTGAP 00:00:10\n`,
  `FILE "data.bin" BINARY\n  TRACK 01 MODE1/2352\n    INDEX 01 00:00:00\nREM SESSION 02\nFILE "audio.bin" MOTOROLA\n  TRACK 02 AUDIO\n    INDEX 01 00:00:00\n  TRACK 03 MODE2/2352\n    INDEX 00 00:00:10\n    INDEX 01 00:00:12\n`,
  `\ufeffFILE data.bin BINARY\r\n TRACK 1 MODE1/2048\r\n  INDEX 1 0:0:0\r\n  FLAGS DCP\r\n  TITLE "x"\r\n`,
];

const CCD_SEED = `[CloneCD]
Version=3
[Disc]
TocEntries=4
Sessions=1
[Session 1]
PreGapMode=1
[Entry 0]
Session=1
Point=0xa0
ADR=0x01
Control=0x04
PMin=1
PSec=0
PFrame=0
[Entry 1]
Session=1
Point=0xa2
ADR=0x01
Control=0x04
PLBA=60
[Entry 2]
Session=1
Point=0x01
ADR=0x01
Control=0x04
PLBA=0
[Entry 3]
Session=1
Point=0x02
ADR=0x01
Control=0x00
PLBA=40
[TRACK 1]
MODE=1
INDEX 1=0
[TRACK 2]
MODE=0
INDEX 0=38
INDEX 1=40
`;

/** Open `path` with `open`: a clean refusal is fine; what opens is exercised and closed. */
async function openAndExercise(path: string, open: () => Promise<ExportSpec[]>): Promise<void> {
  let specs: ExportSpec[];
  try {
    specs = await open();
  } catch (e) {
    if (clean(e, path)) return;
    throw unclean(`opening ${path}`, e);
  }
  try {
    await exercise(specs, path);
  } finally {
    for (const s of specs) await aw(s.device.close?.());
  }
}

const openCd = (path: string) => openAndExercise(path, () => openCdImage(path, { log: () => {} }));

const cue: ParserTarget = {
  name: "cue",
  text: true,
  seeds(dir) {
    writeFileSync(join(dir, "data.bin"), cdSectors(60, 0));
    writeFileSync(join(dir, "audio.bin"), new Uint8Array(30 * RAW_SECTOR).fill(7));
    return CUE_SEEDS.map((s) => te.encode(s));
  },
  run(bytes, dir) {
    const p = join(dir, "fuzz.cue");
    writeFileSync(p, bytes);
    return openCd(p);
  },
};

const ccd: ParserTarget = {
  name: "ccd",
  text: true,
  seeds(dir) {
    writeFileSync(join(dir, "fuzz.img"), cdSectors(60, 0));
    return [te.encode(CCD_SEED)];
  },
  run(bytes, dir) {
    const p = join(dir, "fuzz.ccd");
    writeFileSync(p, bytes);
    return openCd(p);
  },
};

// ---------------------------------------------------------------- qcow2 overlays -------------

const BASE_SIZE = 1024 * 1024;

/** Header fields, then every L1, refcount table, L2 and refcount block entry of the seed. */
function qcow2Fields(b: Uint8Array): Field[] {
  const dv = new DataView(b.buffer, b.byteOffset, b.length);
  const f: Field[] = [
    { at: 4, size: 4 }, { at: 8, size: 8 }, { at: 16, size: 4 }, { at: 20, size: 4 }, { at: 24, size: 8 }, { at: 32, size: 4 },
    { at: 36, size: 4 }, { at: 40, size: 8 }, { at: 48, size: 8 }, { at: 56, size: 4 }, { at: 60, size: 4 }, { at: 64, size: 8 },
    { at: 72, size: 8 }, { at: 80, size: 8 }, { at: 88, size: 8 }, { at: 96, size: 4 }, { at: 100, size: 4 },
    { at: 112, size: 4 }, { at: 116, size: 4 }, { at: 128, size: 4 }, { at: 132, size: 4 },
  ];
  const u64 = (p: number) => dv.getUint32(p) * 2 ** 32 + dv.getUint32(p + 4);
  const cs = 2 ** dv.getUint32(20);
  const ext = (dv.getUint32(76) & 16) !== 0;
  const l1Size = dv.getUint32(36), l1 = u64(40), rt = u64(48), rtClusters = dv.getUint32(56);
  const entry = (base: number, count: number, step: number, sizes: (2 | 4 | 8)[]) => {
    for (let i = 0; i < count && base + i * step + 8 <= b.length; i++) for (const s of sizes) f.push({ at: base + i * step, size: s });
  };
  entry(l1, l1Size, 8, [8]);
  entry(rt, Math.min(rtClusters * cs / 8, 64), 8, [8]);
  for (let i = 0; i < l1Size; i++) {
    const l2 = u64(l1 + i * 8) % 2 ** 56;
    if (l2 > 0 && l2 + cs <= b.length) {
      for (let e = 0; e < cs / (ext ? 16 : 8) && e < 64; e++) {
        f.push({ at: l2 + e * (ext ? 16 : 8), size: 8 });
        if (ext) { f.push({ at: l2 + e * 16 + 8, size: 4 }); f.push({ at: l2 + e * 16 + 12, size: 4 }); }
      }
    }
  }
  const rb0 = u64(rt);
  if (rb0 > 0 && rb0 + 64 <= b.length) for (let k = 0; k < 32; k++) f.push({ at: rb0 + k * 2, size: 2 });
  return f;
}

async function makeQcow2Seed(dir: string, name: string, compat: boolean, clusterBits: number): Promise<Uint8Array> {
  const path = join(dir, name);
  const fd = openSync(path, "w+");
  writeNewImage(fd, path, { size: BASE_SIZE, backingName: "base.img", compat, clusterBits });
  closeSync(fd);
  const img = openImage(path, { readOnly: false, log: () => {}, lock: false });
  img.pwrite(new Uint8Array(5000).fill(0x11), 3000, 0);
  img.pwrite(new Uint8Array(4096).fill(0x22), 600 * 1024, 0);
  img.zero(800 * 1024, 70000, 0);
  await img.close();
  return new Uint8Array(readFileSync(path)); // a plain copy: Buffer.slice() would be a view
}

let baseDigest = 0n;

async function openQcow2(bytes: Uint8Array, dir: string): Promise<void> {
  const path = join(dir, "fuzz.qcow2");
  writeFileSync(path, bytes);
  const before = bytes.length;
  // Read-only: opens or refuses cleanly; reads never throw anything but NbdError.
  let ro;
  try {
    ro = openImage(path, { readOnly: true, log: () => {}, lock: false });
  } catch (e) {
    if (!clean(e, path)) throw unclean("read-only open", e);
  }
  if (ro) {
    try { await exercise([{ name: "ro", device: ro }], path); } finally { await ro.close(); }
  }
  // Read-write: where it opens, writes read back, and the file grows by at most what they need.
  let rw;
  try {
    rw = openImage(path, { readOnly: false, log: () => {}, lock: false });
  } catch (e) {
    if (!clean(e, path)) throw unclean("read-write open", e);
  }
  if (rw) {
    const data = new Uint8Array(9000).fill(0x5c);
    try {
      const size = rw.size();
      const off = Math.max(0, Math.min(size - data.length, 12345));
      await aw(rw.pwrite(data, off, 0));
      await aw(rw.zero(0, Math.min(size, 2048), 0));
      await aw(rw.flush(0));
      const back = new Uint8Array(data.length);
      await aw(rw.pread(back, off, 0));
      const lo = Math.max(0, 2048 - off);
      if (Buffer.compare(Buffer.from(back.subarray(lo)), Buffer.from(data.subarray(lo))) !== 0) {
        throw new FuzzFailure("integrity", `${path}: a write through a hostile-but-accepted overlay did not read back`);
      }
    } catch (e) {
      if (e instanceof FuzzFailure) throw e;
      if (!clean(e, path)) throw unclean("read-write I/O", e);
    } finally {
      try { await rw.close(); } catch (e) { if (!clean(e, path)) throw unclean("close", e); }
    }
    const after = statSync(path).size;
    // 9000 bytes of data and a zeroed head need a few clusters and tables: anything far beyond is a write outside the file.
    if (after > Math.max(before, 2 * 1024 * 1024) + 16 * 2 ** 21) {
      throw new FuzzFailure("write outside the file", `${path}: grew from ${before} to ${after} bytes`);
    }
  }
  const digest = BigInt(Bun.hash(readFileSync(join(dir, "base.img"))));
  if (digest !== baseDigest) throw new FuzzFailure("base modified", `${path}: the base image changed`);
}

const qcow2: ParserTarget = {
  name: "qcow2",
  async seeds(dir) {
    const base = new Uint8Array(BASE_SIZE).map((_, i) => (i * 7) & 255);
    writeFileSync(join(dir, "base.img"), base);
    baseDigest = BigInt(Bun.hash(base));
    return [
      await makeQcow2Seed(dir, "seed-ext.qcow2", false, 14),
      await makeQcow2Seed(dir, "seed-std.qcow2", true, 12),
      await makeQcow2Seed(dir, "seed-std64k.qcow2", true, 16),
    ];
  },
  fields: qcow2Fields,
  run: openQcow2,
};

// ---------------------------------------------------------------- image inspection ----------

/** A read-only device over bytes in memory (what serve inspects, without a file). */
class BytesDevice implements BlockDevice {
  constructor(private readonly b: Uint8Array) {}
  size(): number { return this.b.length; }
  capabilities() { return caps({}); }
  pread(buf: Uint8Array, offset: number): void { buf.set(this.b.subarray(offset, offset + buf.length)); }
}

const IMG = 4 * 1024 * 1024;

/** Disk images made by the real tools: GPT and MBR (with logicals) partitions holding FAT and ext4, and a bare FAT. */
async function inspectSeeds(dir: string): Promise<Uint8Array[]> {
  need("sfdisk", "mkfs.fat", "mkfs.ext4");
  const make = async (name: string, table: string | null, fs: [string[], number][]) => {
    const p = join(dir, name);
    writeFileSync(p, "");
    truncateSync(p, IMG);
    if (table) await runOk(["sfdisk", "-q", p], { stdin: new TextEncoder().encode(table) });
    for (const [cmd, offsetSectors] of fs) await runOk([...cmd, ...(offsetSectors ? [`--offset=${offsetSectors}`] : []), p, ...(cmd[0] === "mkfs.fat" && table ? ["1024"] : [])]);
    return new Uint8Array(readFileSync(p));
  };
  return [
    await make("gpt.img", "label: gpt\n,1M\n,\n", [[["mkfs.fat", "-F", "12"], 2048]]),
    await make("mbr.img", "label: dos\n,1M,c\n,,5\n,1M,83\n", [[["mkfs.fat", "-F", "12"], 2048]]),
    await make("fat.img", null, [[["mkfs.fat", "-F", "12"], 0]]),
    await make("ext4.img", null, [[["mkfs.ext4", "-q", "-F"], 0]]),
  ];
}

/** The partition tables, the first partition's boot sector, and an ext superblock. */
function inspectFields(): Field[] {
  const f: Field[] = [];
  for (let i = 0; i < 4; i++) for (const o of [4, 8, 12]) f.push({ at: 446 + 16 * i + o, size: 4 });
  for (const o of [8, 12, 16, 24, 32, 40, 48, 72, 80, 84]) f.push({ at: 512 + o, size: o >= 80 ? 4 : 8 });
  for (let i = 0; i < 4; i++) for (const o of [32, 40]) f.push({ at: 1024 + 128 * i + o, size: 8 });
  for (const base of [0, 1024 * 1024]) for (const o of [11, 14, 16, 17, 19, 22, 32, 36, 44]) f.push({ at: base + o, size: o === 16 ? 2 : 4 });
  for (const o of [0, 4, 24, 32, 40, 88]) f.push({ at: 1024 + o, size: 4 });
  return f;
}

const inspectTarget: ParserTarget = {
  name: "inspect",
  seeds: inspectSeeds,
  fields: inspectFields,
  async run(bytes) {
    const label = "fuzz.img";
    const dev = new BytesDevice(bytes);
    let r;
    try {
      r = await inspect(deviceSource(dev), { source: label });
    } catch (e) {
      throw unclean("inspect (it promises never to throw)", e);
    }
    if (!r || typeof r.size !== "number") throw new FuzzFailure("bad report", `${label}: inspect returned ${String(r)}`);
    // Partition exports, as serve offers them: within the disk, and readable.
    let d;
    try {
      d = await describeExports([{ name: "disk", device: dev }], { partitions: true, log: () => {} });
    } catch (e) {
      throw unclean("partition exports", e);
    }
    for (const s of d.specs) {
      const size = s.device.size();
      if (size < 0 || size > bytes.length) throw new FuzzFailure("bad size", `${label} export ${s.name}: size ${size} outside the disk (${bytes.length})`);
    }
    await exercise(d.specs, label);
  },
};

// ---------------------------------------------------------------- containers (sniffing opener) -

/**
 * A container format through the one opening function (content sniffing, then the format's own
 * reader): the mutated file is written under `ext` and opened read-only like `serve FILE`.
 */
function container(name: string, ext: string, make: (dir: string, raw: string, out: string) => Promise<unknown>): ParserTarget {
  return {
    name,
    async seeds(dir) {
      const raw = join(dir, "seed.raw");
      const data = new Uint8Array(1024 * 1024);
      for (let i = 0; i < data.length; i += 4096) data.fill((i >> 12) * 7, i, i + (i % 3 ? 4096 : 1000));
      writeFileSync(raw, data);
      const out = join(dir, `seed${ext}`);
      await make(dir, raw, out);
      return [new Uint8Array(readFileSync(out))];
    },
    async run(bytes, dir) {
      const path = join(dir, `fuzz${ext}`);
      writeFileSync(path, bytes);
      await openAndExercise(path, () => openExports([path], { readOnly: true, log: () => {} }));
    },
  };
}

const CONTAINERS: ParserTarget[] = [
  container("xz", ".img.xz", (_d, raw, out) => runOk(["sh", "-c", `xz -c --block-size=65536 ${raw} > ${out}`])),
  container("gzip", ".img.gz", (_d, raw, out) => runOk(["sh", "-c", `gzip -c ${raw} > ${out}`])),
  container("zip", ".zip", (d, raw, out) => runOk(["zip", "-q", "-j", out, raw], { cwd: d })),
  container("vhd-dynamic", ".vhd", (_d, raw, out) => runOk(["qemu-img", "convert", "-f", "raw", "-O", "vpc", raw, out])),
  container("vhd-fixed", ".vhd", (_d, raw, out) => runOk(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed", raw, out])),
];

/** Every parser under fuzz: a new reader is one more entry. */
export const PARSERS: ParserTarget[] = [cue, ccd, qcow2, inspectTarget, ...CONTAINERS];

// ---------------------------------------------------------------- mutations ------------------

const INTERESTING64 = [
  0, 1, 512, 4096, 16384, 65536, 2 ** 20, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 40, 2 ** 52, 2 ** 53, 2 ** 56 - 65536,
  2 ** 62, 2 ** 63, 2 ** 64 - 1, 0xffffffff,
];

export interface ParserInput { target: number; seed: number; ops: { kind: number; at: number; value: number; pick: number }[] }

export function parserInput(nTargets: number): fc.Arbitrary<ParserInput> {
  return fc.record({
    target: fc.integer({ min: 0, max: nTargets - 1 }),
    seed: fc.nat(),
    ops: fc.array(fc.record({
      kind: fc.integer({ min: 0, max: 5 }),
      at: fc.double({ min: 0, max: 1, noNaN: true, maxExcluded: true }),
      value: fc.integer({ min: 0, max: 0xffffffff }),
      pick: fc.nat(),
    }), { minLength: 1, maxLength: 4 }),
  });
}

function setField(b: Uint8Array, f: Field, v: number, high: boolean): void {
  const dv = new DataView(b.buffer, b.byteOffset, b.length);
  if (f.size === 2) dv.setUint16(f.at, v & 0xffff);
  else if (f.size === 4) dv.setUint32(f.at, v >>> 0);
  else {
    dv.setUint32(f.at, high ? 0x80000000 | Math.floor(v / 2 ** 32) % 2 ** 31 : Math.floor(v / 2 ** 32) >>> 0);
    dv.setUint32(f.at + 4, v >>> 0);
  }
}

/** Apply an input's mutations to a copy of its seed. */
export function mutateSeed(t: ParserTarget, seed: Uint8Array, ops: ParserInput["ops"], fields: Field[] | undefined): Uint8Array {
  let b = Uint8Array.prototype.slice.call(seed);
  for (const op of ops) {
    if (t.text && op.kind <= 2) {
      const lines = new TextDecoder().decode(b).split("\n");
      const i = Math.floor(op.at * lines.length);
      const j = op.pick % lines.length;
      if (op.kind === 0) lines.splice(i, 1);                              // drop a line
      else if (op.kind === 1) lines.splice(i, 0, lines[j]!);              // duplicate one elsewhere
      else lines[i] = (lines[i] ?? "").replace(/\d+/g, (m) => (op.value % 3 === 0 ? String(op.value) : op.value % 3 === 1 ? String(Number(m) + (op.pick % 5) - 2) : "99999999999")); // renumber
      b = te.encode(lines.join("\n"));
      continue;
    }
    if (fields && fields.length && op.kind <= 3) {
      const f = fields[op.pick % fields.length]!;
      const v = op.kind === 3 ? op.value : INTERESTING64[op.value % INTERESTING64.length]!;
      if (f.at + f.size <= b.length) setField(b, f, v, op.kind === 2);
      continue;
    }
    if (b.length === 0) continue;
    // A hashed position: fast-check draws small numbers (and doubles near 0) often, which would
    // keep hitting the magic; binary formats keep their first 4 bytes unless the double says so.
    const keep = fields && op.at > 0.001 ? Math.min(4, b.length - 1) : 0;
    const p = keep + (Math.imul(op.pick + 1, 0x9e3779b1) >>> 0) % (b.length - keep);
    if (op.kind === 5 && op.value % 4 === 0) b = b.slice(0, p);          // truncate
    else b[p] = op.value & 0xff;
  }
  return b;
}
