// Picks the client's transport (the one factory; the interface is in conn.ts). Each
// implementation is loaded by a dynamic import only when chosen, so Node never loads the Bun one:
// - transport-bun.ts on Bun's native sockets (connect) when running under Bun: its data callback hands over a fresh
//   buffer per read with no stream machinery in between, and `rx.recv` reads the socket directly;
// - transport-node.ts on node:net (Node 20+): reads into one reused buffer per connection (onread).
// The implementations import conn.ts only, never this file. Nothing here names a runtime API.
import type { Opened, Opener } from "./conn.ts";
import type { NbdTarget } from "./uri.ts";

let chosen: Promise<Opener> | null = null;

/** Whether this runtime is Bun (checked without naming a Bun API, so Node never loads the Bun adapter). */
export function runningUnderBun(): boolean {
  return typeof (globalThis as { Bun?: unknown }).Bun !== "undefined";
}

const bunOpener = (): Promise<Opener> => import("./transport-bun.ts").then((m) => m.openBunConn);
const nodeOpener = (): Promise<Opener> => import("./transport-node.ts").then((m) => m.openNodeConn);

/** The transport for this runtime: transport-bun.ts under Bun (unless BUN_NBD_TRANSPORT=node), node:net elsewhere. */
function pick(): Promise<Opener> {
  const env = typeof process !== "undefined" ? process.env.BUN_NBD_TRANSPORT : undefined;
  return runningUnderBun() && env !== "node" ? bunOpener() : nodeOpener();
}

/** Forces a transport for later connections ("auto": the runtime's own). For tests and benchmarks. */
export function useTransport(kind: "auto" | "bun" | "node"): void {
  if (kind === "bun" && !runningUnderBun()) throw new Error("the Bun transport needs Bun");
  chosen = kind === "auto" ? null : kind === "bun" ? bunOpener() : nodeOpener();
}

/** Opens a connection to the target with this runtime's transport. */
export async function openConn(target: NbdTarget, timeoutMs: number): Promise<Opened> {
  const open = await (chosen ??= pick());
  return open(target, timeoutMs);
}
