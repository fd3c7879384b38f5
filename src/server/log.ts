// A tiny leveled logger. Debug lines are only formatted when enabled: callers test
// `log.debugEnabled` before building the string, so the hot path pays one boolean check.
export interface Logger {
  readonly debugEnabled: boolean;
  debug(msg: string): void;
  info(msg: string): void;
  warn(msg: string): void;
  error(msg: string): void;
}

export type Level = "debug" | "info" | "warn" | "error" | "silent";
const order: Record<Level, number> = { debug: 0, info: 1, warn: 2, error: 3, silent: 4 };

export function createLogger(level: Level = "info", write: (line: string) => void = (l) => process.stderr.write(l + "\n")): Logger {
  const min = order[level];
  const stamp = () => new Date().toISOString().slice(11, 23);
  return {
    debugEnabled: min <= 0,
    debug: (m) => { if (min <= 0) write(`${stamp()} debug ${m}`); },
    info: (m) => { if (min <= 1) write(`${stamp()} ${m}`); },
    warn: (m) => { if (min <= 2) write(`${stamp()} warning: ${m}`); },
    error: (m) => { if (min <= 3) write(`${stamp()} error: ${m}`); },
  };
}

export const silentLogger: Logger = createLogger("silent");
