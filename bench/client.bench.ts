// Micro-benchmark of the client's reply path (receiver state machine, cookie lookup, payload copy
// into the caller's buffers, promise settlement), fed from memory through a stand-in socket so no
// server or kernel time is measured. Run with:
//   NO_COLOR=1 bun bench/client.bench.ts
// Each iteration issues a batch of requests, patches their cookies into a prebuilt reply
// transcript, delivers it in chunks of a given size, and awaits every reply.
import { bench, group, run, summary } from "mitata";
import { EventEmitter } from "node:events";
import type { Socket } from "node:net";
import {
  NBD_FLAG_HAS_FLAGS, NBD_FLAG_SEND_FLUSH, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
} from "../src/protocol/constants.ts";
import { describeExport, NbdClient } from "../src/client/index.ts";

class MemorySocket extends EventEmitter {
  out: Uint8Array[] = [];
  write(b: Uint8Array): boolean {
    this.out.push(b);
    return true;
  }
  end(): void {}
  destroy(): void {}
  setNoDelay(): void {}
}

function client(structured: boolean): { c: NbdClient; s: MemorySocket } {
  const s = new MemorySocket();
  const c = new NbdClient({
    socket: s as unknown as Socket, info: describeExport("", 1 << 30, NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH, structured),
    structured, metaContexts: new Map(), leftover: [], style: "newstyle-fixed",
  });
  return { c, s };
}

/** A transcript of `n` replies to READs of `len` bytes; returns it and where each cookie goes. */
function transcript(n: number, len: number, structured: boolean): { bytes: Buffer; cookieAt: number[] } {
  const per = structured ? 20 + 8 + len : 16 + len;
  const bytes = Buffer.alloc(n * per, 0x5a);
  const cookieAt: number[] = [];
  for (let i = 0; i < n; i++) {
    const o = i * per;
    if (structured) {
      bytes.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, o);
      bytes.writeUInt16BE(NBD_REPLY_FLAG_DONE, o + 4);
      bytes.writeUInt16BE(NBD_REPLY_TYPE_OFFSET_DATA, o + 6);
      bytes.writeUInt32BE(0, o + 8);
      bytes.writeUInt32BE(8 + len, o + 16);
      bytes.writeUInt32BE(0, o + 20);
      cookieAt.push(o + 12);
    } else {
      bytes.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, o);
      bytes.writeUInt32BE(0, o + 4);
      bytes.writeUInt32BE(0, o + 8);
      cookieAt.push(o + 12);
    }
  }
  return { bytes, cookieAt };
}

function workload(n: number, len: number, structured: boolean, chunk: number) {
  const { c, s } = client(structured);
  const { bytes, cookieAt } = transcript(n, len, structured);
  const per = structured ? 20 + 8 + len : 16 + len;
  const bufs = Array.from({ length: n }, () => new Uint8Array(len));
  const chunks: Buffer[] = [];
  for (let o = 0; o < bytes.length; o += chunk) chunks.push(bytes.subarray(o, Math.min(bytes.length, o + chunk)));
  const ps: Promise<void>[] = new Array(n);
  return async () => {
    for (let i = 0; i < n; i++) ps[i] = c.pread(bufs[i]!, 0);
    await Promise.resolve();
    const hdrs = s.out.length === 1 ? s.out[0]! : Buffer.concat(s.out);
    s.out.length = 0;
    for (let i = 0; i < n; i++) {
      // Request i's cookie (low half) into reply i; structured replies also need the offset.
      const at = cookieAt[i]!;
      bytes.set(hdrs.subarray(28 * i + 12, 28 * i + 16), at);
      if (structured) bytes.writeUInt32BE(0, at - 12 + 24);
    }
    for (const ch of chunks) s.emit("data", ch);
    await Promise.all(ps);
    void per;
  };
}

summary(() => {
  group("256 x 4 KiB READs, replies delivered in 64 KiB chunks", () => {
    bench("structured (OFFSET_DATA)", workload(256, 4096, true, 65536)).gc("inner");
    bench("simple", workload(256, 4096, false, 65536)).gc("inner");
  });
  group("256 x 4 KiB READs, structured, delivery chunk size", () => {
    bench("1448-byte chunks (MSS)", workload(256, 4096, true, 1448)).gc("inner");
    bench("one chunk", workload(256, 4096, true, 256 * (28 + 4096))).gc("inner");
  });
  group("64 x 256 KiB READs (copy-sized), structured", () => {
    bench("64 KiB chunks", workload(64, 256 * 1024, true, 65536)).gc("inner");
  });
  group("1024 zero-length-payload replies (FLUSH-like), one chunk", () => {
    const { c, s } = client(false);
    const n = 1024;
    const bytes = Buffer.alloc(16 * n);
    for (let i = 0; i < n; i++) bytes.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 16 * i);
    const ps: Promise<void>[] = new Array(n);
    bench("simple replies", async () => {
      for (let i = 0; i < n; i++) ps[i] = c.flush();
      await Promise.resolve();
      const hdrs = Buffer.concat(s.out);
      s.out.length = 0;
      for (let i = 0; i < n; i++) bytes.set(hdrs.subarray(28 * i + 12, 28 * i + 16), 16 * i + 12);
      s.emit("data", bytes);
      await Promise.all(ps);
    }).gc("inner");
  });
});

await run({ colors: !process.env.NO_COLOR });
