// The remote cache and locations without a store: URLs printed without credentials, s3:// names and
// AWS settings, sizes; the cache file marking a block only once complete, a reopen seeing exactly
// the marked blocks, LRU eviction, small writes at once and large ones on the pool, and blocks held
// in part (4 KiB pieces). (The device against a real nginx: remote-device.ts.)
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { readdirSync } from "node:fs";
import { join } from "node:path";
import { bytesEqual } from "./helpers/assert.ts";
import { scratch } from "./helpers/env.ts";
import { parseLocation, redactUrl, s3Settings, siblingLocation } from "../src/devices/remote/location.ts";
import { parseSize } from "../src/cli/remote-args.ts";
import { ABSENT, BlockCache, DATA, PARTIAL, PIECE, ZERO } from "../src/devices/remote/cache.ts";

const KiB = 1024, MiB = 1024 * KiB;
const dir = scratch("bun-nbd-remote-cache-");

const unit = suite("remote: locations, sizes, the cache file");

unit("URLs are printed without user:password or signing parameters", () => {
  const u = new URL("https://alice:hunter2@example.com/img/disk.img?X-Amz-Signature=abc&X-Amz-Credential=AKIA%2Fx&part=1");
  const s = redactUrl(u);
  assert.not.ok(/hunter2|alice|abc|AKIA/.test(s), s);
  assert.ok(s.startsWith("https://example.com/img/disk.img?part=1"), s);
  const loc = parseLocation("http://bob:pw@h:8080/a/b.img");
  assert.is(loc.display, "http://h:8080/a/b.img");
});

unit("s3:// names and AWS environment settings", () => {
  const env = { AWS_ENDPOINT_URL: "http://127.0.0.1:9000", AWS_REGION: "eu-west-1", AWS_ACCESS_KEY_ID: "AK", AWS_SECRET_ACCESS_KEY: "SK" };
  const s = s3Settings({ region: "us-east-2" }, env);
  assert.equal([s.endpoint, s.region, s.accessKeyId, s.secretAccessKey], ["http://127.0.0.1:9000", "us-east-2", "AK", "SK"]);
  const loc = parseLocation("s3://bucket/dir/disk%20one.img", s);
  assert.ok(loc.kind === "s3" && loc.bucket === "bucket" && loc.objectKey === "dir/disk one.img");
  assert.not.ok(loc.key.includes("SK") || loc.display.includes("SK"));
  assert.throws(() => parseLocation("s3://bucket/"), /no object key/);
  assert.throws(() => parseLocation("s3://AK:SK@bucket/x"), /credentials do not belong/);
  assert.throws(() => parseLocation("ftp://h/x"), /unsupported URL scheme/);
  const bin = siblingLocation(loc, "../tracks/Track 01.bin");
  assert.ok(bin.kind === "s3" && bin.objectKey === "tracks/Track 01.bin", bin.display);
  const hb = siblingLocation(parseLocation("http://h/cds/game.cue"), "game (Track 1).bin");
  assert.is(hb.display, "http://h/cds/game%20(Track%201).bin");
});

unit("sizes", () => {
  assert.equal([parseSize("8G", "x"), parseSize("512M", "x"), parseSize("64KiB", "x"), parseSize("4096", "x")], [8 * 2 ** 30, 512 * MiB, 64 * KiB, 4096]);
  assert.throws(() => parseSize("lots", "--cache-size"), /--cache-size/);
});

