// libnbd (python bindings, i.e. what nbdsh runs) against bun-nbd over TCP and a unix socket:
// errnos the spec asks for, structured read chunks (holes as OFFSET_HOLE), DF reads, block status
// with and without REQ_ONE, FUA and flush, write-zeroes with NO_HOLE and FAST_ZERO, trim, cache,
// and a read-only export. Strict mode is off so out-of-range requests reach the server.
import * as assert from "uvu/assert";
import { readFileSync } from "node:fs";
import { bytesEqual, deadline } from "./helpers/assert.ts";
import { need, scratch } from "./helpers/env.ts";
import { serve, type Served } from "./helpers/server.ts";
import { MiB, guardedSuite, join, nbdpy, sparseFile } from "./interop-lib.ts";
import { pattern } from "./robustness-wire.ts";

const dir = scratch("bun-nbd-nbdsh-");
const SIZE = 16 * MiB;
// layout: data [0, 1 MiB), hole [1, 4 MiB), data [4 MiB, 4 MiB + 64 KiB), hole to the end
const DATA1 = pattern(MiB, 0, 1), DATA2 = pattern(65536, 4 * MiB, 2);
const img = join(dir, "disk.img");
const roImg = join(dir, "ro.img");
let rw: Served, ro: Served;
let uris: [string, string][] = []; // [label, uri]

const { test, after, run: runSuite } = guardedSuite("interop-nbdsh", async () => {
  need("nbdsh");
  sparseFile(img, SIZE, [[0, DATA1], [4 * MiB, DATA2]]);
  sparseFile(roImg, MiB, [[0, pattern(4096, 0, 5)]]);
  rw = await serve(["-p", "0", img], { socket: join(dir, "rw.sock") });
  ro = await serve(["-r", roImg], { socket: join(dir, "ro.sock") });
  uris = [["tcp", `nbd://127.0.0.1:${rw.port}/disk`], ["unix", rw.uri("disk")]];
});

test("capabilities as libnbd sees them", () => deadline(20_000, "caps", async () => {
  for (const [label, uri] of uris) {
    const o = await nbdpy(uri, `
for k in ['can_flush','can_fua','can_trim','can_zero','can_fast_zero','can_cache','can_df','can_multi_conn','is_read_only','is_rotational']:
    out[k] = bool(getattr(h, k)())
out['size'] = h.get_size()
out['structured'] = bool(h.get_structured_replies_negotiated())
out['meta'] = bool(h.can_meta_context('base:allocation'))
out['bs'] = [h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_PREFERRED), h.get_block_size(nbd.SIZE_MAXIMUM)]
out['name'] = h.get_canonical_export_name()
out['desc'] = h.get_export_description()
`);
    assert.equal(o, {
      can_flush: true, can_fua: true, can_trim: true, can_zero: true, can_fast_zero: true, can_cache: true, can_df: true,
      can_multi_conn: true, is_read_only: false, is_rotational: false, size: SIZE, structured: true, meta: true,
      bs: [1, 4096, 33554432], name: "disk", desc: "raw image disk.img",
    }, label);
  }
}));

test("errnos: reads/trims past the end EINVAL, writes/zeroes past the end ENOSPC, bad flags EINVAL", () => deadline(20_000, "errnos", async () => {
  for (const [label, uri] of uris) {
    const o = await nbdpy(uri, `
S = h.get_size()
out['read_past_end'] = err(lambda: h.pread(512, S - 100))
out['read_beyond'] = err(lambda: h.pread(512, S + 4096))
out['write_past_end'] = err(lambda: h.pwrite(b'x' * 512, S - 100))
out['zero_past_end'] = err(lambda: h.zero(512, S - 100))
out['trim_past_end'] = err(lambda: h.trim(512, S - 100))
out['bs_past_end'] = err(lambda: h.block_status(512, S + 512, lambda *a: 0))
out['read_no_hole_flag'] = err(lambda: h.pread(512, 0, nbd.CMD_FLAG_NO_HOLE))
out['write_req_one_flag'] = err(lambda: h.pwrite(b'x' * 512, 0, nbd.CMD_FLAG_REQ_ONE))
out['trim_fast_zero_flag'] = err(lambda: h.trim(512, 0, nbd.CMD_FLAG_FAST_ZERO))
out['read_at_last_byte'] = err(lambda: h.pread(1, S - 1))
out['still_works'] = bytes(h.pread(16, 0)).hex()
`);
    assert.equal(o, {
      read_past_end: "EINVAL", read_beyond: "EINVAL", write_past_end: "ENOSPC", zero_past_end: "ENOSPC",
      trim_past_end: "EINVAL", bs_past_end: "EINVAL", read_no_hole_flag: "EINVAL", write_req_one_flag: "EINVAL",
      trim_fast_zero_flag: "EINVAL", read_at_last_byte: "ok", still_works: DATA1.subarray(0, 16).toString("hex"),
    }, label);
  }
}));

