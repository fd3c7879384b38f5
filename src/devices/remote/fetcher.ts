// The GETs of one remote image: at most `maxInFlight` at once, reads before readahead, network
// errors, 5xx and stalls retried with backoff until a deadline (then EIO for the reads waiting);
// all async, so a slow store never holds the event loop. Outages and recoveries are logged once.
import { eio } from "../../protocol/errors.ts";
import type { RemoteCounters } from "./metrics.ts";
import { RemoteError, describeVersion, type ObjectStore, type ObjectVersion } from "./store.ts";

export interface FetchPolicy {
  /** GETs in flight at once. */
  maxInFlight: number;
  /** Start no new attempt this long after a read began waiting (network errors, 5xx, stalls). */
  deadlineMs: number;
  /** An attempt that receives nothing for this long has failed (a slow transfer that moves is fine). */
  attemptTimeoutMs: number;
}

/** A GET in the queue or in flight. */
export interface FetchJob {
  readonly start: number;
  readonly end: number;
  /** Settles once every unit was delivered (or rejects with EIO for those that were not). */
  readonly promise: Promise<void>;
  /** A new read waits for this GET: it gets a full deadline of its own. */
  extend(): void;
}

/** Receives a GET's bytes as they arrive, cut at unit (block) boundaries, in order. */
export interface ChunkSink {
  /** Bytes [offset, offset + chunk.length) of one unit: a view of a body chunk nothing reuses, which the sink may keep (the cache writes it later). */
  data(offset: number, chunk: Uint8Array): void;
  /** Every byte of the unit [offset, offset + length) has been given to data(). */
  unit(offset: number, length: number): void;
  /** The unit at `offset` will not be completed by this GET (it failed or gave up). */
  lost(offset: number): void;
}

interface Job extends FetchJob {
  ahead: boolean;
  t0: number;
  deadlineAt: number;
  /** The first byte not delivered yet: a retry asks for [next, end) only. */
  next: number;
  unit: number;
  sink: ChunkSink;
  resolve: () => void;
  reject: (e: Error) => void;
}

/** Below this many bytes after its first chunk, a GET says nothing about bandwidth. */
const BANDWIDTH_SAMPLE_MIN = 64 * 1024;

export class Fetcher {
  /** Time from a GET's start to its first bytes (ms, moving average; the opener seeds it with its probe); null before any. */
  roundTripMs: number | null = null;
  /** Bytes per ms of a GET's transfer after its first bytes (moving average; 100 MB/s until measured). */
  bytesPerMs = 100_000;
  private active = 0;
  private readonly demand: Job[] = [];
  private readonly ahead: Job[] = [];
  private failing = false;
  private failures = 0;
  /** Set once a GET found the object changed; cleared by a later GET that succeeds. */
  changed: string | null = null;
  private readonly stop = new AbortController();

  constructor(private readonly store: ObjectStore, private readonly pin: ObjectVersion, private readonly policy: FetchPolicy,
    private readonly counters: RemoteCounters, private readonly log: (msg: string) => void) {}

  /** Number of GETs waiting or in flight that were sent ahead of a reader. */
  get aheadQueued(): number { return this.ahead.length; }

  /**
   * Bytes [start, end) of the pinned version, handed to `sink` as they arrive (cut into units of
   * `unit` bytes; the last may be shorter); the promise rejects with an NbdError (EIO) naming the
   * cause when the rest cannot be had. A retry starts again at the first unfinished unit.
   */
  fetch(start: number, end: number, ahead: boolean, unit: number, sink: ChunkSink): FetchJob {
    const now = Date.now();
    let resolve!: () => void, reject!: (e: Error) => void;
    const promise = new Promise<void>((res, rej) => { resolve = res; reject = rej; });
    const job: Job = {
      start, end, promise, ahead, t0: now, deadlineAt: now + this.policy.deadlineMs, resolve, reject, next: start, unit, sink,
      extend: () => { job.ahead = false; job.deadlineAt = Math.max(job.deadlineAt, Date.now() + this.policy.deadlineMs); },
    };
    (ahead ? this.ahead : this.demand).push(job);
    this.pump();
    return job;
  }

  private pump(): void {
    while (this.active < this.policy.maxInFlight) {
      // one slot stays free for reads that wait (unless only one is allowed)
      const job = this.demand.shift() ?? (this.active < Math.max(1, this.policy.maxInFlight - 1) ? this.ahead.shift() : undefined);
      if (job === undefined) return;
      this.active++;
      this.run(job).then(job.resolve, (e: Error) => this.fail(job, e)).finally(() => { this.active--; this.pump(); });
    }
  }

