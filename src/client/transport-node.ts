// The node:net transport (Node 20+, and Bun with BUN_NBD_TRANSPORT=node). Sockets are opened with
// `onread`, so the runtime reads into one reused buffer per connection instead of allocating a
// Buffer per chunk; the receiver copies what it keeps. STARTTLS wraps the socket in node:tls
// (X.509, and PSK through pskCallback).
import { connect as netConnect, type Socket } from "node:net";
import { connect as tlsConnect } from "node:tls";
import { NbdDisconnectedError, NbdTimeoutError, NbdUsageError } from "./errors.ts";
import type { Opened, Rx } from "./conn.ts";
import type { ClientTls } from "./tls.ts";
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
      resolve({ socket, rx, startTls: (tls, ms) => startTls(socket, rx, tls, ms) });
    });
  });
}

/** TLS over the plain socket (after STARTTLS's ACK); resolves once the handshake is done. */
function startTls(plain: Socket, plainRx: Rx, tls: ClientTls, timeoutMs: number): Promise<Opened> {
  plainRx.on = () => {};
  const psk = tls.kind === "psk";
  if (psk && typeof process.versions.bun === "string") {
    plain.destroy();
    return Promise.reject(new NbdUsageError("UNSUPPORTED", "TLS-PSK is not in Bun's node:tls (BoringSSL): use Bun's own transport (unset BUN_NBD_TRANSPORT) or Node"));
  }
  return new Promise((resolve, reject) => {
    const s = tlsConnect({
      socket: plain,
      servername: /^[\d.]+$|:/.test(tls.hostname) ? undefined : tls.hostname,
      minVersion: "TLSv1.2",
      ...(psk ? {
        // Node offers PSK only with TLS 1.2 suites (its pskCallback is not used for TLS 1.3).
        maxVersion: "TLSv1.2",
        pskCallback: () => ({ psk: Buffer.from(tls.pskKey!), identity: tls.pskIdentity! }),
        ciphers: "ECDHE-PSK-CHACHA20-POLY1305:DHE-PSK-AES128-GCM-SHA256:PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384",
        checkServerIdentity: () => undefined,
      } : {
        ca: tls.ca, cert: tls.cert, key: tls.key, rejectUnauthorized: tls.verifyPeer,
        ...(tls.verifyPeer ? { host: tls.hostname } : { checkServerIdentity: () => undefined }),
      }),
    });
    const rx: Rx = { on: () => {}, owned: false };
    const timer = setTimeout(() => { s.destroy(); reject(new NbdTimeoutError(`the TLS handshake took longer than ${timeoutMs} ms`)); }, timeoutMs);
    const onError = (e: Error) => {
      clearTimeout(timer);
      s.destroy();
      reject(new NbdDisconnectedError(`TLS handshake with the server failed: ${e.message}`, { cause: e }, "TLS_FAILED"));
    };
    const onClose = () => onError(new Error("the server closed the connection"));
    s.once("error", onError);
    s.once("close", onClose);
    s.once("secureConnect", () => {
      clearTimeout(timer);
      s.off("error", onError);
      s.off("close", onClose);
      s.on("data", (b: Buffer) => rx.on(b, b.length));
      resolve({ socket: s, rx });
    });
  });
}
