// The fast paths of socket-transport.ts stay off under TLS: after STARTTLS the raw socket carries
// TLS records, so recv(2) on its descriptor (the direct reader, payloads received in place) would
// take records away from the TLS layer, and sendfile(2) would send file bytes unencrypted. Large
// pipelined WRITEs (payloads spanning many chunks) and READs over X.509 and PSK, in process, so
// the server's own counters show which paths were taken.
import * as assert from "uvu/assert";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { connect } from "../src/client/index.ts";
import { NbdServer } from "../src/server/server.ts";
import { silentLogger } from "../src/server/log.ts";
import { RawFile } from "../src/devices/file.ts";
import { MemoryDevice } from "../src/devices/memory.ts";
import { bytesEqual, deadline } from "./helpers/assert.ts";
import { need, scratch } from "./helpers/env.ts";
import { makePki, type Pki } from "./helpers/tls.ts";
import { guardedSuite } from "./interop-lib.ts";
import { pattern } from "./robustness-wire.ts";

const dir = scratch("bun-nbd-transport-tls-");
const SIZE = 16 * 1024 * 1024;
/** Larger than MAX_WRITE (what the PSK engine encrypts at once). */
const BIG = 2 * 1024 * 1024 + 4096;
const BLOCK = 1024 * 1024 + 4096; // not a multiple of any record or chunk size
let pki: Pki;
const servers: NbdServer[] = [];

const { test, after, run } = guardedSuite("server-transport-tls", async () => {
  need("openssl", "psktool");
  pki = await makePki(join(dir, "pki"));
});

after(async () => {
  for (const s of servers) await s.close(1000);
});

for (const kind of ["x509", "psk"] as const) {
  test(`${kind}: pipelined 1 MiB WRITEs and READs over TLS, no recv or sendfile on the raw socket, bytes exact`, () => deadline(60_000, kind, async () => {
    const img = join(dir, `${kind}.img`);
    writeFileSync(img, new Uint8Array(SIZE));
    const mem = new MemoryDevice(8 * BIG);
    const memData = pattern(8 * BIG, 0, 41);
    mem.pwrite(memData, 0);
    const server = new NbdServer([{ name: "disk", device: RawFile.open(img) }, { name: "mem", device: mem }], {
      log: silentLogger, tls: "require", ...(kind === "x509" ? { tlsCertificates: pki.server } : { tlsPsk: pki.psk }),
    });
    servers.push(server);
    const { port } = server.listenTcp("127.0.0.1", 0);
    const uri = kind === "x509"
      ? `nbds://localhost:${port}/disk?tls-certificates=${pki.client}`
      : `nbds://alice@localhost:${port}/disk?tls-psk-file=${pki.psk}`;
    const data = pattern(SIZE, 0, kind === "x509" ? 31 : 37);
    const before = server.transportStats();
    const c = await connect(uri);
    try {
      const writes: Promise<unknown>[] = [];
      for (let off = 0; off + BLOCK <= SIZE; off += BLOCK) writes.push(c.pwrite(data.subarray(off, off + BLOCK), off));
      await Promise.all(writes);
      await c.flush();
      const reads: Promise<void>[] = [];
      const got: { off: number; buf: Uint8Array }[] = [];
      for (let off = 0; off + BLOCK <= SIZE; off += BLOCK) {
        const buf = new Uint8Array(BLOCK);
        got.push({ off, buf });
        reads.push(c.pread(buf, off));
      }
      await Promise.all(reads);
      for (const { off, buf } of got) bytesEqual(buf, data.subarray(off, off + BLOCK), `${kind} read at ${off}`);
    } finally {
      await c.close();
    }
    // Replies larger than one encrypted write (MAX_WRITE), from memory, eight in flight.
    const m = await connect(uri.replace("/disk?", "/mem?"));
    try {
      const bufs = Array.from({ length: 8 }, () => new Uint8Array(BIG));
      await Promise.all(bufs.map((b, i) => m.pread(b, i * BIG)));
      bufs.forEach((b, i) => bytesEqual(b, memData.subarray(i * BIG, (i + 1) * BIG), `${kind}: 2 MiB read ${i}`));
    } finally {
      await m.close();
    }
    const written = Math.floor(SIZE / BLOCK) * BLOCK;
    bytesEqual(readFileSync(img).subarray(0, written), data.subarray(0, written), `${kind}: the file`);
    const after = server.transportStats();
    assert.is(after.receivedInPlace, before.receivedInPlace, "nothing read from the raw socket behind TLS");
    assert.is(after.sendfileCalls, before.sendfileCalls, "no sendfile under TLS");
    assert.ok(after.copiedFileBytes - before.copiedFileBytes >= written, "READ payloads went through the encrypting socket");
  }));
}

run();
