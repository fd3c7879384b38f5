// Micro-benchmark of the protocol codec's hot path: parsing 28-byte request headers in place
// (from one chunk holding many pipelined requests) and encoding simple and structured reply headers
// into preallocated buffers, next to the slow alternatives DESIGN.md warns about (a DataView and
// BigInt per header, a fresh Buffer per reply). Run with:
//   NO_COLOR=1 bun bench/codec.bench.ts
import { bench, do_not_optimize, group, run, summary } from "mitata";
import { encodeRequest, newRequestHeader, parseRequest, putChunkHeader, putSimpleReply } from "../src/protocol/codec.ts";
import { NBD_CMD_READ, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, NBD_SIMPLE_REPLY_MAGIC } from "../src/protocol/constants.ts";

// 1000 READ requests back to back, as a pipelining client sends them
const N = 1000;
const chunk = new Uint8Array(28 * N);
for (let i = 0; i < N; i++) encodeRequest(chunk, 28 * i, 0, NBD_CMD_READ, i >>> 8, i * 7919, i * 4096 + 2 ** 33, 4096);
const hdr = newRequestHeader();
let k = 0;

summary(() => {
  group("request header parse (28 bytes)", () => {
    bench("parseRequest into a reused header", () => {
      const p = 28 * (k++ % N);
      parseRequest(chunk, p, hdr);
      return hdr.offset + hdr.length;
    });
    bench("new DataView + getBigUint64 (for comparison)", () => {
      const p = 28 * (k++ % N);
      const dv = new DataView(chunk.buffer, chunk.byteOffset + p, 28);
      const h = { flags: dv.getUint16(4), type: dv.getUint16(6), cookie: dv.getBigUint64(8), offset: Number(dv.getBigUint64(16)), length: dv.getUint32(24) };
      return do_not_optimize(h);
    });
  });
});

const reply = new Uint8Array(16);
const chunkHdr = new Uint8Array(28);
summary(() => {
  group("reply header encode", () => {
    bench("putSimpleReply into a preallocated buffer (16 bytes)", () => {
      putSimpleReply(reply, 0, 0, k >>> 8, k++);
      return reply[15];
    });
    bench("putChunkHeader OFFSET_DATA into a preallocated buffer (20 bytes)", () => {
      putChunkHeader(chunkHdr, 0, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, k >>> 8, k++, 4104);
      return chunkHdr[19];
    });
    bench("fresh Buffer per simple reply (for comparison)", () => {
      const b = Buffer.allocUnsafe(16);
      b.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
      b.writeUInt32BE(0, 4);
      b.writeUInt32BE(k >>> 8, 8);
      b.writeUInt32BE(k++ >>> 0, 12);
      return do_not_optimize(b);
    });
  });
});

await run({ colors: !process.env.NO_COLOR });
