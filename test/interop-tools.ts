// Real clients against bun-nbd over TCP and a unix socket: nbdinfo (--json, --list, --map,
// --can/--is), qemu-io, qemu-img (compare, map, info), nbdcopy in and out, fio's nbd engine with
// crc32c verification, nbd-client -l, and IPv6 (-b ::1). Results are checked against the files.
import * as assert from "uvu/assert";
import { copyFileSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { bytesEqual, deadline } from "./helpers/assert.ts";
import { need, run, runOk, scratch } from "./helpers/env.ts";
import { serve, type Served } from "./helpers/server.ts";
import { KiB, MiB, guardedSuite, join, nbdinfoJson, sparseFile } from "./interop-lib.ts";
import { pattern } from "./robustness-wire.ts";

const dir = scratch("bun-nbd-tools-");
const DISK = 8 * MiB, SPARSE = 64 * MiB, OTHER = MiB, FIO = 8 * MiB;
const files = {
  disk: join(dir, "disk.img"),
  sparse: join(dir, "sparse.img"),
  other: join(dir, "other.img"),
  fio: join(dir, "fio.img"),
};
const sock = join(dir, "tools.sock");
let srv: Served;
/** [label, uri(name)] for TCP and the unix socket. */
let transports: [string, (name: string) => string][] = [];

const { test, after, run: runSuite } = guardedSuite("interop-tools", async () => {
  need("nbdinfo", "qemu-io", "qemu-img", "nbdcopy", "fio", "nbd-client");
  writeFileSync(files.disk, pattern(DISK, 0, 3));
  sparseFile(files.sparse, SPARSE, [[0, pattern(64 * KiB, 0, 4)], [32 * MiB, pattern(MiB, 32 * MiB, 5)]]);
  sparseFile(files.other, OTHER);
  sparseFile(files.fio, FIO);
  srv = await serve(["-p", "0", files.disk, files.sparse, files.other, files.fio], { socket: sock });
  transports = [
    ["tcp", (n) => `nbd://127.0.0.1:${srv.port}/${n}`],
    ["unix", (n) => `nbd+unix:///${n}?socket=${sock}`],
  ];
});

test("nbdinfo --json: size, flags, block sizes, description", () => deadline(20_000, "nbdinfo", async () => {
  for (const [label, uri] of transports) {
    const j = await nbdinfoJson(uri("disk"));
    assert.is(j.protocol, "newstyle-fixed", label);
    assert.is(j.structured, true, label);
    assert.is(j.exports.length, 1, label);
    const e = j.exports[0];
    assert.is(e["export-name"], "disk", label);
    assert.is(e["export-size"], DISK, label);
    assert.is(e.description, "raw image disk.img", label);
    assert.equal([e.block_size_minimum, e.block_size_preferred, e.block_size_maximum], [1, 4096, 33554432], label);
    for (const k of ["can_cache", "can_df", "can_fast_zero", "can_flush", "can_fua", "can_multi_conn", "can_trim", "can_zero"]) assert.is(e[k], true, `${label}: ${k}`);
    assert.is(e.is_read_only, false, label);
    assert.is(e.is_rotational, false, label);
    assert.equal(e.contexts, ["base:allocation"], label);
    // the default export "" is the first file
    const d = await nbdinfoJson(uri(""));
    assert.is(d.exports[0]["export-size"], DISK, `${label}: default export`);
  }
}));

test("nbdinfo --list --json: every export with its size and description", () => deadline(20_000, "list", async () => {
  for (const [label, uri] of transports) {
    const j = await nbdinfoJson("--list", uri(""));
    const got = j.exports.map((e: any) => [e["export-name"], e["export-size"], e.description]);
    assert.equal(got, [
      ["disk", DISK, "raw image disk.img"], ["sparse", SPARSE, "raw image sparse.img"],
      ["other", OTHER, "raw image other.img"], ["fio", FIO, "raw image fio.img"],
    ], label);
  }
}));

test("nbdinfo --map and qemu-img map report the holes of a sparse image", () => deadline(20_000, "map", async () => {
  const want = [[0, 64 * KiB, 0], [64 * KiB, 32 * MiB - 64 * KiB, 3], [32 * MiB, MiB, 0], [33 * MiB, SPARSE - 33 * MiB, 3]];
  for (const [label, uri] of transports) {
    const m = await nbdinfoJson("--map", uri("sparse"));
    assert.equal(m.map((x: any) => [x.offset, x.length, x.type]), want, `${label}: nbdinfo --map`);
    const q = JSON.parse((await runOk(["qemu-img", "map", "--output=json", "-f", "raw", uri("sparse")])).stdout);
    assert.equal(q.map((x: any) => [x.start, x.length, x.data, x.zero]),
      want.map(([o, l, t]) => [o, l, t === 0, t === 3]), `${label}: qemu-img map`);
  }
}));

test("nbdinfo --can / --is probes", () => deadline(30_000, "can", async () => {
  const [, uri] = transports[0]!;
  const yes = ["connect", "write", "flush", "fua", "trim", "zero", "fast-zero", "multi-conn", "cache", "df", "structured-reply", "read"];
  for (const c of yes) {
    const r = await run(["nbdinfo", "--can", c, uri("disk")]);
    assert.is(r.code, 0, `--can ${c}: ${r.stderr}`);
  }
  for (const c of ["read-only", "rotational"]) {
    const r = await run(["nbdinfo", "--is", c, uri("disk")]);
    assert.is(r.code, 2, `--is ${c}: ${r.stderr}`);
  }
  const [, unix] = transports[1]!;
  assert.is((await run(["nbdinfo", "--can", "zero", unix("other")])).code, 0, "unix --can zero");
  assert.is((await run(["nbdinfo", "--size", unix("sparse")])).stdout.trim(), String(SPARSE), "unix --size");
}));

test("read-only server: nbdinfo --is read-only, --can write false, qemu-io write fails", () => deadline(20_000, "ro", async () => {
  const ro = await serve(["-r", files.other]);
  try {
    const uri = ro.uri("other");
    assert.is((await run(["nbdinfo", "--is", "read-only", uri])).code, 0);
    assert.is((await run(["nbdinfo", "--can", "write", uri])).code, 2);
    assert.is((await run(["nbdinfo", "--can", "trim", uri])).code, 2);
    const r = await run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4k", uri]);
    assert.ok(/Operation not permitted|read-only|Permission denied/i.test(r.stdout + r.stderr), `qemu-io write on read-only: ${r.stdout}${r.stderr}`);
  } finally {
    assert.is(await ro.stop(), 0);
  }
}));

test("qemu-io: pattern writes and reads, zero (-z, -z -u), discard, FUA, aio, flush", () => deadline(60_000, "qemu-io", async () => {
  let base = 0;
  for (const [label, uri] of transports) {
    const b = (k: number) => `${base + k * 64 * KiB}`;
    const cmds = [
      `write -P 0xab ${b(0)} 64k`, `read -P 0xab ${b(0)} 64k`,
      `write -P 0x5c ${b(1)} 192k`,
      `write -z ${b(1)} 64k`, `read -P 0 ${b(1)} 64k`,
      `write -z -u ${b(2)} 64k`, `read -P 0 ${b(2)} 64k`,
      `discard ${b(3)} 64k`,
      `write -f -P 0x77 ${b(4)} 4k`, `read -P 0x77 ${b(4)} 4k`,
      `write -P 0x31 ${Number(b(5)) + 1} 1000`, `read -P 0x31 ${Number(b(5)) + 1} 1000`,
      `aio_write -P 0x21 ${b(6)} 32k`, `aio_write -P 0x22 ${Number(b(6)) + 32 * KiB} 32k`, "aio_flush",
      `readv -P 0x21 ${b(6)} 16k 16k`, `writev -P 0x99 ${b(7)} 4k 8k 4k`, `read -P 0x99 ${b(7)} 16k`,
      "flush",
    ];
    const args = ["qemu-io", "-f", "raw"];
    for (const c of cmds) args.push("-c", c);
    args.push(uri("disk"));
    const r = await run(args, { timeoutMs: 30_000 });
    assert.is(r.code, 0, `${label}: qemu-io exit\n${r.stdout}\n${r.stderr}`);
    assert.not.ok(/fail|error/i.test(r.stdout + r.stderr), `${label}: qemu-io output\n${r.stdout}\n${r.stderr}`);
    const f = readFileSync(files.disk);
    const at = (k: number, len = 64 * KiB) => f.subarray(base + k * 64 * KiB, base + k * 64 * KiB + len);
    bytesEqual(at(0), Buffer.alloc(64 * KiB, 0xab), `${label}: write -P`);
    bytesEqual(at(1), Buffer.alloc(64 * KiB), `${label}: write -z`);
    bytesEqual(at(2), Buffer.alloc(64 * KiB), `${label}: write -z -u`);
    bytesEqual(at(4, 4 * KiB), Buffer.alloc(4 * KiB, 0x77), `${label}: FUA write`);
    bytesEqual(at(5, 1002), Buffer.concat([pattern(DISK, 0, 3).subarray(base + 5 * 64 * KiB, base + 5 * 64 * KiB + 1), Buffer.alloc(1000, 0x31), pattern(DISK, 0, 3).subarray(base + 5 * 64 * KiB + 1001, base + 5 * 64 * KiB + 1002)]), `${label}: unaligned write`);
    bytesEqual(at(6), Buffer.concat([Buffer.alloc(32 * KiB, 0x21), Buffer.alloc(32 * KiB, 0x22)]), `${label}: aio writes`);
    bytesEqual(at(7, 16 * KiB), Buffer.alloc(16 * KiB, 0x99), `${label}: writev`);
    base += MiB;
  }
}));

test("qemu-img compare and info against the file", () => deadline(30_000, "qemu-img", async () => {
  for (const [label, uri] of transports) {
    for (const name of ["disk", "sparse"] as const) {
      const r = await run(["qemu-img", "compare", "-f", "raw", "-F", "raw", files[name], uri(name)]);
      assert.is(r.code, 0, `${label} ${name}: ${r.stdout}${r.stderr}`);
    }
    const info = JSON.parse((await runOk(["qemu-img", "info", "--output=json", uri("sparse")])).stdout);
    assert.is(info["virtual-size"], SPARSE, label);
    assert.is(info.format, "raw", label);
  }
  // compare notices a difference (so the passes above mean something)
  const copy = join(dir, "disk-modified.img");
  copyFileSync(files.disk, copy);
  const f = readFileSync(copy);
  f[5 * MiB + 17] = f[5 * MiB + 17]! ^ 0xff;
  writeFileSync(copy, f);
  const r = await run(["qemu-img", "compare", "-f", "raw", "-F", "raw", copy, transports[0]![1]("disk")]);
  assert.is(r.code, 1, `compare of a modified copy: ${r.stdout}`);
  assert.match(r.stdout, `Content mismatch at offset ${5 * MiB}`);
}));

test("nbdcopy out of and into an export, byte for byte", () => deadline(60_000, "nbdcopy", async () => {
  for (const [label, uri] of transports) {
    const out = join(dir, `copy-out-${label}.img`);
    await runOk(["nbdcopy", uri("sparse"), out], { timeoutMs: 30_000 });
    bytesEqual(readFileSync(out), readFileSync(files.sparse), `${label}: nbdcopy out`);
    assert.ok(statSync(out).blocks * 512 < 8 * MiB, `${label}: holes skipped (${statSync(out).blocks * 512} bytes allocated)`);
    const src = join(dir, `copy-in-${label}.img`);
    writeFileSync(src, pattern(OTHER, 0, label === "tcp" ? 41 : 42));
    await runOk(["nbdcopy", "--flush", src, uri("other")], { timeoutMs: 30_000 });
    bytesEqual(readFileSync(files.other), readFileSync(src), `${label}: nbdcopy in`);
    // and in through stdin with several connections and requests in flight
    const src2 = pattern(OTHER, 0, label === "tcp" ? 43 : 44);
    await runOk(["nbdcopy", "--connections=2", "--requests=8", "--request-size=65536", "-", uri("other")], { timeoutMs: 30_000, stdin: src2 });
    bytesEqual(readFileSync(files.other), src2, `${label}: nbdcopy in from stdin`);
  }
}));

test("fio --ioengine=nbd: random writes verified with crc32c", () => deadline(90_000, "fio", async () => {
  for (const [label, uri] of transports) {
    const r = await run(["fio", "--name=verify", "--ioengine=nbd", `--uri=${uri("fio")}`, "--rw=randwrite", "--bs=4k",
      "--size=4M", "--iodepth=16", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_backlog=256",
      "--randseed=1234", "--output-format=json"], { timeoutMs: 60_000 });
    assert.is(r.code, 0, `${label}: fio exit\n${r.stdout.slice(-2000)}\n${r.stderr}`);
    const j = JSON.parse(r.stdout.slice(r.stdout.indexOf("{")));
    const job = j.jobs[0];
    assert.is(job.error, 0, `${label}: fio job error`);
    assert.is(job.write.io_bytes, 4 * MiB, `${label}: bytes written`);
    assert.ok(job.read.io_bytes >= 4 * MiB, `${label}: bytes verified`);
    const r2 = await run(["fio", "--name=mixed", "--ioengine=nbd", `--uri=${uri("fio")}`, "--rw=randrw", "--bsrange=512-64k",
      "--offset=4M", "--size=4M", "--iodepth=8", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--randseed=99",
      "--output-format=json"], { timeoutMs: 60_000 });
    assert.is(r2.code, 0, `${label}: fio mixed exit\n${r2.stdout.slice(-2000)}\n${r2.stderr}`);
  }
}));

test("nbd-client -l lists every export (TCP and unix)", () => deadline(20_000, "nbd-client", async () => {
  const want = ["disk: raw image disk.img", "sparse: raw image sparse.img", "other: raw image other.img", "fio: raw image fio.img"];
  const tcp = await runOk(["nbd-client", "-l", "127.0.0.1", String(srv.port)], { timeoutMs: 10_000 });
  const lines = tcp.stdout.split("\n").filter((l) => l.includes(": ") && !l.startsWith("Negotiation"));
  assert.equal(lines, want, tcp.stdout);
  const unix = await runOk(["nbd-client", "-u", sock, "-l"], { timeoutMs: 10_000 });
  assert.equal(unix.stdout.split("\n").filter((l) => l.includes(": ") && !l.startsWith("Negotiation")), want, unix.stdout);
}));

test("IPv6: -b ::1 (and both families at once)", () => deadline(30_000, "ipv6", async () => {
  const s6 = await serve(["-b", "::1", files.other]);
  try {
    const uri = `nbd://[::1]:${s6.port}/other`;
    assert.match(s6.output(), `nbd://[::1]:${s6.port}/other`);
    assert.is((await runOk(["nbdinfo", "--size", uri])).stdout.trim(), String(OTHER));
    const r = await run(["qemu-io", "-f", "raw", "-c", "write -P 0x66 4096 4k", "-c", "read -P 0x66 4096 4k", uri]);
    assert.is(r.code, 0, r.stdout + r.stderr);
    bytesEqual(readFileSync(files.other).subarray(4096, 8192), Buffer.alloc(4096, 0x66), "written over IPv6");
    // 127.0.0.1 is not served when only ::1 was asked for
    assert.not.equal((await run(["nbdinfo", "--size", `nbd://127.0.0.1:${s6.port}/other`], { timeoutMs: 10_000 })).code, 0);
  } finally {
    assert.is(await s6.stop(), 0);
  }
  const both = await serve(["-b", "127.0.0.1", "-b", "::1", files.other]);
  try {
    for (const host of ["127.0.0.1", "[::1]"]) {
      assert.is((await runOk(["nbdinfo", "--size", `nbd://${host}:${both.port}/other`])).stdout.trim(), String(OTHER), host);
    }
  } finally {
    assert.is(await both.stop(), 0);
  }
}));

after(async () => { if (srv?.proc.exitCode === null) await srv.stop("SIGKILL"); });
test("the server exits 0 on SIGTERM", async () => {
  assert.is(await srv.stop(), 0, srv.output().slice(-3000));
});

runSuite();
