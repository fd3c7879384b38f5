// Human-readable formatting shared by the CLI commands.
const UNITS = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

/** 4194304 -> "4 MiB", 1536 -> "1.5 KiB", 100 -> "100 bytes". */
export function formatSize(n: number): string {
  let i = 0;
  let v = n;
  while (v >= 1024 && i < UNITS.length - 1) { v /= 1024; i++; }
  if (i === 0) return `${n} bytes`;
  const s = v >= 100 || Number.isInteger(v) ? v.toFixed(0) : v.toFixed(1);
  return `${s} ${UNITS[i]}`;
}
