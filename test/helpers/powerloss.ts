// The power-loss model of the overlay tests (CrashMonkey's, in small): a recording ImageFile logs
// every write and fdatasync an overlay issues, and crashStates() builds the file contents a power
// cut could leave: everything written before the last completed sync, plus any subset, in any
// order, of the writes issued after it, optionally torn at 512-byte sector boundaries.
import type { ImageFile } from "../../src/devices/qcow2/file.ts";

export const SECTOR = 512;

/** A file write, a completed sync (covering the writes issued before it started), or a test marker. */
export type Entry =
  | { kind: "write"; pos: number; data: Uint8Array }
  | { kind: "sync"; covers: number }
  | { kind: "mark"; tag: number };

/** Passes everything through to `inner` and logs writes (hole punches as zero writes) and syncs. */
export class RecordingFile implements ImageFile {
  readonly log: Entry[] = [];
  /** Writes logged so far (a sync started now covers these). */
  private writes = 0;

  constructor(private readonly inner: ImageFile) {}

  /** A marker in the log (the test's own events: an operation issued, a flush acknowledged). */
  mark(tag: number): void {
    this.log.push({ kind: "mark", tag });
  }

  read(buf: Uint8Array, off: number, len: number, pos: number): void { this.inner.read(buf, off, len, pos); }

  write(buf: Uint8Array, off: number, len: number, pos: number): void {
    this.inner.write(buf, off, len, pos);
    this.record(pos, buf.slice(off, off + len));
  }

  writeAll(buf: Uint8Array, pos: number): void {
    this.inner.writeAll(buf, pos);
    this.record(pos, buf.slice());
  }

  syncNow(): void {
    const covers = this.writes;
    this.inner.syncNow();
    this.log.push({ kind: "sync", covers });
  }

  async sync(): Promise<void> {
    const covers = this.writes;
    await this.inner.sync();
    this.log.push({ kind: "sync", covers });
  }

  size(): number { return this.inner.size(); }

  truncate(_len: number): void {
    throw new Error("RecordingFile: truncate is not modelled (the power-loss workloads never reset)");
  }

  punch(pos: number, len: number): void {
    this.inner.punch(pos, len);
    // after a crash the punched range holds its old bytes or zeros, like a write of zeros
    this.record(pos, new Uint8Array(len));
  }

  close(): void { this.inner.close(); }

  private record(pos: number, data: Uint8Array): void {
    this.log.push({ kind: "write", pos, data });
    this.writes++;
  }
}

/** A growable file image. */
export class FileImage {
  bytes: Uint8Array;
  length: number;
  constructor(initial: Uint8Array) {
    this.bytes = new Uint8Array(Math.max(initial.length * 2, 1 << 20));
    this.bytes.set(initial);
    this.length = initial.length;
  }
  apply(pos: number, data: Uint8Array): void {
    const end = pos + data.length;
    if (end > this.bytes.length) {
      const b = new Uint8Array(Math.max(end, this.bytes.length * 2));
      b.set(this.bytes.subarray(0, this.length));
      this.bytes = b;
    }
    this.bytes.set(data, pos);
    if (end > this.length) this.length = end;
  }
  /**
   * Apply `writes` in order, hand the result to `fn`, then put the image back as it was (cheaper
   * than a copy per crash state).
   */
  async with<T>(writes: { pos: number; data: Uint8Array }[], fn: (img: FileImage) => Promise<T>): Promise<T> {
    const length = this.length;
    const undo: { pos: number; old: Uint8Array }[] = [];
    for (const w of writes) {
      const end = Math.min(w.pos + w.data.length, this.length);
      undo.push({ pos: w.pos, old: w.pos < end ? this.bytes.slice(w.pos, end) : new Uint8Array(0) });
      this.apply(w.pos, w.data);
    }
    try {
      return await fn(this);
    } finally {
      for (let i = undo.length - 1; i >= 0; i--) this.bytes.set(undo[i]!.old, undo[i]!.pos);
      this.bytes.fill(0, length, this.length);
      this.length = length;
    }
  }
  view(): Uint8Array {
    return this.bytes.subarray(0, this.length);
  }
}

