// A progress bar for long transfers on stderr: redrawn in place on a terminal (bytes, percent,
// rate, time left), a plain line every 10% otherwise, nothing with `quiet`. Wiring only.
import { formatSize } from "./format.ts";

export interface Progress {
  /** `done` bytes of the total so far. */
  update(done: number): void;
  /** The last line (100%, the average rate). */
  finish(): void;
}

export function progressBar(total: number, label: string, quiet = false, out: NodeJS.WriteStream = process.stderr): Progress {
  const tty = !!out.isTTY;
  const t0 = performance.now();
  let shownAt = 0, lastDecile = -1, done = 0;
  const line = (n: number) => {
    const secs = (performance.now() - t0) / 1000;
    const pct = total === 0 ? 100 : Math.min(100, Math.floor((n * 100) / total));
    const rate = secs > 0 ? n / secs : 0;
    const left = rate > 0 && n < total ? ` ${Math.ceil((total - n) / rate)} s left` : "";
    const width = 28;
    const fill = Math.round((pct * width) / 100);
    return `${label} [${"=".repeat(fill)}${" ".repeat(width - fill)}] ${String(pct).padStart(3)}% ${formatSize(n)} of ${formatSize(total)}, ${formatSize(Math.round(rate))}/s${left}`;
  };
  return {
    update(n: number) {
      done = n;
      if (quiet) return;
      const now = performance.now();
      if (tty) {
        if (now - shownAt < 200) return;
        shownAt = now;
        out.write(`\r${line(n)}\x1b[K`);
        return;
      }
      const decile = total === 0 ? 10 : Math.floor((n * 10) / total);
      if (decile === lastDecile) return;
      lastDecile = decile;
      out.write(`${line(n)}\n`);
    },
    finish() {
      if (quiet) return;
      out.write(tty ? `\r${line(done)}\x1b[K\n` : lastDecile === 10 ? "" : `${line(done)}\n`);
    },
  };
}
