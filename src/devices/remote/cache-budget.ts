// One budget per cache directory (--cache-size bounds the directory, not each image): shared by
// every image this process has open there and by the entries on disk that no process holds (left
// by earlier runs, or by images closed since). Room for new bytes comes first from those entries,
// least recently used first and whole, then from the least recently used block of any image open
// here, so that the second image served does not grow past the bound while the first one keeps
// what it has. Entries another process holds open are that process's to bound.
import { resolve } from "node:path";
import { removeLeastRecent } from "./cache-dir.ts";

/** An open image's cache, as the budget sees it. */
export interface BudgetMember {
  /** Bytes it holds or has reserved. */
  readonly used: number;
  /** When its least recently used evictable block was last used (a tick of its budget), or Infinity. */
  oldestUse(): number;
  /** Evict that block. */
  evictOldest(): void;
}

export class DirBudget {
  private static readonly shared = new Map<string, DirBudget>();

  /** The budget of `dir` (one per directory in this process), or a private one for a throw-away cache (dir null). */
  static of(dir: string | null, bytes: number, log: (msg: string) => void): DirBudget {
    if (dir === null) return new DirBudget(null, bytes, log);
    dir = resolve(dir);
    let b = DirBudget.shared.get(dir);
    if (b === undefined) DirBudget.shared.set(dir, b = new DirBudget(dir, bytes, log));
    else b.bytes = Math.min(b.bytes, bytes); // images opened with different sizes: the smallest holds
    return b;
  }

  /** Bytes of the directory's entries that no process holds open (as last counted; pruning keeps it current). */
  onDisk = 0;
  private readonly members = new Set<BudgetMember>();
  private clock = 0;
  /** Entry ids of this budget's open members, never removed from disk. */
  private readonly open = new Set<string>();

  private constructor(readonly dir: string | null, public bytes: number, private readonly log: (msg: string) => void) {}

  /** A tick for "used now": later uses get larger ones, across every image sharing the budget. */
  now(): number { return ++this.clock; }

  join(m: BudgetMember, id: string | null): void {
    this.members.add(m);
    if (id !== null) this.open.add(id);
  }

  /** `m` closed: its entry stays on disk, now one of those room can be made from. */
  leave(m: BudgetMember, id: string | null): void {
    if (!this.members.delete(m)) return;
    if (id !== null) this.open.delete(id);
    if (this.dir !== null) this.onDisk += m.used;
  }

  /**
   * Make room for `extra` more bytes: remove entries on disk, least recently used first, then
   * evict the least recently used blocks of the open images, until the whole fits (or nothing is
   * left that may go: blocks being filled or sent are kept).
   */
  makeRoom(extra: number): void {
    for (;;) {
      let total = this.onDisk + extra;
      for (const m of this.members) total += m.used;
      if (total <= this.bytes) return;
      if (this.onDisk > 0 && this.dir !== null) {
        const freed = removeLeastRecent(this.dir, this.open, this.log);
        this.onDisk = freed === null ? 0 : Math.max(0, this.onDisk - freed); // null: none left that may go
        continue;
      }
      let victim: BudgetMember | null = null, oldest = Infinity;
      for (const m of this.members) {
        const t = m.oldestUse();
        if (t < oldest) { oldest = t; victim = m; }
      }
      if (victim === null) return;
      victim.evictOldest();
    }
  }
}
