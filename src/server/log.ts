// A tiny leveled logger, as text lines or as one JSON object per line (journald, log shippers).
// Debug lines are only formatted when enabled: callers test `log.debugEnabled` before building the
// string, so the hot path pays one boolean check. Fields (peer, export...) only appear in JSON.
export interface LogFields {
  /** The connection's number, as the text lines show it ("[12]"). */
  conn?: number;
  peer?: string;
  /** The TLS identity ("psk vm1", "x509 CN"), when there is one. */
  tls?: string;
  export?: string;
  command?: string;
  errno?: string;
  /** serve --workers: which process wrote the line. */
  worker?: number;
}

export interface Logger {
  readonly debugEnabled: boolean;
  debug(msg: string, fields?: LogFields): void;
  info(msg: string, fields?: LogFields): void;
  warn(msg: string, fields?: LogFields): void;
  error(msg: string, fields?: LogFields): void;
}

export type Level = "debug" | "info" | "warn" | "error" | "silent";
export type LogFormat = "text" | "json";
const order: Record<Level, number> = { debug: 0, info: 1, warn: 2, error: 3, silent: 4 };

/**
 * `worker`: this process is serve --workers' process number `worker` (0 is the supervisor's); its
 * lines say so ("w2 " in text, "worker": 2 in JSON), since every process writes to one stderr.
 */
export function createLogger(level: Level = "info", write: (line: string) => void = (l) => process.stderr.write(l + "\n"),
  format: LogFormat = "text", worker?: number): Logger {
  const min = order[level];
  const plain = format === "json" ? jsonLine : textLine;
  const line = worker === undefined ? plain
    : format === "json" ? (lv: string, m: string, f?: LogFields) => plain(lv, m, { worker, ...f })
    : (lv: string, m: string, f?: LogFields) => plain(lv, `w${worker} ${m}`, f);
  return {
    debugEnabled: min <= 0,
    debug: (m, f) => { if (min <= 0) write(line("debug", m, f)); },
    info: (m, f) => { if (min <= 1) write(line("info", m, f)); },
    warn: (m, f) => { if (min <= 2) write(line("warning", m, f)); },
    error: (m, f) => { if (min <= 3) write(line("error", m, f)); },
  };
}

function textLine(level: string, msg: string): string {
  const stamp = new Date().toISOString().slice(11, 23);
  return level === "info" ? `${stamp} ${msg}` : `${stamp} ${level}${level === "debug" ? "" : ":"} ${msg}`;
}

function jsonLine(level: string, msg: string, f?: LogFields): string {
  return JSON.stringify({ time: new Date().toISOString(), level, message: msg, ...f });
}

export const silentLogger: Logger = createLogger("silent");
