// The reply receiver (hot path): a state machine over the socket's bytes that parses simple,
// structured and extended replies in place, puts READ data where it belongs, gathers the other
// chunk payloads (whose meaning is in chunks.ts), and settles each request when its last chunk is in.
//
// Replies are parsed with plain byte arithmetic (no DataView, no BigInt, no Buffer.concat); READ
// payloads are copied once, from the socket chunk into the caller's buffer, or kept as views when
// the transport owns no buffer it reuses. A header that straddles two chunks is gathered in a
// small scratch buffer.
//
// Receiving in place: where the transport offers `rx.recv` (Bun with libc), the receiver also
// pulls from the socket itself after every chunk: exactly the bytes the current state needs, READ
// payloads straight into the caller's buffer (one kernel copy, no intermediate buffer). After each
// completed request it continues in a microtask, so the continuations that submit new requests run
// (and their requests go out) before it drains more. Optionally it busy-polls for a while when the
// socket is momentarily empty but replies are due (`busyPollMicros`).
import {
  NBD_CMD_BLOCK_STATUS, NBD_CMD_READ, NBD_EXTENDED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_BLOCK_STATUS_EXT, NBD_REPLY_TYPE_NONE, NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_SIMPLE_REPLY_MAGIC, NBD_STRUCTURED_REPLY_MAGIC, NBD_MAX_STRING, commandName,
} from "../protocol/constants.ts";
import { blockStatusChunk, blockStatusExtChunk, errorChunk, holeChunk, type ChunkProblem } from "./chunks.ts";
import type { Rx } from "./conn.ts";
import { NbdRequestError, type NbdProtocolViolation } from "./errors.ts";
import { orderViews, type ClientStats, type Req, type RequestTable } from "./requests.ts";
import type { RequestWriter } from "./sender.ts";
import { u16, u32, u64 } from "./wire.ts";

// Receiver states.
const S_HEADER = 0; // waiting for a reply header
const S_DATA = 1; // copying READ data into the request's buffer
const S_OFFSET = 2; // reading the 8-byte offset of an OFFSET_DATA chunk
const S_PAYLOAD = 3; // gathering a whole chunk payload (hole, block status, error)

/** The reply header size a magic announces (0: not a reply); which ones are allowed is checked by each decoder. */
function replyHeaderSize(magic: number): number {
  return magic === NBD_STRUCTURED_REPLY_MAGIC ? 20 : magic === NBD_SIMPLE_REPLY_MAGIC ? 16 : magic === NBD_EXTENDED_REPLY_MAGIC ? 32 : 0;
}

/** What the receiver needs from the connection it serves. */
export interface ReceiverHost {
  /** Set once the connection failed or was closed: the receiver stops. */
  readonly dead: Error | null;
  /** The byte stream cannot be trusted any more: fails the connection with this code. */
  violation(code: string, msg: string): NbdProtocolViolation;
}

/** What the receiver knows of the transmission phase it parses. */
export interface ReceiverSetup {
  /** Chunked replies (structured replies, or extended headers). */
  structured: boolean;
  /** Extended headers: every reply is a 32-byte chunk header, and nothing else is. */
  extended: boolean;
  /** Selected meta contexts, id → name. */
  contextNames: ReadonlyMap<number, string>;
  stats: ClientStats;
  /** The transport's in-place receive, or null (then every byte arrives through `onData`). */
  recv: Rx["recv"] | null;
  /** How long to busy-poll an empty socket while receiving in place, in ms. */
  busyPollMs: number;
}

export class ReplyReceiver {
  private state = S_HEADER;
  private readonly scratch = Buffer.alloc(32);
  private scratchHave = 0;
  private scratchNeed = 0;
  private cur: Req | null = null;
  private chunkType = 0;
  private chunkFlags = 0;
  private chunkLen = 0;
  private dataPos = 0;
  private dataLeft = 0;
  private payload: Buffer | null = null;
  private payloadHave = 0;
  /** 20-byte structured chunks are allowed (structured replies without extended headers). */
  private readonly compactChunks: boolean;
  private readonly extended: boolean;
  private readonly contextNames: ReadonlyMap<number, string>;
  private readonly stats: ClientStats;
  /** The transport's in-place receive, or null (then every byte arrives through `onData`). */
  readonly recvIn: ((dst: Uint8Array, off: number, len: number) => number) | null;
  private readonly busyPollMs: number;
  private readonly headerIn = Buffer.allocUnsafe(32);
  private completions = 0;
  private pullQueued = false;
  private readonly pullBound = () => this.pull();

