// Requests in flight on one connection: what each carries (Req), the table that gives out cookies
// (the index in the table, reused once answered), finds a reply's request, notices missed
// deadlines and fails them all at once. Plus what replies fill in: Extent, ClientStats.

/** One extent of a metadata context: `flags` is the context's status (for base:allocation, NBD_STATE_HOLE/ZERO bits). */
export interface Extent {
  offset: number;
  length: number;
  flags: number;
}

/** Counters of what the server sent (cheap integer increments; handy for tests and tuning). */
export interface ClientStats {
  /** Requests sent (after splitting). */
  requests: number;
  simpleReplies: number;
  dataChunks: number;
  holeChunks: number;
  blockStatusChunks: number;
  errorChunks: number;
}

/** One request on the wire, from submission until its reply is complete. */
export interface Req {
  id: number;
  type: number;
  flags: number;
  offset: number;
  length: number;
  buf: Uint8Array | null;
  /** READ by views (NbdClient.readViews): the data as views of the received chunks, and where each goes. */
  views: Uint8Array[] | null;
  viewPos: number[] | null;
  /** Bytes of READ data (or holes) received. */
  got: number;
  error: Error | null;
  deadline: number;
  extents: Map<string, Extent[]> | null;
  resolve: (v: never) => void;
  reject: (e: Error) => void;
}

/** The requests in flight, by cookie. Cookies are small integers (the high 32 bits stay 0). */
export class RequestTable {
  /** Request by cookie; holes are free cookies. */
  readonly byId: (Req | undefined)[] = [];
  private readonly freeIds: number[] = [];
  /** Requests sent and not yet answered. */
  pending = 0;
  private idleWaiters: (() => void)[] = [];

  /** Enters a request under a free cookie (the last one freed, else a new one). */
  add(
    type: number, flags: number, offset: number, length: number, buf: Uint8Array | null, views: boolean, deadline: number,
    resolve: (v: never) => void, reject: (e: Error) => void,
  ): Req {
    const id = this.freeIds.length ? this.freeIds.pop()! : this.byId.length;
    const req: Req = {
      id, type, flags, offset, length, buf, views: views ? [] : null, viewPos: views ? [] : null, got: 0, error: null,
      deadline,
      extents: null,
      resolve,
      reject,
    };
    this.byId[id] = req;
    this.pending++;
    return req;
  }

  /** Takes an answered request out (its cookie becomes free); the caller settles it. */
  remove(r: Req): void {
    this.byId[r.id] = undefined;
    this.freeIds.push(r.id);
    this.pending--;
  }

  /** The first request whose deadline passed, if any. */
  overdue(now: number): Req | undefined {
    for (const r of this.byId) if (r && r.deadline < now) return r;
    return undefined;
  }

  /** Rejects every request in flight with `err` and empties the table. */
  rejectAll(err: Error): void {
    const reqs = this.byId;
    for (let i = 0; i < reqs.length; i++) {
      const r = reqs[i];
      if (r) {
        reqs[i] = undefined;
        r.reject(err);
      }
    }
    this.pending = 0;
    this.freeIds.length = 0;
    reqs.length = 0;
    this.wakeIdle();
  }

  /** Resolves once nothing is in flight (or the table was emptied by a failure). */
  idle(): Promise<void> {
    return new Promise<void>((r) => this.idleWaiters.push(r));
  }

  wakeIdle(): void {
    const w = this.idleWaiters;
    if (w.length) {
      this.idleWaiters = [];
      for (const f of w) f();
    }
  }
}

/** A READ's views in offset order (structured replies may send its chunks in any order). */
export function orderViews(views: Uint8Array[], pos: number[]): Uint8Array[] {
  let sorted = true;
  for (let i = 1; i < pos.length; i++) if (pos[i]! < pos[i - 1]!) sorted = false;
  if (sorted) return views;
  return views.map((v, i) => [pos[i]!, v] as const).sort((a, b) => a[0] - b[0]).map((e) => e[1]);
}
