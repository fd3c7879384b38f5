// A remote image whose every block is in its cache is served like a local file: a connection goes
// to a thread of its own over the cache's data file, read-only (RemoteImage.recipe). Until then,
// and for a cache that could still change, connections stay on the event loop, where the fetcher
// and the cache live. Each test checks by the server's counters where the connection ran.
import * as assert from "uvu/assert";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { connect } from "../src/client/index.ts";
import { openRemoteImage, type RemoteImage } from "../src/devices/remote/index.ts";
import { silentLogger } from "../src/server/log.ts";
import { NbdServer } from "../src/server/server.ts";
import { bytesEqual } from "./helpers/assert.ts";
import { makeImage } from "./helpers/remote-images.ts";
import { startNginx, type Nginx } from "./services/nginx.ts";
import { CMD, request, Wire } from "./robustness-wire.ts";
import { guardedSuite } from "./interop-lib.ts";

const MiB = 1024 * 1024;
const SIZE = 6 * MiB + 4321; // a short last block; MiBs 0 and 3 are holes (zeroEvery 3)
let ngx: Nginx;
let local: Uint8Array;

// uvu swallows errors thrown in before hooks: a failed setup fails every test with its cause
const { test, after, run } = guardedSuite("remote images on threads", async () => {
  ngx = await startNginx();
  local = readFileSync(makeImage(join(ngx.root, "disk.img"), SIZE, 11, { zeroEvery: 3 }));
});
after(async () => { await ngx?.stop(); });

async function until(what: string, ok: () => boolean, ms = 5000): Promise<void> {
  const limit = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > limit) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(5);
  }
}

function serve(img: RemoteImage): { server: NbdServer; uri: string; port: number } {
  const server = new NbdServer([{ name: "r", device: img }], { threads: 2, log: silentLogger, handshakeTimeout: 0 });
  const { port } = server.listenTcp("127.0.0.1", 0);
  return { server, uri: `nbd://127.0.0.1:${port}/r`, port };
}

test("partly cached: the event loop; once every block is held, a thread reads the cache file, with no GET", async () => {
  const img = await openRemoteImage(ngx.url("disk.img"), { cacheDir: null, blockSize: 64 * 1024, readahead: 0 }, () => {});
  const s = serve(img);
  try {
    const first = await connect(s.uri);
    bytesEqual(await first.read(MiB, MiB), local.subarray(MiB, 2 * MiB), "one MiB, cold");
    assert.not.ok(img.blocks.allHeld());
    bytesEqual(await first.read(0, SIZE), local, "the whole image, cold");
    await first.close();
    assert.is(s.server.threadStats().served, 0, "a cache still filling keeps its connections on the event loop");
    await until("every block held", () => img.blocks.allHeld());

    const gets = ngx.rangeGets("/disk.img");
    const hits = img.counters.cacheHits;
    const c = await connect(s.uri);
    await until("the connection on a thread", () => s.server.threadStats().running === 1);
    bytesEqual(await c.read(0, SIZE), local, "the whole image, from the thread");
    bytesEqual(await c.read(SIZE - 1, 1), local.subarray(SIZE - 1), "the last byte");
    bytesEqual(await c.read(3 * MiB - 10, 20), local.subarray(3 * MiB - 10, 3 * MiB + 10), "across the edge of a hole");
    const ext = (await c.blockStatus(0, SIZE)).get("base:allocation")!;
    const at = (pos: number) => ext.find((e) => e.offset <= pos && pos < e.offset + e.length)!;
    assert.ok(at(3 * MiB + 5).flags & 2, "a MiB of zeros reads as zero in block status");
    assert.is(at(MiB + 5).flags & 2, 0, "data is data");
    await c.close();
    await until("the thread done", () => s.server.threadStats().running === 0);
    assert.is(s.server.threadStats().served, 1);
    assert.is(ngx.rangeGets("/disk.img"), gets, "no GET from the thread");
    assert.is(img.counters.cacheHits, hits, "the thread's reads are not counted as cache hits (the export's metrics count them)");
  } finally {
    await s.server.close();
    await img.close();
  }
});

test("on its thread a remote image stays read-only", async () => {
  const img = await openRemoteImage(ngx.url("disk.img"), { cacheDir: null, blockSize: 64 * 1024, readahead: 0 }, () => {});
  const s = serve(img);
  try {
    await img.load(0, SIZE);
    await until("every block held", () => img.blocks.allHeld());
    const w = await Wire.open({ port: s.port });
    try {
      await w.hello();
      const { flags } = await w.go("r");
      assert.ok(flags & 2, "NBD_FLAG_READ_ONLY");
      await until("the connection on a thread", () => s.server.threadStats().running === 1);
      w.write(request(CMD.WRITE, 1n, 0, 4096, 0, new Uint8Array(4096).fill(1)));
      assert.is((await w.simpleReply()).error, 1, "EPERM");
      w.write(request(CMD.READ, 2n, MiB, 4096));
      bytesEqual((await w.simpleReply(4096)).data!, local.subarray(MiB, MiB + 4096), "read");
    } finally {
      w.destroy();
    }
    const c = await connect(s.uri);
    bytesEqual(await c.read(MiB, 4096), local.subarray(MiB, MiB + 4096), "the cache is untouched");
    await c.close();
  } finally {
    await s.server.close();
    await img.close();
  }
});

run();
