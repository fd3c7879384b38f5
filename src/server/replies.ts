// Reply encoding for the transmission phase: simple and structured replies, error chunks, READ
// replies (sendfile, a copy, or OFFSET_HOLE/OFFSET_DATA chunks, the data from files where it lies in them) and BLOCK_STATUS chunks. Chunks
// are laid out around a header of `hdr` bytes written by chunkHeader(); extended headers
// (extended.ts) override those two and the status chunk, and share everything else.
import {
  NBD_CMD_FLAG_DF, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE, NBD_STATE_ZERO, NBD_STRUCTURED_HEADER_SIZE,
} from "../protocol/constants.ts";
import { encodeString, putChunkHeader, putSimpleReply, putU16, putU32, putU64 } from "../protocol/codec.ts";
import { type CheckedExport, type ExportContext, ExtentList } from "../devices/checked.ts";
import { type FileRange, isPromise } from "../devices/types.ts";
import type { Negotiated, PendingRequest, SessionLink, Transport } from "./types.ts";

/** Reads at least this large consult extents to send holes as OFFSET_HOLE chunks. */
const HOLE_SCAN_MIN = 65536;
/** Reads at least this large from a plain file go out with sendfile(2) where the transport can. */
const SENDFILE_MIN = 65537;

const EMPTY = new Uint8Array(0);

/**
 * Writes the replies of one transmission phase. READ and BLOCK_STATUS ask the export here, since
 * what the export answers (a file range, holes, extents) decides the shape of the reply. Nothing
 * is sent once the session is closed (late asynchronous completions are dropped).
 */
export class ReplyWriter {
  private readonly exp: CheckedExport;
  private readonly structured: boolean;
  private readonly contexts: readonly ExportContext[];
  private readonly contextIds: readonly number[];
  /**
   * Preallocated reply headers, sent with sendTransient (the transport copies if it must keep
   * them): a simple reply, a chunk header alone (NONE), a chunk header and an offset (OFFSET_DATA).
   */
  private readonly rep16 = new Uint8Array(16);
  private readonly repNone: Uint8Array;
  private readonly repData: Uint8Array;
  /** An OFFSET_HOLE chunk: header, offset, length. */
  private readonly repHole: Uint8Array;
  private readonly range: FileRange = { fd: -1, offset: 0 };
  /** Extents of the current large read (synchronous devices only; reused). */
  private readonly readExtents = new ExtentList();
  /** Small READ replies are read in place into the transport's buffer (until a read comes back async). */
  private inPlace: boolean;

  /** `hdr`: the chunk header size chunkHeader() writes (20; extended headers 32). */
  constructor(
    private readonly s: SessionLink, private readonly t: Transport, n: Negotiated,
    protected readonly hdr = NBD_STRUCTURED_HEADER_SIZE,
  ) {
    this.exp = n.exp;
    this.structured = n.structured;
    this.contexts = n.contexts;
    this.contextIds = n.contextIds;
    this.repNone = new Uint8Array(hdr);
    this.inPlace = t.reserve !== undefined && t.commit !== undefined && t.detach !== undefined;
    this.repData = new Uint8Array(hdr + 8);
    this.repHole = new Uint8Array(hdr + 12);
  }

  /** Write the `hdr`-byte header of a chunk of `req` with a payload of `length` bytes at b[p]. */
  protected chunkHeader(b: Uint8Array, p: number, flags: number, type: number, req: PendingRequest, length: number): void {
    putChunkHeader(b, p, flags, type, req.cookieHi, req.cookieLo, length);
  }

  /** Success without data. */
  ok(req: PendingRequest): void {
    if (this.s.closed) return;
    if (this.structured) {
      this.chunkHeader(this.repNone, 0, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, req, 0);
      this.t.sendTransient(this.repNone);
    } else {
      putSimpleReply(this.rep16, 0, 0, req.cookieHi, req.cookieLo);
      this.t.sendTransient(this.rep16);
    }
  }

  /** Failure with an NBD errno (and, in structured replies, the message). */
  error(req: PendingRequest, errno: number, msg: string): void {
    if (this.s.closed) return;
    if (this.structured) {
      const m = encodeString(msg.slice(0, 512));
      const h = this.hdr;
      const b = new Uint8Array(h + 6 + m.length);
      this.chunkHeader(b, 0, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, req, 6 + m.length);
      putU32(b, h, errno);
      putU16(b, h + 4, m.length);
      b.set(m, h + 6);
      this.t.send(b);
    } else {
      const b = new Uint8Array(16);
      putSimpleReply(b, 0, errno, req.cookieHi, req.cookieLo);
      this.t.send(b);
    }
  }