/** Cut a write into its 512-byte sectors (by file offset): each may reach the disk on its own. */
export function tear(w: { pos: number; data: Uint8Array }): { pos: number; data: Uint8Array }[] {
  const out: { pos: number; data: Uint8Array }[] = [];
  let p = w.pos;
  const end = w.pos + w.data.length;
  while (p < end) {
    const e = Math.min(end, (Math.floor(p / SECTOR) + 1) * SECTOR);
    out.push({ pos: p, data: w.data.subarray(p - w.pos, e - w.pos) });
    p = e;
  }
  return out;
}

/** A crash point: the log up to `at`, what is durable there and what may or may not have reached the disk. */
export interface CrashPoint {
  /** Entries [0, at) happened. */
  at: number;
  /** Writes (indices into the write list) durable at `at`: [0, durable). */
  durable: number;
  /** Writes issued after the last completed sync, in issue order. */
  pending: { pos: number; data: Uint8Array }[];
}

/**
 * Walk the log and call `visit` at each crash point chosen by `pick(at, isBeforeSync)`, with the
 * file image holding exactly the durable writes. Points are visited in log order; `visit` must leave
 * the image as it found it (FileImage.with builds a state and undoes it).
 */
export async function walkCrashPoints(initial: Uint8Array, log: Entry[], pick: (at: number, beforeSync: boolean) => boolean,
  visit: (p: CrashPoint, durableImage: FileImage) => Promise<void>): Promise<void> {
  const writes: { pos: number; data: Uint8Array }[] = [];
  const img = new FileImage(initial);
  let applied = 0; // writes applied to img
  let durable = 0;
  for (let at = 0; at <= log.length; at++) {
    const e = at < log.length ? log[at]! : undefined;
    if (pick(at, e?.kind === "sync" || e === undefined)) {
      await visit({ at, durable, pending: writes.slice(durable) }, img);
    }
    if (e === undefined) break;
    if (e.kind === "write") writes.push({ pos: e.pos, data: e.data });
    else if (e.kind === "sync" && e.covers > durable) {
      durable = e.covers;
      for (; applied < durable; applied++) img.apply(writes[applied]!.pos, writes[applied]!.data);
    }
  }
}

/** Small deterministic generator for subsets and orders. */
export interface Rand { int(n: number): number }

/**
 * The states to try at one crash point: all pending writes lost, all in order, all in reverse order,
 * then (while under `max`) each one alone and all but each one, and `random` random subsets in random
 * order, every other one drawn over 512-byte sectors (torn writes) when `torn` is set. Each state is
 * a list of writes to apply in order on top of the durable image.
 */
export function statesFor(pending: { pos: number; data: Uint8Array }[], rng: Rand, random: number, torn: boolean,
  max: number): { name: string; torn: boolean; writes: { pos: number; data: Uint8Array }[] }[] {
  const m = pending.length;
  const out: { name: string; torn: boolean; writes: { pos: number; data: Uint8Array }[] }[] = [{ name: "none", torn: false, writes: [] }];
  if (m === 0) return out;
  out.push({ name: "all", torn: false, writes: pending });
  if (m > 1) out.push({ name: "all, reversed", torn: false, writes: pending.slice().reverse() });
  const room = max - out.length - random;
  if (m > 1 && room >= 2 * m) {
    for (let i = 0; i < m; i++) out.push({ name: `only #${i}`, torn: false, writes: [pending[i]!] });
    for (let i = 0; i < m; i++) out.push({ name: `all but #${i}`, torn: false, writes: pending.filter((_, k) => k !== i) });
  }
  const sectors = torn ? pending.flatMap(tear) : pending;
  for (let r = 0; r < random && out.length < max; r++) {
    const t = torn && r % 2 === 1;
    const units = t ? sectors : pending;
    const chosen = units.filter(() => rng.int(2) === 0);
    for (let i = chosen.length - 1; i > 0; i--) {
      const j = rng.int(i + 1);
      [chosen[i], chosen[j]] = [chosen[j]!, chosen[i]!];
    }
    out.push({ name: `${t ? "torn " : ""}random #${r} (${chosen.length} of ${units.length}${t ? " sectors" : " writes"})`, torn: t, writes: chosen });
  }
  return out;
}
