// Leak check for the TLS paths: thousands of sessions against an in-process server (PSK through
// the OpenSSL engine, X.509 through Bun's TLS), mixed with hostile ones (garbage instead of a
// ClientHello, a ClientHello cut short, a close right after STARTTLS's ACK, a wrong key). Every
// SSL* must be freed (the engine's live count returns to zero), every connection released, and
// memory must stay flat. TLS_LEAK_SESSIONS=N runs a longer variant (default 2000).
import { test } from "uvu";
import * as assert from "uvu/assert";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { MemoryDevice } from "../src/devices/memory.ts";
import { parsePskFile } from "../src/protocol/psk-file.ts";
import { NbdServer } from "../src/server/server.ts";
import { liveSessions } from "../src/sys/tls-engine.ts";
import { deadline } from "./helpers/assert.ts";
import { need, scratch } from "./helpers/env.ts";
import { makePki } from "./helpers/tls.ts";
import { TlsContext, TlsWire } from "./helpers/tls-wire.ts";

const SESSIONS = Number(process.env.TLS_LEAK_SESSIONS || 2000);
const PARALLEL = 16;
need("openssl", "psktool");
const dir = scratch("bun-nbd-tls-leak-");

async function waitFor(cond: () => boolean, ms: number, what: string): Promise<void> {
  const limit = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > limit) assert.unreachable(`timed out waiting for ${what}`);
    await Bun.sleep(20);
  }
}

test(`${SESSIONS} TLS sessions, a fifth of them hostile: every SSL freed, every connection released, memory flat`, () => deadline(300_000, "leak", async () => {
  const pki = await makePki(join(dir, "pki"));
  const key = parsePskFile(readFileSync(pki.psk, "utf8"), pki.psk).get("alice")!;
  const spec = () => [{ name: "disk", device: new MemoryDevice(1024 * 1024) }];
  const psk = new NbdServer(spec(), { tls: "require", tlsPsk: pki.psk });
  const x509 = new NbdServer(spec(), { tls: "require", tlsCertificates: pki.server });
  const ports = [psk.listenTcp("127.0.0.1", 0).port, x509.listenTcp("127.0.0.1", 0).port];
  const alice = new TlsContext({ role: "client", pskIdentity: "alice", pskKey: key });
  const wrong = new TlsContext({ role: "client", pskIdentity: "alice", pskKey: new Uint8Array(32).fill(1) });
  const trust = new TlsContext({ role: "client", caFile: join(pki.client, "ca-cert.pem"), verifyPeer: true });

  let ok = 0;
  let refused = 0;
  async function one(i: number): Promise<void> {
    const usePsk = i % 2 === 0;
    const w = await TlsWire.open({ port: ports[usePsk ? 0 : 1]! });
    try {
      await w.hello();
      const kind = i % 10;
      if (kind === 1) {
        w.sendOption(5);
        await w.optionReply();
        w.write(Buffer.from("garbage that is not a ClientHello\r\n\r\n"));
        await w.closedWithin(5000);
        refused++;
      } else if (kind === 3) {
        w.sendOption(5);
        await w.optionReply();
        const t = (usePsk ? alice : trust).session("localhost");
        t.handshake();
        const hello = t.takeOutput()!;
        t.free();
        w.write(hello.subarray(0, hello.length >> 1)); // cut short, then gone
        w.destroy();
        refused++;
      } else if (kind === 5) {
        w.sendOption(5);
        await w.optionReply();
        w.destroy(); // gone right after the ACK
        refused++;
      } else if (kind === 7 && usePsk) {
        const r = await w.startTls(wrong).then(() => "ok", () => "refused");
        assert.is(r, "refused", "a wrong key is refused");
        refused++;
      } else {
        await w.startTls(usePsk ? alice : trust);
        w.sendOption(2); // ABORT
        await w.optionReply();
        ok++;
      }
    } finally {
      w.destroy();
    }
  }

  async function batch(from: number, to: number): Promise<void> {
    let next = from;
    await Promise.all(Array.from({ length: PARALLEL }, async () => {
      while (next < to) await one(next++);
    }));
  }

  const warm = Math.min(400, SESSIONS >> 2);
  await batch(0, warm);
  await waitFor(() => psk.connections === 0 && x509.connections === 0, 10_000, "the warm-up connections to close");
  Bun.gc(true);
  const before = process.memoryUsage().rss;
  await batch(warm, SESSIONS);
  await waitFor(() => psk.connections === 0 && x509.connections === 0, 20_000, "every connection to close");
  await waitFor(() => liveSessions() === 0, 10_000, `every SSL to be freed (${liveSessions()} left)`);
  Bun.gc(true);
  const grown = (process.memoryUsage().rss - before) / 1024 / 1024;
  assert.ok(ok > SESSIONS / 2 && refused > SESSIONS / 10, `${ok} sessions completed, ${refused} refused`);
  assert.ok(grown < 48, `RSS grew by ${grown.toFixed(1)} MiB over ${SESSIONS - warm} sessions`);
  console.log(`  ${SESSIONS} sessions (${ok} complete, ${refused} hostile): RSS ${grown >= 0 ? "+" : ""}${grown.toFixed(1)} MiB after the warm-up, 0 SSL objects left`);
  await psk.close(1000);
  await x509.close(1000);
  for (const c of [alice, wrong, trust]) c.free();
}));

test.run();
