// The client's TLS credentials, read when connecting to an nbds:// target, in libnbd's layout:
// ca-cert.pem (and client-cert.pem + client-key.pem for client authentication) in the
// tls-certificates directory, or one user's key from a psktool file. Plain data for a transport.
import { existsSync, readFileSync } from "node:fs";
import { userInfo } from "node:os";
import { join } from "node:path";
import { parsePskFile } from "../protocol/psk-file.ts";
import { NbdUsageError } from "./errors.ts";
import type { NbdTarget } from "./uri.ts";

/** What a transport needs to start TLS. */
export interface ClientTls {
  kind: "x509" | "psk";
  /** Sent as SNI and (X.509, when verifying) checked against the server's certificate. */
  hostname: string;
  verifyPeer: boolean;
  /** PEM text: the CA to trust (absent: the runtime's default CAs), this client's certificate and key. */
  ca?: string;
  cert?: string;
  key?: string;
  pskIdentity?: string;
  pskKey?: Uint8Array;
}

function read(file: string, what: string): string {
  try {
    return readFileSync(file, "utf8");
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new NbdUsageError("BAD_ARGUMENT", `cannot read ${what} ${file}: ${code === "ENOENT" ? "no such file" : code ?? (e as Error).message}`);
  }
}

function loginName(): string {
  try {
    return process.env.LOGNAME || process.env.USER || userInfo().username;
  } catch {
    return "";
  }
}

/** Reads the credentials `target.tls` names. Throws NbdUsageError naming the file or user. */
export function loadClientTls(target: NbdTarget): ClientTls {
  const t = target.tls!;
  const hostname = t.hostname ?? (target.transport === "tcp" ? target.host : "localhost");
  if (t.pskFile !== undefined) {
    const username = t.username ?? loginName();
    let users: Map<string, Uint8Array>;
    try {
      users = parsePskFile(read(t.pskFile, "the PSK file"), t.pskFile);
    } catch (e) {
      if (e instanceof NbdUsageError) throw e;
      throw new NbdUsageError("BAD_ARGUMENT", (e as Error).message);
    }
    const key = users.get(username);
    if (!key) throw new NbdUsageError("BAD_ARGUMENT", `${t.pskFile} has no key for user "${username}" (set tls-username= or the user part of the URI)`);
    return { kind: "psk", hostname, verifyPeer: false, pskIdentity: username, pskKey: key };
  }
  const out: ClientTls = { kind: "x509", hostname, verifyPeer: t.verifyPeer };
  if (t.certificates !== undefined) {
    const dir = t.certificates;
    const ca = join(dir, "ca-cert.pem");
    if (existsSync(ca) || t.verifyPeer) out.ca = read(ca, "the CA certificate");
    const cert = join(dir, "client-cert.pem");
    const key = join(dir, "client-key.pem");
    if (existsSync(cert)) {
      out.cert = read(cert, "the client certificate");
      out.key = read(key, "the client key");
    }
  }
  return out;
}
