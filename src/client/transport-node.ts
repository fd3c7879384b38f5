// The node:net transport (Node 20+, and Bun with BUN_NBD_TRANSPORT=node). Sockets are opened with
// `onread`, so the runtime reads into one reused buffer per connection instead of allocating a
// Buffer per chunk; the receiver copies what it keeps.
import { connect as netConnect } from "node:net";
import { NbdDisconnectedError, NbdTimeoutError } from "./errors.ts";
import type { Opened, Rx } from "./conn.ts";
import type { NbdTarget } from "./uri.ts";

/** Size of the per-connection receive buffer. */
const RX_BUFFER = 256 * 1024;

export function openNodeConn(target: NbdTarget, timeoutMs: number): Promise<Opened> {
  return new Promise((resolve, reject) => {
    const rx: Rx = { on: () => {}, owned: false };
    const rxBuf = Buffer.allocUnsafe(RX_BUFFER);
    const onread = {
      buffer: rxBuf,
      callback: (n: number) => {
        rx.on(rxBuf, n);
        return true;
      },
    };
    const socket = target.transport === "tcp"
      ? netConnect({ host: target.host, port: target.port, onread })
      : netConnect({ path: target.path, onread });
    const where = target.transport === "tcp" ? `${target.host}:${target.port}` : target.path;
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new NbdTimeoutError(`connecting to ${where} took longer than ${timeoutMs} ms`));
    }, timeoutMs);
    const onError = (err: Error) => {
      clearTimeout(timer);
      socket.destroy();
      reject(new NbdDisconnectedError(`cannot connect to ${where}: ${err.message}`, { cause: err }, "CONNECT_FAILED"));
    };
    socket.once("error", onError);
    socket.once("connect", () => {
      clearTimeout(timer);
      socket.off("error", onError);
      socket.setNoDelay(true);
      resolve({ socket, rx });
    });
  });
}