  constructor(
    private readonly host: ReceiverHost, private readonly reqs: RequestTable, private readonly writer: RequestWriter,
    setup: ReceiverSetup,
  ) {
    this.compactChunks = setup.structured && !setup.extended;
    this.extended = setup.extended;
    this.contextNames = setup.contextNames;
    this.stats = setup.stats;
    this.recvIn = setup.recv ?? null;
    this.busyPollMs = setup.busyPollMs;
  }

  /**
   * Receives in place (see the top of the file) until the socket is empty or a request completes;
   * in the second case it goes on in a microtask, after the continuations of that request and
   * after sending what they staged.
   */
  pull(): void {
    this.pullQueued = false;
    if (this.writer.flushQueued) this.writer.flush();
    const done = this.completions;
    while (!this.host.dead) {
      if (this.state === S_DATA) {
        const r = this.cur!;
        if (!r.buf) return; // READ by views: those keep the transport's own chunks
        const n = this.recvWait(r.buf, this.dataPos, this.dataLeft);
        if (n === 0) return;
        this.dataPos += n;
        this.dataLeft -= n;
        if (this.dataLeft === 0) this.endOfPayload();
      } else if (this.state === S_PAYLOAD) {
        const p = this.payload!;
        const n = this.recvWait(p, this.payloadHave, p.length - this.payloadHave);
        if (n === 0) return;
        this.payloadHave += n;
        if (this.payloadHave === p.length) this.onPayload(p);
      } else {
        // A header or a data offset: exactly the bytes still missing (16 first for a header, the
        // shorter of the two reply headers), so nothing that follows them is taken here.
        if (this.reqs.pending === 0) return;
        const need = this.state === S_OFFSET ? 8 - this.scratchHave : this.scratchNeed === 0 ? 16 : this.scratchNeed - this.scratchHave;
        const n = this.recvWait(this.headerIn, 0, need);
        if (n === 0) return;
        this.onData(this.headerIn, n);
      }
      if (this.completions !== done) {
        if (!this.pullQueued && !this.host.dead) {
          this.pullQueued = true;
          queueMicrotask(this.pullBound);
        }
        return;
      }
    }
  }

  /** One in-place receive, busy-polling up to `busyPollMs` while the socket is empty. */
  private recvWait(dst: Uint8Array, off: number, len: number): number {
    const recv = this.recvIn!;
    let n = recv(dst, off, len);
    if (n === 0 && this.busyPollMs > 0) {
      const until = performance.now() + this.busyPollMs;
      do n = recv(dst, off, len);
      while (n === 0 && performance.now() < until && !this.host.dead);
    }
    return n;
  }

  /** Parses `chunk[0..n)`. Keeps no reference to `chunk` (except READ views of owned buffers): the caller may reuse it. */
  onData(chunk: Buffer, n: number): void {
    let i = 0;
    while (i < n && !this.host.dead) {
      switch (this.state) {
        case S_HEADER: {
          if (this.scratchHave === 0 && n - i >= 4) {
            const magic = u32(chunk, i);
            const size = replyHeaderSize(magic);
            if (size === 0) {
              this.host.violation("BAD_REPLY_MAGIC", `bad reply magic 0x${magic.toString(16).padStart(8, "0")}`);
              return;
            }
            if (n - i >= size) {
              i += size;
              if (size === 16) this.onSimple(chunk, i - 16);
              else if (size === 20) this.onChunkHeader(chunk, i - 20);
              else this.onExtendedHeader(chunk, i - 32);
              continue;
            }
          }
          // The header straddles chunks: gather it in the scratch buffer.
          if (this.scratchNeed === 0) this.scratchNeed = 4;
          const take = Math.min(this.scratchNeed - this.scratchHave, n - i);
          chunk.copy(this.scratch, this.scratchHave, i, i + take);
          this.scratchHave += take;
          i += take;
          if (this.scratchHave < this.scratchNeed) break;
          if (this.scratchNeed === 4) {
            const magic = u32(this.scratch, 0);
            this.scratchNeed = replyHeaderSize(magic);
            if (this.scratchNeed === 0) {
              this.host.violation("BAD_REPLY_MAGIC", `bad reply magic 0x${magic.toString(16).padStart(8, "0")}`);
              return;
            }
            break;
          }
          const size = this.scratchNeed;
          this.scratchHave = this.scratchNeed = 0;
          if (size === 16) this.onSimple(this.scratch, 0);
          else if (size === 20) this.onChunkHeader(this.scratch, 0);
          else this.onExtendedHeader(this.scratch, 0);
          break;
        }
        case S_DATA: {
          const take = Math.min(this.dataLeft, n - i);
          const r = this.cur!;
          if (r.views) {
            r.views.push(chunk.subarray(i, i + take));
            r.viewPos!.push(this.dataPos);
          } else chunk.copy(r.buf!, this.dataPos, i, i + take);
          i += take;
          this.dataPos += take;
          this.dataLeft -= take;
          if (this.dataLeft === 0) this.endOfPayload();
          break;
        }
        case S_OFFSET: {
          let base: Uint8Array;
          let at: number;
          if (this.scratchHave === 0 && n - i >= 8) {
            base = chunk;
            at = i;
            i += 8;
          } else {
            const take = Math.min(8 - this.scratchHave, n - i);
            chunk.copy(this.scratch, this.scratchHave, i, i + take);
            this.scratchHave += take;
            i += take;
            if (this.scratchHave < 8) break;
            this.scratchHave = 0;
            base = this.scratch;
            at = 0;
          }
          this.onDataOffset(u64(base, at));
          break;
        }
        case S_PAYLOAD: {
          const p = this.payload!;
          const take = Math.min(p.length - this.payloadHave, n - i);
          chunk.copy(p, this.payloadHave, i, i + take);
          this.payloadHave += take;
          i += take;
          if (this.payloadHave === p.length) this.onPayload(p);
          break;
        }
        default:
          this.host.violation("INTERNAL", `receiver in unknown state ${this.state}`);
          return;
      }
    }
  }