unit("the cache marks a block only once complete; a reopen sees exactly the marked blocks; LRU eviction", async () => {
  const bs = 64 * KiB;
  const version = { size: 40 * bs + 100, etag: '"v1"', lastModified: null };
  const o = { dir: join(dir, "unit-cache"), key: "http://h/x.img", version, blockSize: bs, budget: 16 * bs, log: () => {} };
  const complete = (c: BlockCache, b: number) => new Promise<boolean>((resolve) => c.complete(b, resolve));
  const fill = (c: BlockCache, b: number, bytes: Uint8Array) => { c.begin(b); c.write(b, b * bs, bytes); return complete(c, b); };
  let c = BlockCache.open(o);
  const data = new Uint8Array(bs).fill(9);
  c.begin(0);
  c.write(0, 0, data.subarray(0, bs / 2)); // half of block 0, never completed (a kill -9 here)
  assert.ok(await fill(c, 1, data));
  assert.ok(await fill(c, 2, new Uint8Array(bs))); // all zeros: marked, nothing written
  c.begin(3);
  c.write(3, 3 * bs, data);
  c.abandon(3); // the GET failed
  await c.close(); // waits for the writes in flight
  c = BlockCache.open(o);
  assert.equal([...c.state.subarray(0, 4)], [ABSENT, DATA, ZERO, ABSENT]);
  assert.is(c.used, bs);
  const b = new Uint8Array(bs);
  c.read(b, 0, bs, bs);
  bytesEqual(b, data, "block 1 after the reopen");
  for (let i = 4; i < 22; i++) {
    assert.ok(await fill(c, i, data));
    c.touch(1); // block 1 stays the most recently used
    assert.ok(c.used <= 16 * bs);
  }
  assert.is(c.state[1], DATA, "the block kept in use is never evicted");
  assert.equal([...c.state.subarray(4, 7)], [ABSENT, ABSENT, ABSENT], "the oldest blocks went first");
  assert.is(c.state[21], DATA);
  await c.close();
  const other = BlockCache.open({ ...o, version: { ...version, etag: '"v2"' } });
  assert.equal([...other.state.subarray(0, 22)].filter((x) => x !== ABSENT), [], "another ETag: a new, empty entry");
  await other.close();
  assert.is(readdirSync(o.dir).filter((n) => n.endsWith(".map")).length, 1, "the entry of the older version was removed");
});

unit("cache writes: a small one goes at once while the pool is idle; large ones, and small ones behind them or after a slow write, go to the pool", async () => {
  const bs = 64 * KiB;
  const version = { size: 8 * bs, etag: '"w1"', lastModified: null };
  const o = { dir: join(dir, "unit-writer"), key: "http://h/w.img", version, blockSize: bs, budget: 8 * bs, log: () => {} };
  const c = BlockCache.open(o);
  const got = new Uint8Array(PIECE);
  const p = new Uint8Array(PIECE).fill(0x41);
  c.begin(0);
  c.write(0, 0, p);
  assert.is(c.writer.writesInFlight, 0, "a piece with nothing in flight is written at once");
  c.read(got, 0, PIECE, 0);
  bytesEqual(got, p, "in the file when write() returns");
  c.begin(1);
  c.write(1, bs, new Uint8Array(bs).fill(0x42));
  assert.is(c.writer.writesInFlight, 1, "a whole block goes to the pool");
  c.write(0, PIECE, p);
  assert.is(c.writer.writesInFlight, 2, "a piece behind a write in flight waits its turn on the pool");
  const marked = await Promise.all([
    new Promise<boolean>((resolve) => c.completePieces(0, 0, 2 * PIECE, resolve)),
    new Promise<boolean>((resolve) => c.complete(1, resolve)),
  ]);
  assert.equal(marked, [true, true]);
  assert.is(c.writer.writesInFlight, 0);
  c.writer.slowWriteAt = Date.now(); // as after a write the kernel throttled
  c.begin(2);
  c.write(2, 2 * bs, p);
  assert.is(c.writer.writesInFlight, 1, "after a slow write, pieces go to the pool too");
  assert.ok(await new Promise<boolean>((resolve) => c.completePieces(2, 2 * bs, 2 * bs + PIECE, resolve)));
  const all = new Uint8Array(bs + PIECE);
  c.read(all, 0, all.length, bs);
  bytesEqual(all.subarray(0, bs), new Uint8Array(bs).fill(0x42), "block 1");
  bytesEqual(all.subarray(bs), p, "block 2's piece");
  await c.close();
});

