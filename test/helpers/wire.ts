// In-process wire harness for session tests: a fake Transport that records what the server
// sends, builders for client messages, and a parser for server replies.
import {
  IHAVEOPT_HI, IHAVEOPT_LO, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC, OPT_REPLY_MAGIC_HI, OPT_REPLY_MAGIC_LO,
} from "../../src/protocol/constants.ts";
import { encodeRequest, getU16, getU32, getU64, putU32 } from "../../src/protocol/codec.ts";
import { NbdServer } from "../../src/server/server.ts";
import { Session } from "../../src/server/session.ts";
import type { Transport } from "../../src/server/types.ts";
import { silentLogger } from "../../src/server/log.ts";
import type { ExportSpec } from "../../src/devices/types.ts";

export class FakeTransport implements Transport {
  out: number[] = [];
  ended = false;
  destroyed = false;
  paused = false;
  send(b: Uint8Array): void { for (const x of b) this.out.push(x); }
  sendTransient(b: Uint8Array): void { this.send(b); }
  queued(): number { return 0; }
  pause(): void { this.paused = true; }
  resume(): void { this.paused = false; }
  end(): void { this.ended = true; }
  destroy(): void { this.destroyed = true; }
  bytes(): Uint8Array { return Uint8Array.from(this.out); }
}

/** A session over a fake transport, with the exports of an NbdServer (not listening). */
export function fakeSession(specs: ExportSpec[], opts: { readOnly?: boolean } = {}) {
  const server = new NbdServer(specs, { readOnly: opts.readOnly, log: silentLogger });
  const t = new FakeTransport();
  const s = new Session(t, server, silentLogger, "test");
  return { server, t, s };
}

export function cat(...parts: Uint8Array[]): Uint8Array {
  const n = parts.reduce((a, p) => a + p.length, 0);
  const b = new Uint8Array(n);
  let o = 0;
  for (const p of parts) { b.set(p, o); o += p.length; }
  return b;
}

export function clientFlags(flags = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES): Uint8Array {
  const b = new Uint8Array(4);
  putU32(b, 0, flags);
  return b;
}

export function option(opt: number, data: Uint8Array = new Uint8Array(0), lengthOverride?: number): Uint8Array {
  const b = new Uint8Array(16 + data.length);
  putU32(b, 0, IHAVEOPT_HI); putU32(b, 4, IHAVEOPT_LO); putU32(b, 8, opt);
  putU32(b, 12, lengthOverride ?? data.length);
  b.set(data, 16);
  return b;
}

export function request(type: number, opts: { flags?: number; cookie?: number; offset?: number; length?: number; payload?: Uint8Array } = {}): Uint8Array {
  const payload = opts.payload ?? new Uint8Array(0);
  const b = new Uint8Array(28 + payload.length);
  encodeRequest(b, 0, opts.flags ?? 0, type, 0, opts.cookie ?? 1, opts.offset ?? 0, opts.length ?? payload.length);
  b.set(payload, 28);
  return b;
}

export type Msg =
  | { kind: "greeting"; flags: number }
  | { kind: "optreply"; option: number; type: number; data: Uint8Array }
  | { kind: "simple"; error: number; cookie: number; data?: Uint8Array }
  | { kind: "chunk"; flags: number; type: number; cookie: number; data: Uint8Array }
  | { kind: "exportname"; size: number; flags: number };

/**
 * Parse server output. `readLengths` maps a cookie to the data length of a simple READ reply
 * (simple replies carry no length). After an EXPORT_NAME, pass `exportNameReply: true`.
 */
export function parseServer(b: Uint8Array, opts: { readLengths?: Map<number, number>; exportNameReply?: boolean } = {}): Msg[] {
  const msgs: Msg[] = [];
  let p = 0;
  if (b.length >= 18 && getU32(b, 0) === 0x4e42444d) {
    msgs.push({ kind: "greeting", flags: getU16(b, 16) });
    p = 18;
  }
  let expectExportName = opts.exportNameReply ?? false;
  while (p < b.length) {
    const m = getU32(b, p);
    if (m === OPT_REPLY_MAGIC_HI && getU32(b, p + 4) === OPT_REPLY_MAGIC_LO) {
      const len = getU32(b, p + 16);
      msgs.push({ kind: "optreply", option: getU32(b, p + 8), type: getU32(b, p + 12), data: b.slice(p + 20, p + 20 + len) });
      p += 20 + len;
    } else if (m === NBD_SIMPLE_REPLY_MAGIC) {
      const cookie = getU32(b, p + 12);
      const error = getU32(b, p + 4);
      const dl = error === 0 ? opts.readLengths?.get(cookie) ?? 0 : 0;
      msgs.push({ kind: "simple", error, cookie, data: dl ? b.slice(p + 16, p + 16 + dl) : undefined });
      p += 16 + dl;
    } else if (m === NBD_STRUCTURED_REPLY_MAGIC) {
      const len = getU32(b, p + 16);
      msgs.push({ kind: "chunk", flags: getU16(b, p + 4), type: getU16(b, p + 6), cookie: getU32(b, p + 12), data: b.slice(p + 20, p + 20 + len) });
      p += 20 + len;
    } else if (expectExportName) {
      msgs.push({ kind: "exportname", size: getU64(b, p), flags: getU16(b, p + 8) });
      p += 10;
      expectExportName = false;
    } else {
      throw new Error(`unparseable server output at byte ${p}: ${Buffer.from(b.subarray(p, p + 16)).toString("hex")}`);
    }
  }
  return msgs;
}

/** Option data for INFO/GO. */
export { encodeInfoRequest, encodeMetaContextRequest } from "../../src/protocol/codec.ts";

/** A simple reply as a server sends it (what the client tests feed their fake peers). */
export function simpleReply(cookie: number, error: number, data?: Uint8Array): Buffer {
  const b = Buffer.alloc(16 + (data?.length ?? 0));
  b.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  b.writeUInt32BE(cookie, 12);
  if (data) b.set(data, 16);
  return b;
}

/** One structured reply chunk as a server sends it. */
export function replyChunk(cookie: number, flags: number, type: number, payload: Uint8Array = new Uint8Array(0)): Buffer {
  const b = Buffer.alloc(20 + payload.length);
  b.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeUInt32BE(cookie, 12);
  b.writeUInt32BE(payload.length, 16);
  b.set(payload, 20);
  return b;
}
