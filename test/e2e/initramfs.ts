// The kernel guest's boot files: a Debian kernel, its nbd/e1000/ext4 modules, busybox-static and
// Debian's nbd-client (with the host's copies of its shared libraries) in a gzip'd newc initramfs
// whose /init is test/e2e/guest/init. Everything downloaded or built is cached outside the
// repository in ${BUN_NBD_E2E_CACHE:-$HOME/.cache/bun-nbd-e2e}: .debs by their (versioned) file
// names, extractions by the .deb they came from, the initramfs by a hash of everything in it.
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { homedir } from "node:os";
import { basename, dirname, join } from "node:path";
import { runOk } from "../helpers/env.ts";
import { E2E_DIR } from "./images.ts";

export const CACHE = process.env.BUN_NBD_E2E_CACHE || join(homedir(), ".cache/bun-nbd-e2e");
export const GUEST_INIT = join(E2E_DIR, "guest/init");

/** Modules loaded by /init, in order; dependencies (from each .ko's modinfo) are added before. */
const WANTED_MODULES = [
  "drivers/net/ethernet/intel/e1000/e1000.ko",
  "drivers/block/nbd.ko",
  "crypto/crc32c_generic.ko", // ext4's and jbd2's softdep "crypto-crc32c" (TCG's CPU has no SSE4.2)
  "fs/ext4/ext4.ko", // also mounts ext2 (CONFIG_EXT4_USE_FOR_EXT2)
];
/** Where modules named in depends= live, relative to kernel/. */
const MODULE_PATHS: Record<string, string> = {
  jbd2: "fs/jbd2/jbd2.ko", mbcache: "fs/mbcache.ko", crc16: "lib/crc16.ko",
};

export interface GuestFiles {
  kernel: string;
  initramfs: string;
  busybox: string;
  kernelVersion: string;
  /** Seconds spent per cache stage this call (0 when cached). */
  timings: Record<string, number>;
}

const sha256 = (data: Uint8Array | string) => createHash("sha256").update(data).digest("hex");

async function timed<T>(timings: Record<string, number>, name: string, fn: () => Promise<T>): Promise<T> {
  const t = performance.now();
  try { return await fn(); } finally { timings[name] = (timings[name] ?? 0) + (performance.now() - t) / 1000; }
}

function findDeb(dir: string, pkg: string): string | undefined {
  if (!existsSync(dir)) return undefined;
  const f = readdirSync(dir).filter((n) => n.startsWith(pkg + "_") && n.endsWith(".deb")).sort().pop();
  return f && join(dir, f);
}

async function download(dir: string, pkg: string): Promise<string> {
  const have = findDeb(dir, pkg);
  if (have) return have;
  mkdirSync(dir, { recursive: true });
  await runOk(["apt-get", "download", pkg], { cwd: dir, timeoutMs: 600_000 });
  const got = findDeb(dir, pkg);
  if (!got) throw new Error(`apt-get download ${pkg}: no .deb appeared in ${dir}`);
  return got;
}

/** The kernel package linux-image-amd64 currently points to (e.g. linux-image-6.1.0-56-amd64).
 *  apt-cache takes ~2 s here, so the answer is remembered for a day. */
async function kernelPackage(): Promise<string> {
  const memo = join(CACHE, "kernel-package");
  if (existsSync(memo) && Date.now() - statSync(memo).mtimeMs < 86_400_000) return readFileSync(memo, "utf8").trim();
  const r = await runOk(["apt-cache", "depends", "linux-image-amd64"], { timeoutMs: 60_000 });
  const m = /Depends: (linux-image-[^\s]+-amd64)/.exec(r.stdout);
  if (!m) throw new Error(`cannot resolve linux-image-amd64 (apt-get update?):\n${r.stdout}`);
  mkdirSync(CACHE, { recursive: true });
  writeFileSync(memo, m[1]! + "\n");
  return m[1]!;
}

