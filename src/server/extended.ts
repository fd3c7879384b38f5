// Extended headers (NBD_OPT_EXTENDED_HEADERS): 32-byte requests with 64-bit lengths, where
// NBD_CMD_FLAG_PAYLOAD_LEN alone says whether a payload follows, and 32-byte reply chunks that
// echo the request's offset, with BLOCK_STATUS_EXT for block status. Subclasses of the compact
// receiver and reply writer, so compact sessions run exactly the code they ran before.
import {
  HARD_MAX_PAYLOAD, NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_PAYLOAD_LEN, NBD_CMD_WRITE, NBD_EINVAL, NBD_EXTENDED_REPLY_SIZE,
  NBD_EXTENDED_REQUEST_SIZE, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS_EXT, commandName,
} from "../protocol/constants.ts";
import { parseExtendedRequest, parseStatusPayload, putExtendedReply, putU32, putU64 } from "../protocol/codec.ts";
import { NbdError } from "../protocol/errors.ts";
import type { ExtentList } from "../devices/checked.ts";
import type { Logger } from "./log.ts";
import { ReplyWriter } from "./replies.ts";
import { EMPTY, HEADER_BAD, Rx, Transmission } from "./transmission.ts";
import { type ExportTable, ExtendedRequest, type Negotiated, type PendingRequest, type SessionLink, type Transport } from "./types.ts";

const SIZE = NBD_EXTENDED_REQUEST_SIZE;

/** The transmission phase of a session that agreed to extended headers. */
export class ExtendedTransmission extends Transmission {
  /** NBD_FLAG_BLOCK_STATUS_PAYLOAD was advertised (the handshake does so when contexts are selected). */
  private readonly statusPayload: boolean;
  private readonly contextIds: readonly number[];

  constructor(s: SessionLink, t: Transport, exports: ExportTable, log: Logger, n: Negotiated, paused: boolean) {
    super(s, t, exports, log, n, paused, new ExtendedReplyWriter(s, t, n));
    this.statusPayload = n.contexts.length > 0;
    this.contextIds = n.contextIds;
  }

  /** The receive loop of the compact class with the 32-byte header step; payloads are shared. */
  protected override receive(chunk: Uint8Array, pos: number): void {
    const len = chunk.length;
    while (pos < len) {
      if (this.s.closed || this.disconnecting) return;
      if (this.paused) {
        this.keepBacklog(chunk, pos);
        return;
      }
      if (this.rx === Rx.Payload) {
        pos = this.takePayload(chunk, pos);
        continue;
      }
      if (this.rx === Rx.Discard) {
        pos = this.takeDiscard(chunk, pos);
        continue;
      }
      const p = this.takeHeader(chunk, pos, SIZE, parseExtendedRequest);
      if (p < 0) return p === HEADER_BAD ? this.badMagic() : undefined;
      pos = p;
      pos = this.request(chunk, pos);
    }
  }

  /**
   * A header is in: PAYLOAD_LEN alone frames the stream. A payload is consumed whatever the
   * command, and refused (EINVAL) where the command takes none; one above the hard limit is a
   * denial of service and disconnects (there is no consuming 2^64 bytes). Returns the new position.
   */
  private request(chunk: Uint8Array, pos: number): number {
    const h = this.hdr;
    const req = this.newRequest();
    if (!(h.flags & NBD_CMD_FLAG_PAYLOAD_LEN)) {
      if (h.type === NBD_CMD_WRITE) req.error = new NbdError(NBD_EINVAL, "WRITE without NBD_CMD_FLAG_PAYLOAD_LEN (extended headers need it)");
      this.dispatch(req, EMPTY);
      return pos;
    }
    if (h.length > HARD_MAX_PAYLOAD) {
      this.s.protocolError("PAYLOAD_TOO_LARGE", `${commandName(h.type)} announces a payload of ${h.length} bytes`);
      return chunk.length;
    }
    if (h.type === NBD_CMD_WRITE) {
      if (h.length > this.payloadLimit) req.error = this.tooLarge(h.length);
    } else if (h.type !== NBD_CMD_BLOCK_STATUS || !this.statusPayload) {
      req.error = new NbdError(NBD_EINVAL, `${commandName(h.type)} takes no payload here`);
    }
    if (h.length === 0) {
      this.dispatch(req, EMPTY);
      return pos;
    }
    return this.startPayload(req, chunk, pos, h.length);
  }

  /** Requests of this session remember the offset's exact halves; PAYLOAD_LEN has done its work. */
  protected override newRequest(): PendingRequest {
    const h = this.hdr;
    return new ExtendedRequest(
      h.type, h.flags & ~NBD_CMD_FLAG_PAYLOAD_LEN, h.cookieHi, h.cookieLo, h.offset, h.offsetTooBig, h.length, h.offsetHi, h.offsetLo,
    );
  }

  /** BLOCK_STATUS with a payload: its effect length, and the ids of the contexts to report (each once). */
  protected override filteredStatus(req: PendingRequest, payload: Uint8Array, flags: number): unknown {
    const p = parseStatusPayload(payload);
    if (!p) throw new NbdError(NBD_EINVAL, `malformed BLOCK_STATUS payload of ${payload.length} bytes`);
    const only: number[] = [];
    for (const id of p.ids) {
      const i = this.contextIds.indexOf(id);
      if (i < 0) throw new NbdError(NBD_EINVAL, `BLOCK_STATUS payload names unknown meta context id ${id}`);
      if (only.includes(i)) throw new NbdError(NBD_EINVAL, `BLOCK_STATUS payload names meta context id ${id} twice`);
      only.push(i);
    }
    if (p.length === 0) throw new NbdError(NBD_EINVAL, "BLOCK_STATUS of zero length");
    return this.w.blockStatus(req, flags, p.length, only);
  }
}

/** Replies of an extended-headers session: 32-byte chunk headers, never a simple reply. */
export class ExtendedReplyWriter extends ReplyWriter {
  constructor(s: SessionLink, t: Transport, n: Negotiated) {
    super(s, t, n, NBD_EXTENDED_REPLY_SIZE);
  }

  protected override chunkHeader(b: Uint8Array, p: number, flags: number, type: number, req: PendingRequest, length: number): void {
    const r = req as ExtendedRequest;
    putExtendedReply(b, p, flags, type, r.cookieHi, r.cookieLo, r.offsetHi, r.offsetLo, length);
  }

  /** BLOCK_STATUS_EXT: context id, descriptor count, then (u64 length, u64 status) per extent. */
  protected override encodeStatusChunk(req: PendingRequest, id: number, list: ExtentList, last: boolean): Uint8Array {
    const n = list.lengths.length;
    const h = NBD_EXTENDED_REPLY_SIZE;
    const b = new Uint8Array(h + 8 + 16 * n);
    this.chunkHeader(b, 0, last ? NBD_REPLY_FLAG_DONE : 0, NBD_REPLY_TYPE_BLOCK_STATUS_EXT, req, 8 + 16 * n);
    putU32(b, h, id);
    putU32(b, h + 4, n);
    for (let i = 0; i < n; i++) {
      putU64(b, h + 8 + 16 * i, list.lengths[i]!);
      putU32(b, h + 20 + 16 * i, list.types[i]!); // 32-bit statuses: the high half stays zero
    }
    return b;
  }
}
