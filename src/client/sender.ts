// The request writer (hot path): request headers are encoded into a shared staging buffer and
// handed to the socket once per tick; small payloads are copied in behind their header, large ones
// are written as they are. The one place that knows the request header formats (compact, extended).
import { NBD_CMD_DISC, NBD_CMD_FLAG_PAYLOAD_LEN, NBD_EXTENDED_REQUEST_SIZE, NBD_REQUEST_SIZE } from "../protocol/constants.ts";
import { encodeExtendedRequest, encodeRequest } from "../protocol/codec.ts";
import type { Conn } from "./conn.ts";

/** WRITE payloads up to this size are copied into the staging buffer; larger ones are written as they are. */
const COPY_PAYLOAD_MAX = 16 * 1024;
const STAGING_SIZE = 64 * 1024;

export class RequestWriter {
  /** Whether a flush is queued for the end of this tick (bytes are staged). */
  flushQueued = false;
  private staging = Buffer.allocUnsafe(STAGING_SIZE);
  private stagingStart = 0;
  private stagingEnd = 0;
  /** Set once the connection is dead: staged bytes are dropped instead of written. */
  private stopped = false;
  private readonly flushBound = () => this.flush();

  /**
   * `extended`: extended headers were agreed: 32-byte headers with a 64-bit length, and a request
   * with a payload says so with NBD_CMD_FLAG_PAYLOAD_LEN (its length is then the payload's).
   * Otherwise compact 28-byte headers, where only WRITE carries a payload.
   */
  constructor(private readonly socket: Conn, private readonly extended = false) {}

  /**
   * Queues one request. `payload` is the WRITE data, or a BLOCK_STATUS payload under extended
   * headers (null otherwise); the caller does not modify it until the request is answered (large
   * payloads are written without a copy).
   */
  request(type: number, flags: number, cookie: number, offset: number, length: number, payload: Uint8Array | null): void {
    if (this.extended) this.queueExtended(type, flags, cookie, offset, length, payload);
    else this.queueHeader(type, flags, cookie, offset, length);
    if (!payload) return;
    length = payload.length;
    if (length <= COPY_PAYLOAD_MAX) {
      this.ensureStaging(length);
      this.staging.set(payload, this.stagingEnd);
      this.stagingEnd += length;
    } else {
      this.flush();
      this.socket.write(payload);
    }
  }

  /** Sends NBD_CMD_DISC at once (with whatever is staged before it). */
  disconnect(): void {
    this.request(NBD_CMD_DISC, 0, 0, 0, 0, null);
    this.flush();
  }

  /** From now on nothing more is written (the connection failed or closed). */
  stop(): void {
    this.stopped = true;
  }

  /** Hands the staged bytes to the socket. The socket keeps the view, so staging moves past it. */
  flush(): void {
    this.flushQueued = false;
    if (this.stagingEnd === this.stagingStart) return;
    if (!this.stopped) this.socket.write(this.staging.subarray(this.stagingStart, this.stagingEnd));
    this.stagingStart = this.stagingEnd;
    if (this.staging.length - this.stagingEnd < 4096) {
      this.staging = Buffer.allocUnsafe(STAGING_SIZE);
      this.stagingStart = this.stagingEnd = 0;
    }
  }

  private ensureStaging(n: number): void {
    if (this.stagingEnd + n <= this.staging.length) return;
    this.flush();
    if (this.stagingEnd + n > this.staging.length) {
      this.staging = Buffer.allocUnsafe(Math.max(STAGING_SIZE, n));
      this.stagingStart = this.stagingEnd = 0;
    }
  }

  private queueHeader(type: number, flags: number, cookie: number, offset: number, length: number): void {
    this.ensureStaging(NBD_REQUEST_SIZE);
    encodeRequest(this.staging, this.stagingEnd, flags, type, 0, cookie, offset, length);
    this.stagingEnd += NBD_REQUEST_SIZE;
    this.flushSoon();
  }

  /** The 32-byte extended header: a payload's length replaces the effect length, flagged PAYLOAD_LEN. */
  private queueExtended(type: number, flags: number, cookie: number, offset: number, length: number, payload: Uint8Array | null): void {
    if (payload) {
      flags |= NBD_CMD_FLAG_PAYLOAD_LEN;
      length = payload.length;
    }
    this.ensureStaging(NBD_EXTENDED_REQUEST_SIZE);
    encodeExtendedRequest(this.staging, this.stagingEnd, flags, type, 0, cookie, offset, length);
    this.stagingEnd += NBD_EXTENDED_REQUEST_SIZE;
    this.flushSoon();
  }

  private flushSoon(): void {
    if (!this.flushQueued) {
      this.flushQueued = true;
      queueMicrotask(this.flushBound);
    }
  }
}