  /** Read and reply to a (validated) READ. Returns a Promise when the device answered asynchronously. */
  read(req: PendingRequest): unknown {
    const exp = this.exp;
    const len = req.length;
    const zeroCopy = len >= SENDFILE_MIN && this.t.sendFile !== undefined;
    if (!this.structured) return zeroCopy ? this.fileRead(req, 16) : this.copyRead(req, 16);
    if (len === 0) {
      exp.read(EMPTY, req.offset);
      this.ok(req);
      return;
    }
    if (len >= HOLE_SCAN_MIN && exp.caps.canExtents && !(req.flags & NBD_CMD_FLAG_DF)) {
      const list = this.readExtents;
      const r = exp.extents(exp.contexts[0]!, req.offset, len, 0, list);
      if (isPromise(r)) return this.sparseRead(req, r, list);
      if (list.lengths.length > 1 || list.types[0]! & NBD_STATE_ZERO) {
        if (zeroCopy && this.sendSparse(req, list)) return;
        return this.sparseRead(req, undefined, list);
      }
    }
    return zeroCopy ? this.fileRead(req, this.hdr + 8) : this.copyRead(req, this.hdr + 8);
  }

  /**
   * A large READ: by sendfile when its bytes lie in a file, or once the device has put them in one
   * (a remote image's cache); else copied (`head` as for copyRead).
   */
  private fileRead(req: PendingRequest, head: number): unknown {
    const exp = this.exp;
    if (exp.fileRange(req.offset, req.length, this.range)) return this.sendFileData(req);
    const later = exp.whenInFile(req.offset, req.length);
    if (later === null) return this.copyRead(req, head);
    return later.then(() => (exp.fileRange(req.offset, req.length, this.range) ? this.sendFileData(req) : this.copyRead(req, head)));
  }

  /** A READ reply whose data is this.range (set by fileRange), by sendfile. */
  private sendFileData(req: PendingRequest): void {
    const r = this.range;
    if (this.s.closed) { r.release?.(); return; }
    if (!this.structured) {
      putSimpleReply(this.rep16, 0, 0, req.cookieHi, req.cookieLo);
      this.t.sendFile!(this.rep16, r.fd, r.offset, req.length, r.release);
      return;
    }
    this.chunkHeader(this.repData, 0, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, req, 8 + req.length);
    putU64(this.repData, this.hdr, req.offset);
    this.t.sendFile!(this.repData, r.fd, r.offset, req.length, r.release);
  }

  /**
   * A READ answered with a copy: `head` bytes of reply header (16: a simple reply; else a chunk
   * header and the offset), then the data. Small replies are read straight into the transport's
   * output buffer; if the device answers asynchronously there, that region is detached (the
   * transport takes a fresh buffer) and later reads of this session use buffers of their own.
   */
  private copyRead(req: PendingRequest, head: number): unknown {
    const exp = this.exp;
    const t = this.t;
    const size = head + req.length;
    const place = this.inPlace ? t.reserve!(size) : null;
    const b = place ?? Buffer.allocUnsafe(size);
    const r = exp.read(b.subarray(head), req.offset);
    if (isPromise(r)) {
      if (place !== null) {
        t.detach!();
        this.inPlace = false;
      }
      return r.then(() => this.sendRead(req, b, head));
    }
    if (place === null) return this.sendRead(req, b, head);
    if (this.s.closed) return;
    this.readHeader(req, b, head);
    t.commit!(size);
  }

  private sendRead(req: PendingRequest, b: Uint8Array, head: number): void {
    if (this.s.closed) return;
    this.readHeader(req, b, head);
    this.t.send(b);
  }

  private readHeader(req: PendingRequest, b: Uint8Array, head: number): void {
    if (head === 16) {
      putSimpleReply(b, 0, 0, req.cookieHi, req.cookieLo);
    } else {
      this.chunkHeader(b, 0, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, req, 8 + req.length);
      putU64(b, this.hdr, req.offset);
    }
  }

  /**
   * A large structured read with holes whose data pieces all lie in files: OFFSET_HOLE chunks and
   * OFFSET_DATA chunks sent from the file (as a plain large read is), nothing read into memory here.
   * False (nothing sent) if a piece is not a file range.
   */
  private sendSparse(req: PendingRequest, list: ExtentList): boolean {
    const exp = this.exp, end = req.offset + req.length;
    for (let i = 0, off = req.offset; off < end; i++) {
      if (i >= list.lengths.length) return false; // extents short of the range (should not happen)
      const l = Math.min(list.lengths[i]!, end - off);
      if (!(list.types[i]! & NBD_STATE_ZERO)) {
        if (!exp.fileRange(off, l, this.range)) return false;
        this.range.release?.(); // only a check: asked again below
      }
      off += l;
    }
    const h = this.hdr, hole = this.repHole;
    for (let i = 0, off = req.offset; off < end; i++) {
      const l = Math.min(list.lengths[i]!, end - off);
      const flags = off + l >= end ? NBD_REPLY_FLAG_DONE : 0;
      if (list.types[i]! & NBD_STATE_ZERO) {
        this.chunkHeader(hole, 0, flags, NBD_REPLY_TYPE_OFFSET_HOLE, req, 12);
        putU64(hole, h, off);
        putU32(hole, h + 8, l);
        this.t.sendTransient(hole);
      } else {
        exp.fileRange(off, l, this.range); // true, as in the check above (nothing ran in between)
        this.chunkHeader(this.repData, 0, flags, NBD_REPLY_TYPE_OFFSET_DATA, req, 8 + l);
        putU64(this.repData, h, off);
        this.t.sendFile!(this.repData, this.range.fd, this.range.offset, l, this.range.release);
      }
      off += l;
    }
    return true;
  }