  private lookup(b: Uint8Array, o: number): Req | null {
    const hi = u32(b, o);
    const lo = u32(b, o + 4);
    const r = hi === 0 ? this.reqs.byId[lo] : undefined;
    if (!r) {
      this.host.violation("UNKNOWN_COOKIE", `reply for unknown cookie 0x${hi.toString(16)}${lo.toString(16).padStart(8, "0")}`);
      return null;
    }
    return r;
  }

  private onSimple(b: Uint8Array, o: number): void {
    if (this.extended) {
      this.host.violation("UNEXPECTED_SIMPLE_REPLY", "simple reply while extended headers are in use");
      return;
    }
    const r = this.lookup(b, o + 8);
    if (!r) return;
    const errno = u32(b, o + 4);
    this.stats.simpleReplies++;
    if (errno !== 0) {
      r.error = new NbdRequestError(errno, r.type, r.offset, r.length);
      this.complete(r);
      return;
    }
    if (r.type === NBD_CMD_READ) {
      this.cur = r;
      r.got = r.length;
      this.chunkFlags = NBD_REPLY_FLAG_DONE;
      this.dataPos = 0;
      this.dataLeft = r.length;
      this.state = S_DATA;
      return;
    }
    if (r.type === NBD_CMD_BLOCK_STATUS) {
      this.host.violation("SIMPLE_BLOCK_STATUS", "BLOCK_STATUS answered with a simple reply and no error");
      return;
    }
    this.complete(r);
  }

  private onChunkHeader(b: Uint8Array, o: number): void {
    const flags = u16(b, o + 4);
    const type = u16(b, o + 6);
    const r = this.lookup(b, o + 8);
    if (!r) return;
    const len = u32(b, o + 16);
    if (!this.compactChunks) {
      this.host.violation("UNEXPECTED_STRUCTURED_REPLY", `structured reply chunk without structured replies negotiated${this.extended ? " (extended headers are in use)" : ""}`);
      return;
    }
    this.onChunk(r, flags, type, len);
  }

  /** A 32-byte extended chunk header: it echoes the request's offset, and its length has 64 bits. */
  private onExtendedHeader(b: Uint8Array, o: number): void {
    if (!this.extended) {
      this.host.violation("UNEXPECTED_EXTENDED_REPLY", "extended reply chunk without extended headers negotiated");
      return;
    }
    const r = this.lookup(b, o + 8);
    if (!r) return;
    if (u64(b, o + 16) !== r.offset) {
      this.host.violation("BAD_REPLY_OFFSET", `extended reply to ${commandName(r.type)} at ${r.offset} echoes offset ${u64(b, o + 16)}`);
      return;
    }
    if (u32(b, o + 24) !== 0) {
      this.host.violation("BAD_CHUNK", `extended reply chunk announces 2^32 bytes of payload or more (high word ${u32(b, o + 24)})`);
      return;
    }
    this.onChunk(r, u16(b, o + 4), u16(b, o + 6), u32(b, o + 28));
  }

