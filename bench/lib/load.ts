// A small NBD load generator on bun-nbd's client library, for workloads fio cannot run: fio's nbd
// engine calls nbd_connect_uri without allowing local files, so it cannot take ?tls-psk-file=.
// Sequential or random reads of BS bytes with QD requests in flight for SECONDS; prints JSON
// { iops, mbps, bytes }. Run as its own process, so its CPU is not the server's.
//
//   bun bench/lib/load.ts URI read|randread BS QD SECONDS
import { connect } from "../../src/client/index.ts";

const [uri, mode, bsText, qdText, secsText] = process.argv.slice(2);
if (!uri || (mode !== "read" && mode !== "randread")) {
  console.error("usage: bun bench/lib/load.ts URI read|randread BS QD SECONDS");
  process.exit(2);
}
const bs = Number(bsText);
const qd = Number(qdText);
const secs = Number(secsText);
const c = await connect(uri, { metaContexts: [] });
const blocks = Math.floor(c.size / bs);
let next = 0;
let x = 0x9e3779b9;
const offset = () => {
  if (mode === "read") {
    const o = next;
    next = (next + 1) % blocks;
    return o * bs;
  }
  x ^= x << 13; x ^= x >>> 17; x ^= x << 5;
  return ((x >>> 0) % blocks) * bs;
};
let ops = 0;
const t0 = performance.now();
const end = t0 + secs * 1000;
await Promise.all(Array.from({ length: qd }, async () => {
  const buf = new Uint8Array(bs);
  while (performance.now() < end) {
    await c.pread(buf, offset());
    ops++;
  }
}));
const seconds = (performance.now() - t0) / 1000;
await c.close();
console.log(JSON.stringify({ iops: ops / seconds, mbps: (ops * bs) / seconds / 1e6, bytes: ops * bs }));
