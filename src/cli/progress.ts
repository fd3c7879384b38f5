// A one-line progress bar on stderr, drawn only when stderr is a terminal (quiet in scripts,
// logs and CI) and at most ten times a second.
import { formatSize } from "./format.ts";

export function progressBar(label: string, stream: NodeJS.WriteStream = process.stderr): ((done: number, total: number) => void) | undefined {
  if (!stream.isTTY) return undefined;
  const t0 = performance.now();
  let last = 0;
  return (done, total) => {
    const now = performance.now();
    if (done < total && now - last < 100) return;
    last = now;
    const frac = total > 0 ? done / total : 1;
    const width = 30;
    const fill = Math.round(frac * width);
    const rate = done / Math.max((now - t0) / 1000, 1e-3);
    const line = `${label} [${"#".repeat(fill)}${".".repeat(width - fill)}] ${(frac * 100).toFixed(0).padStart(3)}% ${formatSize(done)} / ${formatSize(total)}, ${formatSize(rate)}/s`;
    stream.write(`\r${line}\x1b[K${done >= total ? "\n" : ""}`);
  };
}
