// The client's transport adapter (DESIGN.md: runtime-specific code behind an adapter). The
// handshake and the transmission phase see a `Conn`: the small part of a node:net Socket they use.
// Two implementations, each loaded only when chosen:
// - transport-bun.ts on Bun's native sockets (connect) when running under Bun: its data callback hands over a fresh
//   buffer per read with no stream machinery in between, and `rx.recv` reads the socket directly;
// - transport-node.ts on node:net (Node 20+): reads into one reused buffer per connection (onread).
// Nothing here imports a runtime API, so the library still loads under Node.
import type { NbdTarget } from "./uri.ts";

/** The socket operations the client needs (a node:net Socket satisfies it). */
export interface Conn {
  /** Queues bytes in order. The caller does not modify `data` afterwards (it may be sent later, without a copy). */
  write(data: Uint8Array): unknown;
  /** Sends whatever is queued, then a FIN. */
  end(): unknown;
  /** Closes at once; "close" follows (asynchronously). Idempotent. */
  destroy(): unknown;
  on(event: "error", f: (e: Error) => void): unknown;
  on(event: "end" | "close", f: () => void): unknown;
  on(event: "data", f: (b: Buffer) => void): unknown;
  off(event: "error", f: (e: Error) => void): unknown;
  off(event: "end" | "close", f: () => void): unknown;
}

/**
 * Where a connection's incoming bytes go: `on` sees `buf[0..n)`. It must copy whatever it keeps
 * unless `owned` is true (the buffer is never reused by the transport and may be kept as a view).
 */
export interface Rx {
  on: (buf: Buffer, n: number) => void;
  /** True when every buffer handed to `on` is fresh and never written again by the transport. */
  readonly owned: boolean;
  /**
   * Optional: receives what the socket holds right now straight into `dst[off, off+len)`, without
   * waiting and without passing through `on`. Returns the byte count; 0 means nothing is there now
   * (end of stream and errors then arrive through the usual events). Lets the receiver put READ
   * payloads where they belong with one kernel copy and no intermediate buffer.
   */
  recv?: (dst: Uint8Array, off: number, len: number) => number;
}

/** An open connection and its receive hook. */
export interface Opened {
  socket: Conn;
  rx: Rx;
}

/** Opens a Conn; fails with NbdDisconnectedError("CONNECT_FAILED") or NbdTimeoutError. */
export type Opener = (target: NbdTarget, timeoutMs: number) => Promise<Opened>;

let chosen: Promise<Opener> | null = null;

/** Whether this runtime is Bun (checked without naming a Bun API, so Node never loads the Bun adapter). */
export function runningUnderBun(): boolean {
  return typeof (globalThis as { Bun?: unknown }).Bun !== "undefined";
}

/** The transport for this runtime: transport-bun.ts under Bun (unless BUN_NBD_TRANSPORT=node), node:net elsewhere. */
function pick(): Promise<Opener> {
  const env = typeof process !== "undefined" ? process.env.BUN_NBD_TRANSPORT : undefined;
  if (runningUnderBun() && env !== "node") return import("./transport-bun.ts").then((m) => m.openBunConn);
  return import("./transport-node.ts").then((m) => m.openNodeConn);
}

/** Forces a transport for later connections ("auto": the runtime's own). For tests and benchmarks. */
export function useTransport(kind: "auto" | "bun" | "node"): void {
  if (kind === "bun" && !runningUnderBun()) throw new Error("the Bun transport needs Bun");
  chosen = kind === "auto" ? null
    : kind === "bun" ? import("./transport-bun.ts").then((m) => m.openBunConn)
    : import("./transport-node.ts").then((m) => m.openNodeConn);
}

/** Opens a connection to the target with this runtime's transport. */
export async function openConn(target: NbdTarget, timeoutMs: number): Promise<Opened> {
  const open = await (chosen ??= pick());
  return open(target, timeoutMs);
}