  /** A chunk header of either form: checks the type against the request, then gathers its payload. */
  private onChunk(r: Req, flags: number, type: number, len: number): void {
    this.cur = r;
    this.chunkType = type;
    this.chunkFlags = flags;
    this.chunkLen = len;
    switch (type) {
      case NBD_REPLY_TYPE_NONE:
        if (len !== 0 || !(flags & NBD_REPLY_FLAG_DONE)) {
          this.host.violation("BAD_CHUNK", `NONE chunk with length ${len} or without DONE`);
          return;
        }
        this.endOfPayload();
        return;
      case NBD_REPLY_TYPE_OFFSET_DATA:
        if (r.type !== NBD_CMD_READ || len < 9) {
          this.host.violation("BAD_CHUNK", `OFFSET_DATA chunk of length ${len} for ${commandName(r.type)}`);
          return;
        }
        this.state = S_OFFSET;
        return;
      case NBD_REPLY_TYPE_OFFSET_HOLE:
        if (r.type !== NBD_CMD_READ || len !== 12) {
          this.host.violation("BAD_CHUNK", `OFFSET_HOLE chunk of length ${len} for ${commandName(r.type)}`);
          return;
        }
        break;
      case NBD_REPLY_TYPE_BLOCK_STATUS:
        if (this.extended || r.type !== NBD_CMD_BLOCK_STATUS || len < 12 || (len - 4) % 8 !== 0) {
          this.host.violation("BAD_CHUNK", `BLOCK_STATUS chunk of length ${len} for ${commandName(r.type)}${this.extended ? " under extended headers" : ""}`);
          return;
        }
        break;
      case NBD_REPLY_TYPE_BLOCK_STATUS_EXT:
        if (!this.extended || r.type !== NBD_CMD_BLOCK_STATUS || len < 24 || (len - 8) % 16 !== 0) {
          this.host.violation("BAD_CHUNK", `BLOCK_STATUS_EXT chunk of length ${len} for ${commandName(r.type)}${this.extended ? "" : " without extended headers"}`);
          return;
        }
        break;
      default:
        if (!(type & 0x8000)) {
          this.host.violation("UNKNOWN_CHUNK_TYPE", `unknown structured reply chunk type ${type}`);
          return;
        }
        if (len < 6 || len > 6 + NBD_MAX_STRING + 8) {
          this.host.violation("BAD_CHUNK", `error chunk of length ${len}`);
          return;
        }
    }
    this.payload = Buffer.allocUnsafe(len);
    this.payloadHave = 0;
    this.state = S_PAYLOAD;
  }

  private onDataOffset(offset: number): void {
    const r = this.cur!;
    const n = this.chunkLen - 8;
    if (!(offset >= r.offset && offset + n <= r.offset + r.length)) {
      this.host.violation("DATA_OUT_OF_RANGE", `OFFSET_DATA at ${offset} (+${n}) outside READ at ${r.offset} (+${r.length})`);
      return;
    }
    r.got += n;
    this.stats.dataChunks++;
    this.dataPos = offset - r.offset;
    this.dataLeft = n;
    this.state = S_DATA;
  }

  private onPayload(p: Buffer): void {
    const r = this.cur!;
    this.payload = null;
    const type = this.chunkType;
    let bad: ChunkProblem;
    if (type === NBD_REPLY_TYPE_OFFSET_HOLE) {
      bad = holeChunk(r, p);
      if (!bad) this.stats.holeChunks++;
    } else if (type === NBD_REPLY_TYPE_BLOCK_STATUS || type === NBD_REPLY_TYPE_BLOCK_STATUS_EXT) {
      bad = type === NBD_REPLY_TYPE_BLOCK_STATUS ? blockStatusChunk(r, p, this.contextNames) : blockStatusExtChunk(r, p, this.contextNames);
      if (!bad) this.stats.blockStatusChunks++;
    } else {
      bad = errorChunk(r, p, type);
      if (!bad) this.stats.errorChunks++;
    }
    if (bad) {
      this.host.violation(bad[0], bad[1]);
      return;
    }
    this.endOfPayload();
  }

  private endOfPayload(): void {
    this.state = S_HEADER;
    const r = this.cur!;
    this.cur = null;
    if (!(this.chunkFlags & NBD_REPLY_FLAG_DONE)) return;
    if (r.type === NBD_CMD_READ && !r.error && r.got !== r.length) {
      this.host.violation("SHORT_READ", `READ at ${r.offset} (+${r.length}) completed with ${r.got} bytes described`);
      return;
    }
    this.complete(r);
  }

  /** The last chunk of `r` is in: frees its cookie and settles it. */
  private complete(r: Req): void {
    this.completions++;
    const reqs = this.reqs;
    reqs.remove(r);
    if (r.error) r.reject(r.error);
    else if (r.type === NBD_CMD_BLOCK_STATUS) {
      if (!r.extents || r.extents.size === 0) {
        r.reject(this.host.violation("MISSING_BLOCK_STATUS", `BLOCK_STATUS at ${r.offset} succeeded without any extents`));
        return;
      }
      r.resolve(r.extents as never);
    } else if (r.views) r.resolve(orderViews(r.views, r.viewPos!) as never);
    else r.resolve(undefined as never);
    if (reqs.pending === 0) reqs.wakeIdle();
  }
}
