// The client's side of the handshake codec (cold path): what it sends (option requests, encoded
// by src/protocol/codec.ts once names are checked) and the decoding of what comes back (greeting,
// option reply headers, NBD_REP_SERVER, NBD_REP_INFO, NBD_REP_META_CONTEXT, the EXPORT_NAME reply).
// Pure: no I/O. A malformed reply throws NbdProtocolViolation; the caller ends the negotiation.
import {
  IHAVEOPT_HI, IHAVEOPT_LO, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES, NBD_INFO_BLOCK_SIZE, NBD_INFO_DESCRIPTION, NBD_INFO_EXPORT, NBD_INFO_NAME, NBD_MAX_STRING,
  NBDMAGIC_HI, NBDMAGIC_LO, OPT_REPLY_MAGIC_HI, OPT_REPLY_MAGIC_LO, optionName,
} from "../protocol/constants.ts";
import { encodeInfoRequest, encodeMetaContextRequest, encodeOptionHeader, encodeString, putU32 } from "../protocol/codec.ts";
import { NbdProtocolViolation, NbdUsageError } from "./errors.ts";
import { describeExport, type BlockSizeInfo, type ExportInfo, type ExportListing } from "./negotiated.ts";
import { u16, u32, u64 } from "./wire.ts";

// The oldstyle cliserv_magic 0x0000420281861253, split into 32-bit halves.
const CLISERV_MAGIC_HI = 0x00004202;
const CLISERV_MAGIC_LO = 0x81861253;

/** Bytes of the oldstyle export header that follows the greeting (size, flags, zeroes). */
export const OLDSTYLE_HEADER = 8 + 4 + 124;
/** Bytes of an option reply header. */
export const OPTION_REPLY_HEADER = 20;
/** What INFO and GO ask for. */
const INFO_WANTED = [NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE];

// ---- requests ---------------------------------------------------------------------------------

/** The UTF-8 bytes of a name or query; refused before sending when the protocol cannot carry it. */
export function nbdString(s: string, what: string): Uint8Array {
  const b = encodeString(s);
  if (b.length > NBD_MAX_STRING) throw new NbdUsageError("BAD_ARGUMENT", `${what} is longer than ${NBD_MAX_STRING} bytes`);
  return b;
}

/** One option as sent: IHAVEOPT, option, length, data. */
export function optionRequest(option: number, data: Uint8Array = new Uint8Array(0)): Uint8Array {
  return encodeOptionHeader(option, data);
}

/** INFO/GO data for `name`, asking for its canonical name, description and block sizes. */
export function infoRequest(name: string): Uint8Array {
  nbdString(name, "export name");
  return encodeInfoRequest(name, INFO_WANTED);
}

/** LIST/SET_META_CONTEXT data. */
export function metaRequest(name: string, queries: readonly string[]): Uint8Array {
  nbdString(name, "export name");
  for (const q of queries) nbdString(q, "meta context");
  return encodeMetaContextRequest(name, [...queries]);
}

/** The client flags answering the server's handshake flags: both bits it understands, echoed. */
export function clientFlags(handshakeFlags: number): { bytes: Uint8Array; fixed: boolean; noZeroes: boolean } {
  const fixed = (handshakeFlags & NBD_FLAG_FIXED_NEWSTYLE) !== 0;
  const noZeroes = (handshakeFlags & NBD_FLAG_NO_ZEROES) !== 0;
  const bytes = new Uint8Array(4);
  putU32(bytes, 0, (fixed ? NBD_FLAG_C_FIXED_NEWSTYLE : 0) | (noZeroes ? NBD_FLAG_C_NO_ZEROES : 0));
  return { bytes, fixed, noZeroes };
}

// ---- replies ----------------------------------------------------------------------------------

/** The first 16 bytes from the server: which handshake follows. */
export function greetingKind(g: Uint8Array): "newstyle" | "oldstyle" {
  if (u32(g, 0) !== NBDMAGIC_HI || u32(g, 4) !== NBDMAGIC_LO) {
    throw new NbdProtocolViolation("BAD_GREETING", "the server did not greet with NBDMAGIC: not an NBD server?");
  }
  if (u32(g, 8) === IHAVEOPT_HI && u32(g, 12) === IHAVEOPT_LO) return "newstyle";
  if (u32(g, 8) === CLISERV_MAGIC_HI && u32(g, 12) === CLISERV_MAGIC_LO) return "oldstyle";
  throw new NbdProtocolViolation("BAD_GREETING", "unknown handshake magic after NBDMAGIC");
}

/** The oldstyle export header: the one export of an oldstyle server. */
export function oldstyleExport(b: Uint8Array): ExportInfo {
  const size = u64(b, 0);
  if (!Number.isFinite(size)) throw new NbdProtocolViolation("SIZE_TOO_LARGE", "export size is 2^53 or more");
  return describeExport("", size, u32(b, 8) & 0xffff, false);
}