/** Extract `members` of a .deb's data into a directory named after the .deb (cached). */
async function extract(deb: string, into: string, members: string[] = []): Promise<string> {
  const dir = join(into, basename(deb, ".deb").replace(/[^A-Za-z0-9._+-]/g, "_"));
  const done = join(dir, ".done");
  if (existsSync(done) && readFileSync(done, "utf8") === members.join("\n")) return dir;
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  const q = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;
  await runOk(["sh", "-c", `dpkg-deb --fsys-tarfile ${q(deb)} | tar -x -C ${q(dir)} ${members.map(q).join(" ")}`],
    { timeoutMs: 300_000 });
  writeFileSync(done, members.join("\n"));
  return dir;
}

/** depends= of a kernel module, read from its .modinfo strings. */
function moduleDepends(ko: Uint8Array): string[] {
  const s = Buffer.from(ko).toString("latin1");
  const m = /\0depends=([^\0]*)\0/.exec(s);
  return m && m[1] ? m[1].split(",").filter(Boolean) : [];
}

// ---- newc cpio writer (what `cpio -o -H newc` writes), owner root, mtime 0 -------------------
export interface CpioEntry { name: string; mode: number; data?: Uint8Array }

export function cpioNewc(entries: CpioEntry[]): Uint8Array<ArrayBuffer> {
  const parts: Uint8Array[] = [];
  let len = 0;
  const push = (b: Uint8Array) => { parts.push(b); len += b.length; };
  const pad4 = () => { const p = (4 - (len % 4)) % 4; if (p) push(new Uint8Array(p)); };
  const h8 = (n: number) => n.toString(16).padStart(8, "0");
  let ino = 1;
  for (const e of [...entries, { name: "TRAILER!!!", mode: 0 }]) {
    const name = Buffer.from(e.name + "\0");
    const data = (e as CpioEntry).data ?? new Uint8Array(0);
    const nlink = (e.mode & 0o170000) === 0o040000 ? 2 : 1;
    const hdr = "070701" + [e.name === "TRAILER!!!" ? 0 : ino++, e.mode, 0, 0, nlink, 0, data.length, 0, 0, 0, 0, name.length, 0]
      .map(h8).join("");
    push(Buffer.from(hdr, "latin1"));
    push(name);
    pad4();
    if (data.length) { push(data); pad4(); }
  }
  const out = new Uint8Array(len);
  let o = 0;
  for (const p of parts) { out.set(p, o); o += p.length; }
  return out;
}

/** A gzip'd newc archive holding `files` (path → content, all mode 0755 or as given); can be
 *  appended to the cached initramfs: the kernel unpacks concatenated archives in order. */
export function overlayArchive(files: Record<string, { data: Uint8Array | string; mode?: number }>): Uint8Array {
  const entries: CpioEntry[] = [];
  const dirs = new Set<string>();
  for (const path of Object.keys(files)) {
    for (let d = dirname(path); d !== "." && d !== "/" && !dirs.has(d); d = dirname(d)) dirs.add(d);
  }
  for (const d of [...dirs].sort()) entries.push({ name: d, mode: 0o040755 });
  for (const [path, f] of Object.entries(files)) {
    entries.push({ name: path, mode: 0o100000 | (f.mode ?? 0o755), data: typeof f.data === "string" ? Buffer.from(f.data) : f.data });
  }
  return Bun.gzipSync(cpioNewc(entries), { level: 6 });
}

let memo: Promise<GuestFiles> | undefined;

/** Download, extract and build (or reuse from the cache) everything the kernel guest boots. */
export function guestFiles(): Promise<GuestFiles> {
  memo ??= build();
  return memo;
}