  private async run(job: Job): Promise<void> {
    const { deadlineMs, attemptTimeoutMs } = this.policy;
    for (let attempt = 0; ; attempt++) {
      if (this.stop.signal.aborted) throw eio(`${this.store.display}: closed`);
      this.counters.requests++;
      if (job.ahead) this.counters.readaheadRequests++;
      let pos = job.next; // the next byte expected in this attempt
      const t0 = performance.now();
      let first = 0, after = 0;
      const sink = (chunk: Uint8Array) => {
        this.counters.bytesFetched += chunk.length;
        if (first === 0) {
          first = performance.now();
          this.roundTripMs = this.roundTripMs === null ? first - t0 : 0.8 * this.roundTripMs + 0.2 * (first - t0);
        } else after += chunk.length;
        for (let off = 0; off < chunk.length;) {
          const unitEnd = Math.min(job.end, job.next + job.unit);
          const take = Math.min(chunk.length - off, unitEnd - pos);
          job.sink.data(pos, chunk.subarray(off, off + take));
          pos += take;
          off += take;
          if (pos === unitEnd) {
            const at = job.next;
            job.next = unitEnd;
            job.sink.unit(at, unitEnd - at);
          }
        }
      };
      try {
        await this.store.get(job.next, job.end, this.pin, this.stop.signal, attemptTimeoutMs, sink);
        const ms = performance.now() - first;
        if (after >= BANDWIDTH_SAMPLE_MIN && ms > 0) this.bytesPerMs = 0.8 * this.bytesPerMs + 0.2 * (after / ms);
        this.recovered();
        return;
      } catch (e) {
        if (this.stop.signal.aborted) throw eio(`${this.store.display}: closed`);
        const err = e instanceof RemoteError ? e : new RemoteError(`${this.store.display}: ${(e as Error).message}`, 0, true);
        if (err.changed) throw this.versionChanged(err);
        const left = job.deadlineAt - Date.now();
        if (!err.retryable || job.ahead || left <= 50) {
          const tries = attempt + 1;
          const fail = eio(`bytes ${job.next}-${job.end - 1} of ${err.message}${err.retryable && !job.ahead ? ` (gave up after ${tries} attempt${tries > 1 ? "s" : ""} in ${((Date.now() - job.t0) / 1000).toFixed(1)} s)` : ""}`);
          if (!job.ahead) {
            this.counters.errors++;
            this.log(`${fail.message}: the reads waiting for them get EIO`); // the server logs NbdErrors at debug level only
          }
          throw fail;
        }
        this.counters.retries++;
        this.failures++;
        if (!this.failing) {
          this.failing = true;
          this.log(`${err.message}; retrying with backoff for up to ${(deadlineMs / 1000).toFixed(0)} s per request`);
        }
        await sleep(Math.min(2000, 100 * 2 ** attempt, left) * (0.5 + Math.random() / 2), this.stop.signal);
      }
    }
  }

  private recovered(): void {
    if (this.changed !== null) {
      this.log(`${this.store.display} is the pinned version again (${describeVersion(this.pin)})`);
      this.changed = null;
    }
    if (!this.failing) return;
    this.failing = false;
    this.log(`${this.store.display} answers again (after ${this.failures} retried attempt${this.failures > 1 ? "s" : ""})`);
    this.failures = 0;
  }

  private versionChanged(err: RemoteError): Error {
    this.counters.versionMismatches++;
    this.counters.errors++;
    if (this.changed === null) {
      this.changed = err.message;
      this.log(`${err.message}; serving the pinned version (${describeVersion(this.pin)}) from the cache only: uncached reads fail with EIO until the object is restored or bun-nbd restarted`);
      void this.describeChange();
    }
    return eio(`${err.message} (pinned ${describeVersion(this.pin)}; uncached blocks cannot be read)`);
  }

  /** Log what the object is now (a 412 does not say), once per change. */
  private async describeChange(): Promise<void> {
    try {
      const now = await this.store.probe(Math.min(10_000, this.policy.attemptTimeoutMs));
      this.log(`${this.store.display} now: ${describeVersion(now)} (pinned: ${describeVersion(this.pin)})`);
    } catch (e) {
      this.log(`${this.store.display} now: ${(e as Error).message}`);
    }
  }

  private fail(job: Job, e: Error): void {
    if (job.next < job.end) job.sink.lost(job.next);
    job.reject(e);
  }

  /** Fail everything queued and stop retrying. */
  close(): void {
    this.stop.abort();
    for (const j of this.demand.splice(0)) this.fail(j, eio(`${this.store.display}: closed`));
    for (const j of this.ahead.splice(0)) this.fail(j, eio(`${this.store.display}: closed`));
  }
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(done, ms);
    function done() { clearTimeout(t); signal.removeEventListener("abort", done); resolve(); }
    signal.addEventListener("abort", done);
  });
}
