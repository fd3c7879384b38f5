// Micro-benchmark of the server's transmission hot path in process: the request receiver, dispatch
// and the reply writer, fed 1000 pipelined requests per chunk through a transport that keeps
// nothing, over a device that does no work (so only the session's own cost is measured). Compact
// headers with simple and with structured replies; with `--extended`, the 32-byte extended
// headers too (when the server speaks them). Run with:
//   NO_COLOR=1 bun bench/session.bench.ts [--extended]
import { bench, group, run, summary } from "mitata";
import {
  NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_WRITE, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_INFO_BLOCK_SIZE,
  NBD_OPT_GO, NBD_OPT_STRUCTURED_REPLY,
} from "../src/protocol/constants.ts";
import { encodeInfoRequest, encodeOptionHeader, encodeRequest, putU32 } from "../src/protocol/codec.ts";
import { caps, type BlockDevice } from "../src/devices/types.ts";
import { NbdServer } from "../src/server/server.ts";
import { Session } from "../src/server/session.ts";
import type { Transport } from "../src/server/types.ts";
import { silentLogger } from "../src/server/log.ts";

/** Counts what it is given and keeps nothing. */
class NullTransport implements Transport {
  bytes = 0;
  send(b: Uint8Array): void { this.bytes += b.length; }
  sendTransient(b: Uint8Array): void { this.bytes += b.length; }
  queued(): number { return 0; }
  pause(): void {}
  resume(): void {}
  end(): void {}
  destroy(): void {}
}

/** A device that answers at once and touches no bytes. */
const nullDevice: BlockDevice = {
  size: () => 1 << 30,
  capabilities: () => caps({ canWrite: true, canFlush: true, canFua: true }),
  pread: () => {},
  pwrite: () => {},
  flush: () => {},
};

const N = 1000;
const LEN = 512;
const server = new NbdServer([{ name: "", device: nullDevice }], { log: silentLogger });

function optionBytes(opt: number, data: Uint8Array = new Uint8Array(0)): Uint8Array {
  return encodeOptionHeader(opt, data);
}

/** A session past GO: compact (simple or structured) or, if asked, extended headers (option 11). */
function session(mode: "simple" | "structured" | "extended"): Session {
  const t = new NullTransport();
  const s = new Session(t, server, silentLogger, "bench");
  const flags = new Uint8Array(4);
  putU32(flags, 0, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
  s.onData(flags);
  if (mode === "structured") s.onData(optionBytes(NBD_OPT_STRUCTURED_REPLY));
  if (mode === "extended") s.onData(optionBytes(11));
  s.onData(optionBytes(NBD_OPT_GO, encodeInfoRequest("", [NBD_INFO_BLOCK_SIZE])));
  return s;
}

/** 1000 requests of one type back to back, as one chunk (WRITEs carry their payload). */
function batch(type: number, extended: boolean): Uint8Array {
  const hdr = extended ? 32 : 28;
  const per = hdr + (type === NBD_CMD_WRITE ? LEN : 0);
  const b = new Uint8Array(per * N);
  for (let i = 0; i < N; i++) {
    const p = per * i;
    const len = type === NBD_CMD_FLUSH ? 0 : LEN;
    if (extended) {
      // magic, flags (PAYLOAD_LEN on WRITE), type, cookie, offset, 64-bit length
      putU32(b, p, 0x21e41c71);
      b[p + 4] = 0; b[p + 5] = type === NBD_CMD_WRITE ? 1 << 5 : 0;
      b[p + 6] = 0; b[p + 7] = type;
      putU32(b, p + 12, i);
      putU32(b, p + 16, 0); putU32(b, p + 20, i * LEN);
      putU32(b, p + 24, 0); putU32(b, p + 28, len);
    } else {
      encodeRequest(b, p, 0, type, 0, i, type === NBD_CMD_FLUSH ? 0 : i * LEN, len);
    }
  }
  return b;
}

const extended = process.argv.includes("--extended");
const modes = (extended ? ["simple", "structured", "extended"] : ["simple", "structured"]) as ("simple" | "structured" | "extended")[];

for (const [name, type] of [["READ 512 B", NBD_CMD_READ], ["WRITE 512 B", NBD_CMD_WRITE], ["FLUSH", NBD_CMD_FLUSH]] as const) {
  summary(() => {
    group(`${name} x ${N} in one chunk`, () => {
      for (const mode of modes) {
        const s = session(mode);
        const input = batch(type, mode === "extended");
        bench(`${mode}`, () => s.onData(input)).gc("inner");
      }
    });
  });
}

await run({ colors: !process.env.NO_COLOR });