test("read-only export (-r): EPERM for write/zero/trim, reads work", () => deadline(20_000, "ro", async () => {
  const o = await nbdpy(ro.uri("ro"), `
out['ro'] = bool(h.is_read_only())
out['can_trim'] = bool(h.can_trim())
out['can_zero'] = bool(h.can_zero())
out['write'] = err(lambda: h.pwrite(b'x' * 512, 0))
out['zero'] = err(lambda: h.zero(512, 0))
out['trim'] = err(lambda: h.trim(512, 0))
out['read'] = bytes(h.pread(16, 0)).hex()
`);
  assert.equal(o, { ro: true, can_trim: false, can_zero: false, write: "EPERM", zero: "EPERM", trim: "EPERM", read: pattern(16, 0, 5).toString("hex") });
  bytesEqual(readFileSync(roImg).subarray(0, 4096), pattern(4096, 0, 5), "read-only file untouched");
}));

test("structured reads: holes come back as OFFSET_HOLE chunks, bytes match, DF gives one chunk", () => deadline(30_000, "structured", async () => {
  for (const [label, uri] of uris) {
    const o = await nbdpy(uri, `
import hashlib
chunks = []
def cb(subbuf, offset, status, error):
    chunks.append([status, offset, len(subbuf)])
    return 0
buf = h.pread_structured(8 * 1024 * 1024, 0, cb)
out['chunks'] = sorted(chunks, key=lambda c: c[1])
out['md5'] = hashlib.md5(bytes(buf)).hexdigest()
df = []
h.pread_structured(65536, 1024 * 1024 - 4096, lambda s, o, st, e: df.append([st, o, len(s)]) or 0, nbd.CMD_FLAG_DF)
out['df'] = df
small = []
h.pread_structured(4096, 2 * 1024 * 1024, lambda s, o, st, e: small.append([st, o, len(s)]) or 0)
out['small_hole_read'] = small
`);
    const chunks = o.chunks as [number, number, number][];
    let pos = 0;
    for (const [, off, len] of chunks) {
      assert.is(off, pos, `${label}: chunks contiguous, no overlap`);
      assert.ok(len > 0, `${label}: non-empty chunk`);
      pos += len;
    }
    assert.is(pos, 8 * MiB, `${label}: chunks cover the request`);
    const holes = chunks.filter((c) => c[0] === 2);
    assert.ok(holes.length > 0, `${label}: at least one OFFSET_HOLE chunk: ${JSON.stringify(chunks)}`);
    // the hole [1 MiB, 4 MiB) is reported as holes, the data ranges as data
    const holeBytes = holes.reduce((n, c) => n + c[2], 0);
    assert.ok(holeBytes >= 3 * MiB, `${label}: ${holeBytes} bytes reported as holes`);
    for (const [st, off, len] of chunks) {
      if (st === 2) assert.ok(off >= MiB && (off + len <= 4 * MiB || off >= 4 * MiB + 65536), `${label}: hole chunk over data at ${off}+${len}`);
    }
    const want = Buffer.concat([DATA1, Buffer.alloc(3 * MiB), DATA2, Buffer.alloc(8 * MiB - 4 * MiB - 65536)]);
    assert.is(o.md5, new Bun.CryptoHasher("md5").update(want).digest("hex"), `${label}: bytes of the structured read`);
    assert.is(o.df.length, 1, `${label}: DF read gives one chunk`);
    assert.equal(o.df[0]!, [1, MiB - 4096, 65536], `${label}: DF chunk is OFFSET_DATA covering the range`);
    const small = o.small_hole_read.reduce((n: number, c: number[]) => n + c[2]!, 0);
    assert.is(small, 4096, `${label}: a small read of a hole is covered`);
  }
}));

