// Extended headers as the spec lays them out, written independently of src/protocol (Buffer's
// BigInt accessors, not the codec under test): 32-byte requests for the server tests, 32-byte
// reply chunks for fake servers in the client tests, and a parser of what the server sent.
import { Buffer } from "node:buffer";

export const EXT_REQUEST_MAGIC = 0x21e41c71;
export const EXT_REPLY_MAGIC = 0x6e8a278c;
export const OPT_EXTENDED_HEADERS = 11;
export const REP_ERR_EXT_HEADER_REQD = 0x8000000a;
export const FLAG_BLOCK_STATUS_PAYLOAD = 1 << 12;
export const CMD_FLAG_PAYLOAD_LEN = 1 << 5;
export const REPLY_TYPE_BLOCK_STATUS_EXT = 6;

type Int = number | bigint;

/**
 * One extended request: magic, flags, type, cookie, offset, 64-bit length, then the payload. With
 * a payload the flags get PAYLOAD_LEN and the length is the payload's, unless told otherwise.
 */
export function extRequest(
  type: number,
  o: { flags?: number; cookie?: Int; offset?: Int; length?: Int; payload?: Uint8Array; noPayloadFlag?: boolean } = {},
): Buffer {
  const payload = o.payload ?? new Uint8Array(0);
  const b = Buffer.alloc(32 + payload.length);
  const flagged = o.payload !== undefined && !o.noPayloadFlag;
  b.writeUInt32BE(EXT_REQUEST_MAGIC, 0);
  b.writeUInt16BE((o.flags ?? 0) | (flagged ? CMD_FLAG_PAYLOAD_LEN : 0), 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(BigInt(o.cookie ?? 1), 8);
  b.writeBigUInt64BE(BigInt(o.offset ?? 0), 16);
  b.writeBigUInt64BE(BigInt(o.length ?? payload.length), 24);
  b.set(payload, 32);
  return b;
}

/** A BLOCK_STATUS payload: u64 effect length, then the context ids. */
export function statusPayload(length: Int, ids: number[]): Buffer {
  const b = Buffer.alloc(8 + 4 * ids.length);
  b.writeBigUInt64BE(BigInt(length), 0);
  ids.forEach((id, i) => b.writeUInt32BE(id, 8 + 4 * i));
  return b;
}

/** One extended reply chunk as a server sends it. */
export function extReply(cookie: Int, flags: number, type: number, offset: Int, payload: Uint8Array = new Uint8Array(0), length?: Int): Buffer {
  const b = Buffer.alloc(32 + payload.length);
  b.writeUInt32BE(EXT_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(BigInt(cookie), 8);
  b.writeBigUInt64BE(BigInt(offset), 16);
  b.writeBigUInt64BE(BigInt(length ?? payload.length), 24);
  b.set(payload, 32);
  return b;
}

/** A BLOCK_STATUS_EXT payload: context id, count, then (u64 length, u64 status) per extent. */
export function statusExtPayload(id: number, extents: [Int, Int][], count = extents.length): Buffer {
  const b = Buffer.alloc(8 + 16 * extents.length);
  b.writeUInt32BE(id, 0);
  b.writeUInt32BE(count, 4);
  extents.forEach(([len, st], i) => {
    b.writeBigUInt64BE(BigInt(len), 8 + 16 * i);
    b.writeBigUInt64BE(BigInt(st), 16 + 16 * i);
  });
  return b;
}

export type ExtMsg =
  | { kind: "greeting" }
  | { kind: "optreply"; option: number; type: number; data: Buffer }
  | { kind: "ext"; flags: number; type: number; cookie: bigint; offset: bigint; length: bigint; data: Buffer };

/**
 * What a server sent to a client that agreed to extended headers: the greeting, option replies,
 * then nothing but 32-byte reply chunks (a simple or structured reply throws: it is forbidden).
 */
export function parseExtServer(bytes: Uint8Array): ExtMsg[] {
  const b = Buffer.from(bytes);
  const out: ExtMsg[] = [];
  let p = 0;
  if (b.length >= 18 && b.toString("latin1", 0, 8) === "NBDMAGIC") {
    out.push({ kind: "greeting" });
    p = 18;
  }
  while (p < b.length) {
    if (b.length - p >= 20 && b.readBigUInt64BE(p) === 0x3e889045565a9n) {
      const len = b.readUInt32BE(p + 16);
      out.push({ kind: "optreply", option: b.readUInt32BE(p + 8), type: b.readUInt32BE(p + 12), data: b.subarray(p + 20, p + 20 + len) });
      p += 20 + len;
      continue;
    }
    const magic = b.readUInt32BE(p);
    if (magic !== EXT_REPLY_MAGIC) throw new Error(`not an extended reply at byte ${p}: magic 0x${magic.toString(16)}`);
    const length = b.readBigUInt64BE(p + 24);
    const n = Number(length);
    out.push({
      kind: "ext", flags: b.readUInt16BE(p + 4), type: b.readUInt16BE(p + 6), cookie: b.readBigUInt64BE(p + 8),
      offset: b.readBigUInt64BE(p + 16), length, data: b.subarray(p + 32, p + 32 + n),
    });
    p += 32 + n;
  }
  return out;
}

export const extChunks = (msgs: ExtMsg[]) => msgs.filter((m) => m.kind === "ext") as Extract<ExtMsg, { kind: "ext" }>[];
export const optReplies = (msgs: ExtMsg[]) => msgs.filter((m) => m.kind === "optreply") as Extract<ExtMsg, { kind: "optreply" }>[];

/** The errno of an error chunk (0 for any other chunk). */
export function extErrno(c: Extract<ExtMsg, { kind: "ext" }> | undefined): number {
  return c && c.type & 0x8000 ? c.data.readUInt32BE(0) : 0;
}
