// The in-process fuzz target: one Session (src/server/session.ts) per input over a fake Transport,
// fed the input's chunks, hung up on mid-way or at the end, then settled. Oracles: nothing thrown
// out of the session, nothing logged at error level (a device or dispatch bug that became EIO),
// every device promise settles before a deadline, and a canary session on its own export keeps
// reading back exactly what it wrote. Memory and unhandled rejections are watched by the runner.
import { rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import {
  NBD_CMD_DISC, NBD_CMD_READ, NBD_CMD_WRITE, NBD_INFO_BLOCK_SIZE, NBD_OPT_GO, NBD_OPT_STRUCTURED_REPLY,
  NBD_REPLY_TYPE_OFFSET_DATA,
} from "../../src/protocol/constants.ts";
import { encodeInfoRequest } from "../../src/protocol/codec.ts";
import { NbdServer } from "../../src/server/server.ts";
import { Session } from "../../src/server/session.ts";
import type { Transport } from "../../src/server/types.ts";
import type { Logger } from "../../src/server/log.ts";
import { MemoryDevice } from "../../src/devices/memory.ts";
import { openOverlay } from "../../src/devices/qcow2/index.ts";
import { openCdImage } from "../../src/devices/cd/index.ts";
import { encodeMode1, RAW_SECTOR } from "../../src/devices/cd/sector.ts";
import { NBD_EIO } from "../../src/protocol/constants.ts";
import { NbdError } from "../../src/protocol/errors.ts";
import {
  type BlockDevice, type BlockSize, type Capabilities, type ExportSpec, type ExtentSink, type Maybe, caps, isPromise,
} from "../../src/devices/types.ts";
import { cat, clientFlags, option, parseServer, request } from "../helpers/wire.ts";
import { type FuzzInput, type FuzzTargetInfo, chunks } from "./gen.ts";

/** A finding: what broke, for the report (the runner adds the seed and path to replay it). */
export class FuzzFailure extends Error {
  constructor(readonly oracle: string, message: string) {
    super(`${oracle}: ${message}`);
    this.name = "FuzzFailure";
  }
}

/** Counts device calls that returned a promise and have not settled (the "no hang" oracle). */
class Pending {
  n = 0;
  track<T>(r: T): T {
    if (!isPromise(r)) return r;
    this.n++;
    (r as Promise<unknown>).then(() => { this.n--; }, () => { this.n--; });
    return r;
  }
}

/**
 * A device wrapper that answers every call asynchronously (on a later microtask or timer), fails
 * some ranges with EIO, and counts what is in flight: it exercises the session's async paths
 * (MAX_IN_FLIGHT, disconnect with requests pending, sparse reads over async extents).
 */
class AsyncFlaky implements BlockDevice {
  constructor(private readonly d: BlockDevice, private readonly pending: Pending, private readonly failEvery = 0) {}
  private later(f: () => Maybe, offset: number): Promise<void> {
    return this.pending.track(new Promise<void>((resolve, reject) => {
      const run = () => {
        if (this.failEvery && Math.floor(offset / 4096) % this.failEvery === 3) { reject(new NbdError(NBD_EIO, "injected EIO")); return; }
        try {
          const r = f();
          if (isPromise(r)) r.then(() => resolve(), reject); else resolve();
        } catch (e) { reject(e); }
      };
      if (offset & 512) setTimeout(run, 0); else queueMicrotask(run);
    }));
  }
  size(): number { return this.d.size(); }
  blockSize(): BlockSize | undefined { return this.d.blockSize?.(); }
  capabilities(): Capabilities { return this.d.capabilities(); }
  pread(b: Uint8Array, o: number, f: number): Maybe { return this.later(() => this.d.pread(b, o, f), o); }
  pwrite(b: Uint8Array, o: number, f: number): Maybe { return this.later(() => this.d.pwrite!(b, o, f), o); }
  flush(f: number): Maybe { return this.later(() => this.d.flush!(f), 0); }
  trim(o: number, l: number, f: number): Maybe { return this.later(() => this.d.trim!(o, l, f), o); }
  zero(o: number, l: number, f: number): Maybe { return this.later(() => this.d.zero!(o, l, f), o); }
  extents(o: number, l: number, f: number, s: ExtentSink): Maybe { return this.later(() => this.d.extents!(o, l, f, s), o); }
  cache(o: number, l: number, f: number): Maybe { return this.later(() => this.d.cache!(o, l, f), o); }
}

/** Counts the promises of a real asynchronous device (the qcow2 overlay's flush). */
class Tracked implements BlockDevice {
  constructor(private readonly d: BlockDevice, private readonly p: Pending) {}
  size(): number { return this.d.size(); }
  blockSize(): BlockSize | undefined { return this.d.blockSize?.(); }
  capabilities(): Capabilities { return this.d.capabilities(); }
  pread(b: Uint8Array, o: number, f: number): Maybe { return this.p.track(this.d.pread(b, o, f)); }
  pwrite(b: Uint8Array, o: number, f: number): Maybe { return this.p.track(this.d.pwrite!(b, o, f)); }
  flush(f: number): Maybe { return this.p.track(this.d.flush!(f)); }
  trim(o: number, l: number, f: number): Maybe { return this.p.track(this.d.trim!(o, l, f)); }
  zero(o: number, l: number, f: number): Maybe { return this.p.track(this.d.zero!(o, l, f)); }
  extents(o: number, l: number, f: number, s: ExtentSink): Maybe { return this.p.track(this.d.extents!(o, l, f, s)); }
  cache(o: number, l: number, f: number): Maybe { return this.p.track(this.d.cache!(o, l, f)); }
  metaContexts() { return this.d.metaContexts?.() ?? []; }
  close(): Maybe { return this.d.close?.(); }
}

/** A read-only device with advertised block-size constraints. */
class ReadOnlyAligned extends MemoryDevice {
  override capabilities(): Capabilities { return caps({ canFlush: false, canExtents: true, canCache: true }); }
  blockSize(): BlockSize { return { minimum: 512, preferred: 4096, maximum: 1024 * 1024 }; }
}

/** `n` raw Mode 1 sectors from LBA `first` (valid sync, header, EDC and ECC). */
export function cdSectors(n: number, first: number): Uint8Array {
  const b = new Uint8Array(n * RAW_SECTOR);
  for (let i = 0; i < n; i++) {
    b.fill(i & 255, i * RAW_SECTOR + 16, i * RAW_SECTOR + 2064);
    encodeMode1(b, i * RAW_SECTOR, first + i);
  }
  return b;
}

/** A logger that remembers error-level lines: each is a finding (a non-NbdError reached dispatch). */
export class RecordingLogger implements Logger {
  readonly debugEnabled = false;
  errors: string[] = [];
  debug(): void {}
  info(): void {}
  warn(): void {}
  error(m: string): void { if (this.errors.length < 20) this.errors.push(m); }
}

/** The fake Transport: counts output, optionally lets it pile up (a client that stops reading). */
class FuzzTransport implements Transport {
  session: Session | null = null;
  sent = 0;
  queuedBytes = 0;
  ended = false;
  destroyed = false;
  paused = false;
  constructor(private readonly slow: boolean) {}
  send(b: Uint8Array): void {
    if (this.ended || this.destroyed) return;
    this.sent += b.length;
    if (this.slow) {
      this.queuedBytes += b.length;
      this.session?.checkBackpressure();
    }
  }
  sendTransient(b: Uint8Array): void { this.send(b); }
  queued(): number { return this.queuedBytes; }
  pause(): void { this.paused = true; }
  resume(): void { this.paused = false; }
  end(): void { this.ended = true; }
  destroy(): void { this.destroyed = true; }
  drain(): void {
    this.queuedBytes = 0;
    this.session?.onDrain();
  }
}

const MiB = 1024 * 1024;
const CANARY = "canary-7f1c";

/** The exports a fuzz input can reach, rebuilt now and then (memory devices only grow). */
export class SessionTarget {
  readonly info: FuzzTargetInfo;
  readonly log = new RecordingLogger();
  private readonly pending = new Pending();
  private server!: NbdServer;
  private ovl: BlockDevice | null = null;
  private cd: ExportSpec[] = [];
  private resets = 0;
  /** The canary's export lives across resets: what it wrote must stay written. */
  private readonly canaryDevice = new MemoryDevice(MiB);
  private canaryRound = 0;
  private readonly dir: string;

  private constructor(dir: string) {
    this.dir = dir;
    this.info = {
      names: ["", "mem", "async", "flaky", "ro", "huge", "ovl"],
      sizes: [MiB + 512, MiB, 2 ** 53, 4 * MiB],
      maxFullPayload: 256 * 1024,
    };
  }

  /** `dir`: a scratch directory for the overlay's base image and a small CD image. */
  static async create(dir: string): Promise<SessionTarget> {
    const t = new SessionTarget(dir);
    writeFileSync(join(dir, "base.img"), new Uint8Array(4 * MiB).fill(0x42));
    // A two-track CD (data + audio): its cooked and raw views are read-only, stateless devices.
    writeFileSync(join(dir, "cd.bin"), cdSectors(40, 0));
    writeFileSync(join(dir, "cd.cue"), 'FILE "cd.bin" BINARY\n  TRACK 01 MODE1/2352\n    INDEX 01 00:00:00\n  TRACK 02 AUDIO\n    INDEX 00 00:00:20\n    INDEX 01 00:00:25\n');
    t.cd = await openCdImage(join(dir, "cd.cue"), { log: () => {} });
    t.info.names.push(...t.cd.map((e) => e.name));
    t.info.sizes.push(...t.cd.map((e) => e.device.size()));
    return t;
  }

  /** Memory devices are made anew per reset; the overlay (slower to make) every 64 resets. */
  private async rebuild(): Promise<void> {
    const p = this.pending;
    if (this.ovl === null || ++this.resets % 64 === 0) {
      await this.ovl?.close?.();
      const ovlPath = join(this.dir, "ovl.qcow2");
      rmSync(ovlPath, { force: true });
      this.ovl = await openOverlay({ base: join(this.dir, "base.img"), overlay: ovlPath, log: () => {} });
    }
    const specs: ExportSpec[] = [
      { name: "mem", device: new MemoryDevice(MiB + 512) },
      { name: "async", device: new AsyncFlaky(new MemoryDevice(MiB), p) },
      { name: "flaky", device: new AsyncFlaky(new MemoryDevice(MiB), p, 5) },
      { name: "ro", device: new ReadOnlyAligned(MiB) },
      { name: "huge", device: new MemoryDevice(2 ** 53) },
      { name: "ovl", device: new Tracked(this.ovl, p) },
      { name: CANARY, device: this.canaryDevice },
      ...this.cd,
    ];
    this.server = new NbdServer(specs, { log: this.log });
  }

  /** Fresh exports (each base input starts from the same state, so a replay by path is faithful). */
  async reset(): Promise<void> {
    await this.rebuild();
  }

  /** Run one input; throws FuzzFailure when an oracle fails. */
  async run(input: FuzzInput): Promise<void> {
    const bytes = input.bytes;
    const t = new FuzzTransport(input.slowReader);
    const s = new Session(t, this.server, this.log, "fuzz");
    t.session = s;
    const cut = input.closeAt ?? bytes.length;
    try {
      let i = 0;
      for (const c of chunks(bytes.subarray(0, cut), input.splits)) {
        // Like a socket: nothing is read while the session has paused reading.
        if (t.paused) await this.whilePaused(t);
        s.onData(c);
        if (input.slowReader && ++i % 4 === 0) t.drain();
      }
      if (input.closeAt !== null) s.onClose();
      await this.settle(t);
      t.drain();
      s.onClose();
    } catch (e) {
      if (e instanceof FuzzFailure) throw e;
      throw new FuzzFailure("uncaught exception", (e as Error)?.stack ?? String(e));
    }
    if (this.log.errors.length) {
      const errs = this.log.errors;
      this.log.errors = [];
      throw new FuzzFailure("error logged", errs.join("\n"));
    }
  }

  /** The session paused reading: the slow reader reads now, async requests complete; it must resume. */
  private async whilePaused(t: FuzzTransport, ms = 5000): Promise<void> {
    const limit = Date.now() + ms;
    while (t.paused && !t.destroyed && !t.ended) {
      if (Date.now() > limit) throw new FuzzFailure("hang", `reading stayed paused for ${ms} ms (${this.pending.n} device calls pending, ${t.queuedBytes} bytes queued)`);
      t.drain();
      await new Promise((r) => setImmediate(r));
    }
  }

  /** Wait until every device promise has settled, draining the fake socket now and then. */
  private async settle(t: FuzzTransport, ms = 5000): Promise<void> {
    const limit = Date.now() + ms;
    let spins = 0;
    while (this.pending.n > 0) {
      if (Date.now() > limit) throw new FuzzFailure("hang", `${this.pending.n} device call(s) did not complete within ${ms} ms`);
      if (++spins % 8 === 0) t.drain();
      await new Promise((r) => setImmediate(r));
    }
    // Replies written after the last settled promise may have paused reading; let them go out.
    await Promise.resolve();
  }

  /** A well-behaved client on its own export: what it writes it reads back. */
  async canary(index: number): Promise<void> {
    const off = ((index * 7919) % 255) * 4096;
    const data = new Uint8Array(8192);
    const r = index + this.canaryRound++;
    for (let k = 0; k < data.length; k++) data[k] = (k * 13 + r) & 255;
    const out: Uint8Array[] = [];
    const t = new FuzzTransport(false);
    t.send = (b) => { out.push(b.slice()); };
    const s = new Session(t, this.server, this.log, "canary");
    t.session = s;
    s.onData(cat(
      clientFlags(), option(NBD_OPT_STRUCTURED_REPLY), option(NBD_OPT_GO, encodeInfoRequest(CANARY, [NBD_INFO_BLOCK_SIZE])),
      request(NBD_CMD_WRITE, { cookie: 1, offset: off, payload: data }),
      request(NBD_CMD_READ, { cookie: 2, offset: off, length: data.length }),
      request(NBD_CMD_DISC, { cookie: 3 }),
    ));
    await Promise.resolve();
    const msgs = parseServer(cat(...out));
    const read = msgs.find((m) => m.kind === "chunk" && m.cookie === 2 && m.type === NBD_REPLY_TYPE_OFFSET_DATA);
    const wrote = msgs.find((m) => (m.kind === "chunk" || m.kind === "simple") && m.cookie === 1);
    if (!wrote || !read || read.kind !== "chunk") throw new FuzzFailure("canary", `no reply to the canary's write or read (${msgs.length} messages)`);
    const got = read.data.subarray(8);
    if (Buffer.compare(Buffer.from(got), Buffer.from(data)) !== 0) throw new FuzzFailure("canary", "read back different bytes");
  }

  async close(): Promise<void> {
    await this.ovl?.close?.();
  }
}
