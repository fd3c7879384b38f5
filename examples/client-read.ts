// Runnable example of the client library: connect to an export, print what the server says about
// it, read its first sector, list its allocation, write and read back (if writable), close.
//
//   bun examples/client-read.ts nbd://127.0.0.1:10809/disk
//   bun examples/client-read.ts "nbd+unix:///disk?socket=/tmp/nbd.sock" --write
//
// Runs under Node 20+ too, once bundled: `bun build examples/client-read.ts --target=node --outfile=x.mjs && node x.mjs URI`.
import { connect, NBD_STATE_HOLE, NBD_STATE_ZERO, NbdRequestError } from "../src/client/index.ts";

const uri = process.argv[2];
if (!uri) {
  console.error("usage: client-read.ts URI [--write]");
  process.exit(2);
}
const nbd = await connect(uri);
try {
  const i = nbd.info;
  console.log(`export "${i.name}": ${nbd.size} bytes${i.readOnly ? ", read-only" : ""}${i.description ? ` (${i.description})` : ""}`);
  console.log(`block sizes: minimum ${nbd.limits.minimum}, preferred ${nbd.limits.preferred}, max payload ${nbd.limits.maxPayload}`);
  const first = await nbd.read(0, Math.min(512, nbd.size));
  console.log(`first sector: ${Buffer.from(first.subarray(0, 16)).toString("hex")}...`);
  if (nbd.metaContexts.has("base:allocation")) {
    for (const e of await nbd.extents()) {
      const kind = e.flags & NBD_STATE_HOLE ? "hole" : e.flags & NBD_STATE_ZERO ? "zero" : "data";
      console.log(`  ${String(e.offset).padStart(12)} +${e.length} ${kind}`);
    }
  }
  if (process.argv.includes("--write") && !i.readOnly) {
    const at = nbd.size - 4096 - ((nbd.size - 4096) % nbd.limits.minimum);
    const data = new TextEncoder().encode("written by examples/client-read.ts".padEnd(4096, "."));
    await nbd.pwrite(data, at, { fua: i.canFua });
    const back = await nbd.read(at, 4096);
    console.log(`wrote and read back 4096 bytes at ${at}: ${Buffer.compare(Buffer.from(back), Buffer.from(data)) === 0 ? "same" : "DIFFERENT"}`);
  }
} catch (e) {
  if (e instanceof NbdRequestError) console.error(`the server failed ${e.command}: ${e.code}`);
  throw e;
} finally {
  await nbd.close();
}
