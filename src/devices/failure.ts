// The fsyncgate rule, shared by the devices that write files (raw files, qcow2 overlays): the first
// failed fdatasync (or failed write other than a full disk) is remembered, and from then on the
// device refuses writes and flushes with EIO while reads go on, until it is opened again.
import { eio } from "../protocol/errors.ts";

/** Write errors that lose nothing already acknowledged: the request fails and can be retried. */
const FULL_DISK = new Set(["ENOSPC", "EDQUOT", "EFBIG"]);

/**
 * Why not carry on after a failed fdatasync: Linux may already have dropped the dirty pages it
 * could not write back (marking them clean), so a later fdatasync that succeeds says nothing about
 * them; and the error is reported once. A FLUSH that succeeded after that would be a lie. A failed
 * write is kept too: the data it carried is not where the client believes it is.
 */
export class FailureLatch {
  /** The failure noted here (null also when only another thread's latch of the same file noted one). */
  failure: Error | null = null;
  /**
   * One Int32, shared with the latches of the same file on other threads (connections served on
   * threads of their own share the descriptor, and Linux reports a failed writeback to one
   * fdatasync of that descriptor only): 1 once any of them noted a failure.
   */
  readonly shared: Int32Array;

  /**
   * `what` names the device in messages ("overlay /x/ov.qcow2", "/x/disk.img"); `shared`: the
   * buffer of another latch of the same file (`latch.shared.buffer`), to fail together.
   */
  constructor(private readonly what: string, private readonly log: (msg: string) => void, shared?: SharedArrayBuffer) {
    this.shared = new Int32Array(shared ?? new SharedArrayBuffer(4));
  }

  /** A failure was noted, here or by a latch sharing this one's buffer. */
  get failed(): boolean {
    return this.failure !== null || Atomics.load(this.shared, 0) !== 0;
  }

  /**
   * Note an error thrown by `op` ("write", "fdatasync", "fallocate", ...) and return it, for the
   * caller to rethrow. Full-disk errors of writes are not kept (a later write may succeed).
   */
  note(e: unknown, op: string): unknown {
    const code = (e as { code?: unknown } | null)?.code;
    if (op !== "fdatasync" && typeof code === "string" && FULL_DISK.has(code)) return e;
    if (this.failure === null) {
      this.failure = e instanceof Error ? e : new Error(String(e));
      Atomics.store(this.shared, 0, 1);
      this.log(`${this.what}: ${op} failed (${describe(this.failure)}): from now on writes and flushes fail with ` +
        "EIO (reads go on), since data not yet flushed may be lost even if a later fdatasync succeeded; " +
        "restart the server once the storage is fixed");
    }
    return e;
  }

  /** Throw EIO if a failure was noted: call before every write, zero, trim and flush. */
  refuse(): void {
    if (this.failure !== null) {
      throw eio(`${this.what}: refusing writes and flushes since an earlier ${describe(this.failure)}`);
    }
    if (Atomics.load(this.shared, 0) !== 0) {
      throw eio(`${this.what}: refusing writes and flushes since a write or fdatasync failed on another connection's thread`);
    }
  }
}

function describe(e: Error): string {
  const code = (e as { code?: unknown }).code;
  return typeof code === "string" && !e.message.includes(code) ? `${code}: ${e.message}` : e.message;
}