  /** A large structured read: zero extents become OFFSET_HOLE chunks, the rest OFFSET_DATA. */
  private async sparseRead(req: PendingRequest, pending: Promise<unknown> | undefined, shared: ExtentList): Promise<void> {
    const exp = this.exp;
    if (pending) await pending;
    // Copy the extents: the shared list is reused by the next request while we await reads.
    const list = { lengths: shared.lengths.slice(), types: shared.types.slice() };
    const n = list.lengths.length;
    let off = req.offset;
    const end = req.offset + req.length;
    // Read all data first, so an error can be reported before any chunk is sent.
    const chunks: Uint8Array[] = [];
    const h = this.hdr;
    for (let i = 0; i < n && off < end; i++) {
      const l = Math.min(list.lengths[i]!, end - off);
      const last = off + l >= end;
      if (list.types[i]! & NBD_STATE_ZERO) {
        const b = new Uint8Array(h + 12);
        this.chunkHeader(b, 0, last ? NBD_REPLY_FLAG_DONE : 0, NBD_REPLY_TYPE_OFFSET_HOLE, req, 12);
        putU64(b, h, off);
        putU32(b, h + 8, l);
        chunks.push(b);
      } else {
        const b = Buffer.allocUnsafe(h + 8 + l);
        const rr = exp.read(b.subarray(h + 8), off);
        if (isPromise(rr)) await rr;
        this.chunkHeader(b, 0, last ? NBD_REPLY_FLAG_DONE : 0, NBD_REPLY_TYPE_OFFSET_DATA, req, 8 + l);
        putU64(b, h, off);
        chunks.push(b);
      }
      off += l;
    }
    if (off < end) {
      // Extents did not cover the range (should not happen): read the rest as data.
      const b = Buffer.allocUnsafe(h + 8 + end - off);
      const rr = exp.read(b.subarray(h + 8), off);
      if (isPromise(rr)) await rr;
      this.chunkHeader(b, 0, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, req, 8 + end - off);
      putU64(b, h, off);
      chunks.push(b);
    }
    if (this.s.closed) return;
    for (const c of chunks) this.t.send(c);
  }

  /**
   * Reply to a (validated) BLOCK_STATUS: one chunk per selected context, DONE on the last.
   * `flags` are internal device flags (REQ_ONE). `length` is the effect length, and `only` the
   * indices of the contexts to report (the payload form of extended headers; default: all).
   * Returns a Promise when a device answered asynchronously.
   */
  blockStatus(req: PendingRequest, flags: number, length = req.length, only: readonly number[] | null = null): unknown {
    const exp = this.exp;
    const n = only ? only.length : this.contexts.length;
    const lists: ExtentList[] = [];
    let pending: Promise<unknown>[] | null = null;
    for (let i = 0; i < n; i++) {
      const list = new ExtentList();
      lists.push(list);
      const r = exp.extents(this.contexts[only ? only[i]! : i]!, req.offset, length, flags, list);
      if (isPromise(r)) (pending ??= []).push(r);
    }
    const ids = this.contextIds;
    const send = () => {
      if (this.s.closed) return;
      for (let i = 0; i < n; i++) this.t.send(this.encodeStatusChunk(req, ids[only ? only[i]! : i]!, lists[i]!, i === n - 1));
    };
    if (pending) return Promise.all(pending).then(send);
    send();
  }

  /** One BLOCK_STATUS chunk (32-bit extents) for context `id`. */
  protected encodeStatusChunk(req: PendingRequest, id: number, list: ExtentList, last: boolean): Uint8Array {
    const n = list.lengths.length;
    const b = new Uint8Array(20 + 4 + 8 * n);
    putChunkHeader(b, 0, last ? NBD_REPLY_FLAG_DONE : 0, NBD_REPLY_TYPE_BLOCK_STATUS, req.cookieHi, req.cookieLo, 4 + 8 * n);
    putU32(b, 20, id);
    for (let i = 0; i < n; i++) {
      putU32(b, 24 + 8 * i, list.lengths[i]!);
      putU32(b, 28 + 8 * i, list.types[i]!);
    }
    return b;
  }
}
