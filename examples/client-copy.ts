// Runnable example: copy an NBD export to a local file (sparse) and print its SHA-256, using the
// library's copy engine directly (what `bun-nbd copy --sha256 URI FILE` does).
//
//   bun examples/client-copy.ts nbd://127.0.0.1:10809/disk /tmp/disk-copy.img
import { connect, copy, FileDestination, NbdEndpoint } from "../src/client/index.ts";

const [uri, out] = process.argv.slice(2);
if (!uri || !out) {
  console.error("usage: client-copy.ts URI FILE");
  process.exit(2);
}
const first = await connect(uri);
// Several connections only when the server promises they see each other's writes (multi-conn).
const clients = [first];
if (first.info.canMultiConn) clients.push(await connect(uri), await connect(uri));
const src = new NbdEndpoint(clients);
const dst = new FileDestination(out);
try {
  const r = await copy(src, dst, { sha256: true, workers: 8 * clients.length });
  console.log(`${r.size} bytes: ${r.dataBytes} data, ${r.zeroBytes} zero (left as holes)`);
  console.log(`${r.sha256}  ${uri}`);
} finally {
  dst.close();
  await src.close();
}