unit("blocks held in part: pieces are marked once written, survive a reopen, fill up to whole blocks, and are evicted whole", async () => {
  const bs = 64 * KiB;
  const version = { size: 40 * bs + 100, etag: '"p1"', lastModified: null };
  const o = { dir: join(dir, "unit-pieces"), key: "http://h/p.img", version, blockSize: bs, budget: 16 * bs, log: () => {} };
  const pieces = (c: BlockCache, b: number, from: number, bytes: Uint8Array) => {
    c.begin(b);
    c.write(b, b * bs + from, bytes);
    return new Promise<boolean>((resolve) => c.completePieces(b, b * bs + from, b * bs + from + bytes.length, resolve));
  };
  const p = new Uint8Array(PIECE).fill(7);
  let c = BlockCache.open(o);
  assert.ok(await pieces(c, 5, 0, p));
  assert.ok(await pieces(c, 5, 2 * PIECE, new Uint8Array(PIECE))); // a zero piece: marked, nothing written
  c.begin(5);
  c.write(5, 5 * bs + 4 * PIECE, p);
  c.abandon(5); // a piece GET that failed: not marked
  c.begin(6);
  c.write(6, 6 * bs + PIECE, p.subarray(0, 100)); // never completed (a kill -9 here)
  assert.ok(await pieces(c, 40, 0, new Uint8Array(100).fill(3)), "the short last block's only piece");
  await c.close();
  c = BlockCache.open(o);
  assert.equal([c.state[5], c.state[6], c.state[40]], [PARTIAL, ABSENT, DATA], "the last block's one short piece is the whole block");
  assert.ok(c.has(5 * bs, PIECE) && c.has(5 * bs + 2 * PIECE + 10, 100), "marked pieces are held");
  assert.not.ok(c.has(5 * bs, 2 * PIECE), "a range into an unmarked piece is not");
  assert.not.ok(c.has(5 * bs + 4 * PIECE, 1), "the abandoned piece is not");
  assert.not.ok(c.has(6 * bs + PIECE, 1));
  assert.is(c.used, 2 * PIECE + 100);
  const got = new Uint8Array(3 * PIECE);
  c.read(got, 0, got.length, 5 * bs);
  bytesEqual(got.subarray(0, PIECE), p, "piece 0 after the reopen");
  bytesEqual(got.subarray(2 * PIECE), new Uint8Array(PIECE), "the zero piece reads as zeros");
  // a whole-block GET over a block held in part makes it whole
  c.begin(5);
  c.write(5, 5 * bs, new Uint8Array(bs).fill(7));
  assert.ok(await new Promise<boolean>((resolve) => c.complete(5, resolve)));
  assert.is(c.state[5], DATA);
  assert.is(c.used, bs + 100);
  // a block held in part while a GET fills it is not evicted; others go, least recently used first
  assert.ok(await pieces(c, 7, 0, p));
  c.begin(7);
  for (let b = 8; b < 40; b++) assert.ok(await pieces(c, b, 0, new Uint8Array(bs / 2).fill(1)));
  assert.is(c.state[7], PARTIAL, "being filled: kept");
  assert.ok(c.used <= 16 * bs, `within the budget: ${c.used}`);
  assert.ok(c.evictions > 0 && c.state[5] === ABSENT && c.state[8] === ABSENT && !c.has(8 * bs, 1) && c.state[39] === PARTIAL, "the oldest blocks held in part were evicted whole");
  c.write(7, 7 * bs + PIECE, p);
  assert.ok(await new Promise<boolean>((resolve) => c.completePieces(7, 7 * bs + PIECE, 7 * bs + 2 * PIECE, resolve)));
  assert.ok(c.has(7 * bs, 2 * PIECE));
  await c.close();
});

unit.run();