async function build(): Promise<GuestFiles> {
  const timings: Record<string, number> = {};
  const debs = join(CACHE, "debs");
  const [kdeb, bbdeb, ncdeb] = await timed(timings, "download", async () => {
    return [await download(debs, await kernelPackage()), await download(debs, "busybox-static"), await download(debs, "nbd-client")];
  });
  const kver = basename(kdeb!).replace(/^linux-image-/, "").replace(/_.*$/, "");
  const kx = await timed(timings, "extract", async () => {
    const mods: string[] = [];
    const want = [...WANTED_MODULES, ...Object.values(MODULE_PATHS)];
    for (const m of want) mods.push(`./lib/modules/${kver}/kernel/${m}`);
    return extract(kdeb!, join(CACHE, "x"), [`./boot/vmlinuz-${kver}`, ...mods]);
  });
  const bb = await timed(timings, "extract", () => extract(bbdeb!, join(CACHE, "x")));
  const nc = await timed(timings, "extract", () => extract(ncdeb!, join(CACHE, "x")));
  const kernel = join(kx, `boot/vmlinuz-${kver}`);
  const busybox = join(bb, "bin/busybox");
  const nbdClient = join(nc, "sbin/nbd-client");

  const initramfs = await timed(timings, "initramfs", async () => {
    // modules in load order: each module's depends= first
    const modDir = join(kx, `lib/modules/${kver}/kernel`);
    const order: string[] = [];
    const add = (rel: string) => {
      if (order.includes(rel)) return;
      for (const d of moduleDepends(readFileSync(join(modDir, rel)))) {
        const p = MODULE_PATHS[d];
        if (!p) throw new Error(`module ${rel} depends on ${d}, which the initramfs builder does not know`);
        add(p);
      }
      order.push(rel);
    };
    for (const m of WANTED_MODULES) add(m);

    const ldd = await runOk(["ldd", nbdClient], { timeoutMs: 30_000 });
    if (/not found/.test(ldd.stdout)) throw new Error(`nbd-client's libraries are missing on the host (apt-get install nbd-client):\n${ldd.stdout}`);
    const libs = [...ldd.stdout.matchAll(/(\/\S+)/g)].map((m) => m[1]!);

    const files: { name: string; src: string; mode: number }[] = [
      { name: "init", src: GUEST_INIT, mode: 0o755 },
      { name: "bin/busybox", src: busybox, mode: 0o755 },
      { name: "sbin/nbd-client", src: nbdClient, mode: 0o755 },
      ...order.map((rel, i) => ({ name: `lib/modules/${String(i + 1).padStart(2, "0")}-${basename(rel)}`, src: join(modDir, rel), mode: 0o644 })),
      ...libs.map((l) => ({ name: l.slice(1), src: l, mode: 0o755 })),
    ];
    const contents = files.map((f) => readFileSync(f.src));
    const key = sha256(files.map((f, i) => `${f.name} ${f.mode} ${sha256(contents[i]!)}`).join("\n") + "\nbuilder-v1").slice(0, 16);
    const out = join(CACHE, `initramfs-${key}.gz`);
    if (existsSync(out)) return out;
    const dirs = new Set<string>(["dev", "proc", "sys", "tmp", "mnt"]);
    for (const f of files) for (let d = dirname(f.name); d !== "."; d = dirname(d)) dirs.add(d);
    const entries: CpioEntry[] = [...dirs].sort().map((d) => ({ name: d, mode: 0o040755 }));
    files.forEach((f, i) => entries.push({ name: f.name, mode: 0o100000 | f.mode, data: contents[i] }));
    const gz = Bun.gzipSync(cpioNewc(entries), { level: 6 });
    // unique temporary name and an atomic rename: concurrent runs may build the same key
    const tmp = `${out}.${process.pid}.tmp`;
    writeFileSync(tmp, gz);
    renameSync(tmp, out);
    // drop initramfs builds of other keys not used for a day
    for (const old of readdirSync(CACHE)) {
      const p = join(CACHE, old);
      if (/^initramfs-.*\.gz$/.test(old) && p !== out && Date.now() - statSync(p).atimeMs > 86_400_000) rmSync(p, { force: true });
    }
    return out;
  });
  for (const f of [kernel, initramfs, busybox]) if (!statSync(f).size) throw new Error(`empty ${f}`);
  return { kernel, initramfs, busybox, kernelVersion: kver, timings };
}