test("block status with and without REQ_ONE", () => deadline(20_000, "block status", async () => {
  for (const [label, uri] of uris) {
    const o = await nbdpy(uri, `
res = []
h.block_status(16 * 1024 * 1024, 0, lambda ctx, off, ent, e: res.append([ctx, off, list(ent)]) or 0)
out['all'] = res
one = []
h.block_status(8 * 1024 * 1024, 0, lambda ctx, off, ent, e: one.append(list(ent)) or 0, nbd.CMD_FLAG_REQ_ONE)
out['one'] = one
one2 = []
h.block_status(4 * 1024 * 1024, 512 * 1024, lambda ctx, off, ent, e: one2.append(list(ent)) or 0, nbd.CMD_FLAG_REQ_ONE)
out['one_mid'] = one2
mid = []
h.block_status(1024 * 1024, 2 * 1024 * 1024, lambda ctx, off, ent, e: mid.append(list(ent)) or 0)
out['mid_hole'] = mid
`);
    assert.is(o.all.length, 1, `${label}: one context`);
    const [ctx, off, ent] = o.all[0];
    assert.is(ctx, "base:allocation");
    assert.is(off, 0);
    const ext: [number, number][] = [];
    for (let i = 0; i < ent.length; i += 2) ext.push([ent[i], ent[i + 1]]);
    assert.equal(ext, [[MiB, 0], [3 * MiB, 3], [65536, 0], [SIZE - 4 * MiB - 65536, 3]], `${label}: extents`);
    assert.is(o.one.length, 1);
    assert.equal(o.one[0], [MiB, 0], `${label}: REQ_ONE gives exactly one extent`);
    assert.equal(o.one_mid[0], [512 * 1024, 0], `${label}: REQ_ONE from inside the data extent`);
    const m = o.mid_hole[0];
    assert.is(m[1], 3, `${label}: hole,zero inside the hole`);
    assert.ok(m[0] >= MiB, `${label}: the first extent reaches at least the request`);
  }
}));

