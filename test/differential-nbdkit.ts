// Differential test: one seeded random sequence of reads, writes (unaligned, 1 B to 256 KiB,
// some with FUA, some in pipelined batches), write-zeroes (with and without NO_HOLE), trims,
// flushes, block-status queries and out-of-range requests, run by libnbd against a bun-nbd export
// and an nbdkit file-plugin export of a copy of the same image, and checked against an in-memory
// model. Every read must return identical bytes from both servers and the model, except bytes
// whose last change was a TRIM: the spec leaves those undefined until rewritten, so they are
// excluded from read comparisons and zeroed through NBD on both servers at the end; then the two
// files must be byte-identical and equal to the model. Set DIFF_SEED to replay a seed.
import * as assert from "uvu/assert";
import { readFileSync } from "node:fs";
import { bytesEqual, deadline } from "./helpers/assert.ts";
import { need, scratch } from "./helpers/env.ts";
import { serve } from "./helpers/server.ts";
import { MiB, guardedSuite, join, nbdkitFile, nbdpy, sparseFile } from "./interop-lib.ts";
import { pattern } from "./robustness-wire.ts";

const dir = scratch("bun-nbd-diff-");

const SCRIPT = `
import random, hashlib
SIZE = h.get_size()
seed = int(os.environ['DIFF_SEED'])
nops = int(os.environ['DIFF_OPS'])
rng = random.Random(seed)
k = nbd.NBD()
k.set_strict_mode(0)
k.add_meta_context('base:allocation')
k.connect_uri(os.environ['NBDKIT_URI'])
assert k.get_size() == SIZE, (k.get_size(), SIZE)
model = bytearray(sys.stdin.buffer.read())
assert len(model) == SIZE
trimmed = []  # sorted, disjoint [start, end) ranges whose last change was a trim
counts = {}
notes = []
class Failure(Exception): pass
def bump(name): counts[name] = counts.get(name, 0) + 1
def fail(msg): raise Failure(msg)
def untrim(a, b):
    global trimmed
    res = []
    for s, e in trimmed:
        if e <= a or s >= b: res.append((s, e)); continue
        if s < a: res.append((s, a))
        if e > b: res.append((b, e))
    trimmed = res
def trim_mark(a, b):
    untrim(a, b); trimmed.append((a, b)); trimmed.sort()
def defined(a, b):
    """The parts of [a, b) not trimmed since their last write."""
    pos = a
    for s, e in trimmed:
        if e <= pos: continue
        if s >= b: break
        if s > pos: yield (pos, s)
        pos = max(pos, e)
    if pos < b: yield (pos, b)
def span():
    r = rng.random()
    n = rng.randint(1, 512) if r < 0.3 else rng.randint(1, 65536) if r < 0.8 else rng.randint(1, 262144)
    if rng.random() < 0.4: n = max(512, n - n % 512)
    off = rng.randrange(0, SIZE - n + 1)
    if rng.random() < 0.4: off -= off % 4096
    return off, n
def compare(i, what, off, n, a, b):
    a = bytes(a); b = bytes(b)
    for s, e in defined(off, off + n):
        x, y, m = a[s - off:e - off], b[s - off:e - off], bytes(model[s:e])
        if x != y or x != m:
            for j in range(e - s):
                if x[j] != y[j] or x[j] != m[j]:
                    fail('op %d %s [%d, +%d): first difference at %d: bun-nbd %02x, nbdkit %02x, model %02x' % (i, what, off, n, s + j, x[j], y[j], m[j]))
def both(i, what, fn):
    ra = err(lambda: fn(h)); rb = err(lambda: fn(k))
    if ra != rb: fail('op %d %s: bun-nbd %s, nbdkit %s' % (i, what, ra, rb))
    return ra
def main():
  for i in range(nops):
    r = rng.random()
    if r < 0.30:
        off, n = span(); bump('read')
        flags = nbd.CMD_FLAG_FUA if rng.random() < 0.05 else 0
        compare(i, 'read', off, n, h.pread(n, off, flags), k.pread(n, off, flags))
    elif r < 0.55:
        off, n = span(); bump('write')
        data = rng.randbytes(n)
        flags = nbd.CMD_FLAG_FUA if rng.random() < 0.2 else 0
        both(i, 'write', lambda x: x.pwrite(data, off, flags))
        model[off:off + n] = data; untrim(off, off + n)
    elif r < 0.62:
        # a pipelined batch of non-overlapping writes, answered in any order
        bump('batch')
        base = rng.randrange(0, SIZE - 16 * 65536); pos = base; batch = []
        for j in range(rng.randint(2, 16)):
            n = rng.randint(1, 65536); batch.append((pos, rng.randbytes(n))); pos += n + rng.randint(0, 4096)
        for x in (h, k):
            cookies = [x.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off) for off, data in batch]
            while x.aio_in_flight() > 0: x.poll(-1)
            for c in cookies:
                if not x.aio_command_completed(c): fail('op %d: batch write %d not completed' % (i, c))
        for off, data in batch:
            model[off:off + len(data)] = data; untrim(off, off + len(data))
        n = pos - base
        compare(i, 'batch read-back', base, n, h.pread(n, base), k.pread(n, base))
    elif r < 0.74:
        off, n = span()
        if rng.random() < 0.3: n = min(SIZE - off, n * 16)  # larger zeroes too
        flags = (nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.5 else 0) | (nbd.CMD_FLAG_FUA if rng.random() < 0.2 else 0)
        bump('zero-nohole' if flags & nbd.CMD_FLAG_NO_HOLE else 'zero')
        both(i, 'zero', lambda x: x.zero(n, off, flags))
        model[off:off + n] = bytes(n); untrim(off, off + n)
    elif r < 0.84:
        off, n = span(); bump('trim')
        if rng.random() < 0.3: n = min(SIZE - off, n * 16)
        both(i, 'trim', lambda x: x.trim(n, off))
        trim_mark(off, off + n)
    elif r < 0.89:
        bump('flush'); both(i, 'flush', lambda x: x.flush())
    elif r < 0.95:
        # block status: wherever a server claims ZERO, it must read as zeros
        off, n = span(); bump('block_status')
        for name, x in (('bun-nbd', h), ('nbdkit', k)):
            ext = []
            x.block_status(n, off, lambda c, o, e, er: ext.extend(e) or 0)
            pos = off
            for j in range(0, len(ext), 2):
                ln, fl = ext[j], ext[j + 1]
                end = min(pos + ln, off + n)
                if fl & 2 and end > pos:
                    got = bytes(x.pread(end - pos, pos))
                    if got != bytes(end - pos): fail('op %d: %s reports ZERO for [%d, %d) but it reads nonzero' % (i, name, pos, end))
                pos += ln
                if pos >= off + n: break
    else:
        # out of range: both must fail; the errno may legitimately differ (the spec allows EINVAL or ENOSPC)
        bump('out_of_range')
        n = rng.randint(1, 8192); off = SIZE - rng.randint(0, n - 1) if rng.random() < 0.7 else SIZE + rng.randint(0, 1 << 20)
        op = rng.choice(['read', 'write', 'zero', 'trim'])
        fn = {'read': lambda x: x.pread(n, off), 'write': lambda x: x.pwrite(bytes(n), off),
              'zero': lambda x: x.zero(n, off), 'trim': lambda x: x.trim(n, off)}[op]
        ra = err(lambda: fn(h)); rb = err(lambda: fn(k))
        if ra == 'ok' or rb == 'ok': fail('op %d %s [%d, +%d) past the end: bun-nbd %s, nbdkit %s' % (i, op, off, n, ra, rb))
        if ra != rb: notes.append('%s past the end: bun-nbd %s, nbdkit %s' % (op, ra, rb))
def finish():
    # zero what is still trimmed, on both, so the files can be compared whole
    for s, e in list(trimmed):
        both(-1, 'final zero', lambda x: x.zero(e - s, s, nbd.CMD_FLAG_NO_HOLE))
        model[s:e] = bytes(e - s)
    both(-1, 'final flush', lambda x: x.flush())
    for x in (h, k): x.shutdown()
try:
    main()
    finish()
except Failure as f:
    out['failure'] = str(f)
out['counts'] = counts
out['notes'] = sorted(set(notes))
out['md5'] = hashlib.md5(bytes(model)).hexdigest()
`;