/** An option reply header: checks its magic and that it answers `option`; returns type and data length. */
export function optionReplyHeader(h: Uint8Array, option: number): { type: number; len: number } {
  if (u32(h, 0) !== OPT_REPLY_MAGIC_HI || u32(h, 4) !== OPT_REPLY_MAGIC_LO) {
    throw new NbdProtocolViolation("BAD_OPTION_REPLY_MAGIC", `bad option reply magic in the reply to ${optionName(option)}`);
  }
  if (u32(h, 8) !== option) {
    throw new NbdProtocolViolation("OPTION_MISMATCH", `the server answered option ${optionName(u32(h, 8))} while we asked ${optionName(option)}`);
  }
  const type = u32(h, 12);
  const len = u32(h, 16);
  if (len > 16 * 1024 * 1024) {
    throw new NbdProtocolViolation("OPTION_REPLY_TOO_LARGE", `option reply of ${len} bytes to ${optionName(option)}`);
  }
  return { type, len };
}

/** One NBD_REP_SERVER reply to LIST. */
export function serverReply(data: Buffer): ExportListing {
  const n = data.length >= 4 ? u32(data, 0) : -1;
  if (n < 0 || n > data.length - 4) throw new NbdProtocolViolation("BAD_OPTION_REPLY", "malformed NBD_REP_SERVER reply");
  return { name: data.toString("utf8", 4, 4 + n), description: data.toString("utf8", 4 + n) };
}

/** One NBD_REP_META_CONTEXT reply: [context name, id]. */
export function metaContextReply(data: Buffer, option: number): [string, number] {
  if (data.length < 5) throw malformed(option);
  return [data.toString("utf8", 4), u32(data, 0)];
}

/** The EXPORT_NAME reply (size and flags, then padding unless NO_ZEROES). */
export function exportNameReply(b: Uint8Array, name: string, structured: boolean): ExportInfo {
  const size = u64(b, 0);
  if (!Number.isFinite(size)) throw new NbdProtocolViolation("SIZE_TOO_LARGE", `export "${name}" is 2^53 bytes or larger`);
  return describeExport(name, size, u16(b, 8), structured);
}

/** What the NBD_REP_INFO replies to one INFO or GO said, gathered until NBD_REP_ACK. */
export class InfoReplies {
  private info: ExportInfo | null = null;
  private canonicalName: string | undefined;
  private description: string | undefined;
  private blockSize: BlockSizeInfo | undefined;

  constructor(private readonly option: number, private readonly name: string, private readonly structured: boolean) {}

  /** Takes one NBD_REP_INFO payload; information types it does not know are ignored. */
  add(data: Buffer): void {
    if (data.length < 2) throw malformed(this.option);
    const it = u16(data, 0);
    if (it === NBD_INFO_EXPORT) {
      if (data.length !== 12) throw malformed(this.option);
      const size = u64(data, 2);
      if (!Number.isFinite(size)) throw new NbdProtocolViolation("SIZE_TOO_LARGE", `export "${this.name}" is 2^53 bytes or larger`);
      this.info = describeExport(this.name, size, u16(data, 10), this.structured);
    } else if (it === NBD_INFO_NAME) {
      this.canonicalName = data.toString("utf8", 2);
    } else if (it === NBD_INFO_DESCRIPTION) {
      this.description = data.toString("utf8", 2);
    } else if (it === NBD_INFO_BLOCK_SIZE) {
      if (data.length !== 14) throw malformed(this.option);
      const bs = { minimum: u32(data, 2), preferred: u32(data, 6), maximum: u32(data, 10) };
      const { minimum: mn, preferred: pf, maximum: mx } = bs;
      if (mn < 1 || mn > 65536 || (mn & (mn - 1)) !== 0 || pf < mn || (pf & (pf - 1)) !== 0 || mx < pf) {
        throw new NbdProtocolViolation("BAD_BLOCK_SIZE", `impossible block sizes ${mn}/${pf}/${mx}`);
      }
      this.blockSize = bs;
    }
  }

  /** The export, at NBD_REP_ACK. */
  finish(): ExportInfo {
    const info = this.info;
    if (!info) {
      throw new NbdProtocolViolation("MISSING_INFO_EXPORT", `the server acknowledged ${optionName(this.option)} without NBD_INFO_EXPORT`);
    }
    if (this.canonicalName !== undefined) info.canonicalName = this.canonicalName;
    if (this.description !== undefined) info.description = this.description;
    if (this.blockSize) info.blockSize = this.blockSize;
    return info;
  }
}

function malformed(option: number): NbdProtocolViolation {
  return new NbdProtocolViolation("BAD_OPTION_REPLY", `malformed NBD_REP_INFO in the reply to ${optionName(option)}`);
}
