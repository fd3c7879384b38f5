// libnbd (strict mode off, so it sends what we ask) against the real server over TCP: block sizes
// bind only a client that asked for them in GO (libnbd does by default), and nothing else; and a
// DF read without structured replies is EINVAL. Every refusal leaves the connection usable.
import * as assert from "uvu/assert";
import { deadline } from "./helpers/assert.ts";
import { need, scratch } from "./helpers/env.ts";
import { serve, type Served } from "./helpers/server.ts";
import { MiB, guardedSuite, join, nbdpy, sparseFile } from "./interop-lib.ts";

const dir = scratch("bun-nbd-conformance-");
let srv: Served;
let uri = "";

const { test, after, run } = guardedSuite("interop-conformance", async () => {
  need("nbdsh");
  const img = sparseFile(join(dir, "disk.img"), 128 * MiB);
  srv = await serve(["-p", "0", img]);
  uri = `nbd://127.0.0.1:${srv.port}/disk`;
});
after(async () => { await srv?.stop(); });

// Writes `n` bytes of 0xee at `off`, then reads 16 bytes there: [write errno or 'ok', first bytes].
const writeThenPeek = (n: string, off = "0") => `
out['write'] = err(lambda: h.pwrite(b'\\xee' * (${n}), ${off}))
out['peek'] = list(h.pread(4, ${off}))
`;

test("libnbd asked for block sizes: 32 MiB + 4 KiB WRITE and READ get EINVAL, nothing is written, the connection goes on", () => deadline(60_000, "agreed", async () => {
  const o = await nbdpy(uri, `
out['max'] = h.get_block_size(nbd.SIZE_MAXIMUM)
${writeThenPeek("32 * 1024 * 1024 + 4096", "1024 * 1024")}
out['read'] = err(lambda: h.pread(32 * 1024 * 1024 + 4096, 0))
out['at_max'] = err(lambda: h.pwrite(b'\\x01' * (32 * 1024 * 1024), 0))
out['flush'] = err(lambda: h.flush())
`);
  assert.equal(o, { max: 32 * MiB, write: "EINVAL", peek: [0, 0, 0, 0], read: "EINVAL", at_max: "ok", flush: "ok" });
}));

test("libnbd not asking (GO without NBD_INFO_BLOCK_SIZE), and EXPORT_NAME: 48 MiB writes are fine", () => deadline(60_000, "legacy", async () => {
  const go = await nbdpy(uri, `
h.set_request_block_size(False)
h.connect_uri(uri)
${writeThenPeek("48 * 1024 * 1024", "2 * 1024 * 1024")}
`, { connect: false });
  assert.equal(go, { write: "ok", peek: [0xee, 0xee, 0xee, 0xee] });
  const exportName = await nbdpy(uri, `
h.set_handshake_flags(0)  # no fixed newstyle: libnbd can only use NBD_OPT_EXPORT_NAME
h.connect_uri(uri)
out['go'] = h.get_protocol()
${writeThenPeek("48 * 1024 * 1024", "3 * 1024 * 1024")}
`, { connect: false });
  assert.equal(exportName, { go: "newstyle", write: "ok", peek: [0xee, 0xee, 0xee, 0xee] });
}));

test("a DF read without structured replies: EINVAL, and the next read works", () => deadline(30_000, "df", async () => {
  const o = await nbdpy(uri, `
h.set_request_structured_replies(False)
h.connect_uri(uri)
out['sr'] = bool(h.get_structured_replies_negotiated())
out['df'] = err(lambda: h.pread(4096, 0, flags=nbd.CMD_FLAG_DF))
out['plain'] = err(lambda: h.pread(4096, 0))
`, { connect: false });
  assert.equal(o, { sr: false, df: "EINVAL", plain: "ok" });
}));

run();