async function differential(seed: number, size: number, regions: [number, Uint8Array][], ops: number): Promise<void> {
  const a = join(dir, `bun-${seed}.img`), b = join(dir, `nbdkit-${seed}.img`);
  sparseFile(a, size, regions);
  sparseFile(b, size, regions);
  const initial = new Uint8Array(size);
  for (const [off, d] of regions) initial.set(d, off);
  const srv = await serve(["-q", a], { socket: join(dir, `bun-${seed}.sock`) });
  const kit = await nbdkitFile(b, join(dir, `nbdkit-${seed}.sock`));
  let o: any;
  try {
    o = await nbdpy(srv.uri(`bun-${seed}`), SCRIPT, { stdin: initial, timeoutMs: 150_000, env: { DIFF_SEED: String(seed), DIFF_OPS: String(ops), NBDKIT_URI: kit.uri } });
  } finally {
    await kit.stop();
    assert.is(await srv.stop(), 0, "bun-nbd exit status");
  }
  if (o.failure) assert.unreachable(`seed ${seed}: ${o.failure}`);
  console.log(`  seed ${seed}: ${Object.entries(o.counts).map(([k, v]) => `${k} ${v}`).join(", ")}${o.notes.length ? `; errno differences: ${o.notes.join("; ")}` : ""}`);
  const fa = readFileSync(a), fb = readFileSync(b);
  bytesEqual(fa, fb, `seed ${seed}: bun-nbd file vs nbdkit file`);
  assert.is(new Bun.CryptoHasher("md5").update(fa).digest("hex"), o.md5, `seed ${seed}: files vs the model`);
}

const OPS = Number(process.env.DIFF_OPS ?? 2500);
const seeds = process.env.DIFF_SEED ? [Number(process.env.DIFF_SEED)] : [1, 2];

const { test, run: runSuite } = guardedSuite("differential-nbdkit", () => need("nbdkit", "nbdsh"));

for (const seed of seeds) {
  test(`seed ${seed}: ${OPS} random operations, bun-nbd vs nbdkit vs model`, () => deadline(170_000, `seed ${seed}`, async () => {
    // odd seeds start from a fully written image, even seeds from a mostly sparse one
    const SIZE = 8 * MiB;
    const regions: [number, Uint8Array][] = seed % 2 ? [[0, pattern(SIZE, 0, seed)]]
      : [[MiB, pattern(MiB, MiB, seed)], [5 * MiB + 123, pattern(300_000, 5 * MiB + 123, seed)]];
    await differential(seed, SIZE, regions, OPS);
  }));
}

runSuite();