test("FUA writes, flush, write-zeroes (NO_HOLE, FAST_ZERO), trim and cache", () => deadline(30_000, "writes", async () => {
  let base = 8 * MiB;
  for (const [label, uri] of uris) {
    const o = await nbdpy(uri, `
B = ${base}
S = 65536
data = bytes((i * 7 + 3) & 255 for i in range(S))
h.pwrite(data, B, nbd.CMD_FLAG_FUA)
out['fua_read'] = bytes(h.pread(S, B)) == data
out['flush'] = err(lambda: h.flush())
out['flush_fua'] = err(lambda: h.flush(nbd.CMD_FLAG_FUA))
# zero with NO_HOLE: reads as zeros and stays allocated (no HOLE bit)
h.zero(16384, B, nbd.CMD_FLAG_NO_HOLE)
out['nohole_zero'] = bytes(h.pread(16384, B)) == bytes(16384)
st = []
h.block_status(16384, B, lambda c, o, e, er: st.append(list(e)) or 0, nbd.CMD_FLAG_REQ_ONE)
out['nohole_status'] = st[0]
# zero allowed to punch
h.zero(16384, B + 16384)
out['zero'] = bytes(h.pread(16384, B + 16384)) == bytes(16384)
# fast zero: either done (reads zero) or ENOTSUP with the data untouched
r = err(lambda: h.zero(16384, B + 32768, nbd.CMD_FLAG_FAST_ZERO))
after = bytes(h.pread(16384, B + 32768))
out['fast_zero'] = r
out['fast_zero_ok'] = (r == 'ok' and after == bytes(16384)) or (r == 'ENOTSUP' and after == data[32768:49152])
out['zero_fua'] = err(lambda: h.zero(4096, B + 49152, nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE))
out['zero_fua_read'] = bytes(h.pread(4096, B + 49152)) == bytes(4096)
out['untouched_tail'] = bytes(h.pread(12288, B + 53248)) == data[53248:]
# trim: allowed; contents afterwards are unspecified, but the request succeeds
out['trim'] = err(lambda: h.trim(65536, B + 65536))
out['trim_fua'] = err(lambda: h.trim(4096, B + 2 * 65536, nbd.CMD_FLAG_FUA))
out['cache'] = err(lambda: h.cache(65536, 0))
out['cache_all'] = err(lambda: h.cache(16 * 1024 * 1024, 0))
out['flush2'] = err(lambda: h.flush())
`);
    assert.equal(o, {
      fua_read: true, flush: "ok", flush_fua: "ok", nohole_zero: true, nohole_status: o.nohole_status, zero: true,
      fast_zero: o.fast_zero, fast_zero_ok: true, zero_fua: "ok", zero_fua_read: true, untouched_tail: true,
      trim: "ok", trim_fua: "ok", cache: "ok", cache_all: "ok", flush2: "ok",
    }, label);
    assert.is(o.nohole_status[1] & 1, 0, `${label}: NO_HOLE zero left the range allocated (status ${o.nohole_status[1]})`);
    assert.ok(o.nohole_status[0] <= 16384, `${label}: REQ_ONE extent within the request`);
    // check the file itself
    const f = readFileSync(img).subarray(base, base + 65536);
    bytesEqual(f.subarray(0, 32768), Buffer.alloc(32768), `${label}: zeroed ranges in the file`);
    bytesEqual(f.subarray(49152, 53248), Buffer.alloc(4096), `${label}: FUA zero in the file`);
    base += 4 * 65536;
  }
}));

test("structured replies off: libnbd still reads and writes with simple replies", () => deadline(20_000, "simple", async () => {
  const o = await nbdpy(uris[0]![1], `
h.set_request_structured_replies(False)
h.connect_uri(uri)
out['structured'] = bool(h.get_structured_replies_negotiated())
out['df'] = bool(h.can_df())
out['read'] = bytes(h.pread(4096, 0)).hex()
out['past_end'] = err(lambda: h.pread(512, h.get_size() - 1))
out['bs'] = err(lambda: h.block_status(512, 0, lambda *a: 0))
`, { connect: false });
  assert.equal(o, { structured: false, df: false, read: DATA1.subarray(0, 4096).toString("hex"), past_end: "EINVAL", bs: o.bs });
  assert.ok(o.bs !== "ok", "block status without structured replies fails");
}));

test("LIST through libnbd (opt mode) and an unknown export name", () => deadline(20_000, "list", async () => {
  const o = await nbdpy(uris[1]![1], `
h.set_opt_mode(True)
h.connect_uri(uri)
names = []
h.opt_list(lambda name, desc: names.append([name, desc]) or 0)
out['list'] = names
h.set_export_name('nope')
out['go_unknown'] = err(lambda: h.opt_go())
h.set_export_name('disk')
h.opt_go()
out['size'] = h.get_size()
`, { connect: false });
  assert.equal(o.list, [["disk", "raw image disk.img"]]);
  assert.ok(o.go_unknown !== "ok", "GO of an unknown export fails");
  assert.is(o.size, SIZE);
}));

after(async () => {
  for (const s of [rw, ro]) if (s?.proc.exitCode === null) await s.stop("SIGKILL");
});
test("both servers exit 0 on SIGTERM", async () => {
  assert.is(await rw.stop(), 0, rw.output().slice(-3000));
  assert.is(await ro.stop(), 0, ro.output().slice(-3000));
});

runSuite();
