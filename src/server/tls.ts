// The server's TLS credentials, read and checked at start (and again on reload): the X.509 layout
// nbdkit, qemu and libnbd share (ca-cert.pem, server-cert.pem, server-key.pem, optional ca-crl.pem
// in one directory) or a psktool key file. Every problem is a configuration error naming the file.
import { createPrivateKey, X509Certificate } from "node:crypto";
import { readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { createSecureContext } from "node:tls";
import { parsePskFile } from "../protocol/psk-file.ts";
import { TlsContext } from "../sys/tls-engine.ts";
import type { CheckedSettings } from "./settings.ts";

export interface X509Credentials {
  kind: "x509";
  key: string;
  cert: string;
  /** CA that signs client certificates (needed with verifyPeer). */
  ca: string | null;
  crl: string | null;
  verifyPeer: boolean;
  /** One line for the start-up log: subject and expiry. */
  summary: string;
}

export interface PskCredentials {
  kind: "psk";
  /** The OpenSSL context holding the keys (the only place they live). */
  engine: TlsContext;
  summary: string;
}

export type ServerCredentials = X509Credentials | PskCredentials;

function readText(file: string): string {
  try {
    return readFileSync(file, "utf8");
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === "ENOENT") throw new Error(`${file} is missing`);
    if (code === "EACCES") throw new Error(`cannot read ${file}: permission denied`);
    throw new Error(`cannot read ${file}: ${(e as Error).message}`);
  }
}

function certificate(file: string, now: Date): X509Certificate {
  const text = readText(file);
  let c: X509Certificate;
  try {
    c = new X509Certificate(text);
  } catch (e) {
    throw new Error(`${file} is not a PEM certificate (${(e as Error).message})`);
  }
  if (c.validToDate.getTime() < now.getTime()) throw new Error(`${file} expired on ${c.validToDate.toISOString()}`);
  if (c.validFromDate.getTime() > now.getTime()) throw new Error(`${file} is not valid before ${c.validFromDate.toISOString()}`);
  return c;
}

/** Reads and checks the credentials the settings name (null with TLS off). Throws naming the file. */
export function loadServerCredentials(s: CheckedSettings, now = new Date()): ServerCredentials | null {
  if (s.tls === "off") return null;
  if (s.tlsPsk !== null) {
    const users = parsePskFile(readText(s.tlsPsk), s.tlsPsk);
    const engine = new TlsContext({ role: "server", pskUsers: users });
    return { kind: "psk", engine, summary: `pre-shared keys for ${users.size} user${users.size > 1 ? "s" : ""} from ${s.tlsPsk}` };
  }
  const dir = s.tlsCertificates!;
  let isDir = false;
  try { isDir = statSync(dir).isDirectory(); } catch { /* reported below */ }
  if (!isDir) throw new Error(`tls-certificates: ${dir} is not a directory (it should hold ca-cert.pem, server-cert.pem and server-key.pem)`);
  const certFile = join(dir, "server-cert.pem");
  const keyFile = join(dir, "server-key.pem");
  const caFile = join(dir, "ca-cert.pem");
  const crlFile = join(dir, "ca-crl.pem");
  const cert = certificate(certFile, now);
  const keyText = readText(keyFile);
  let key;
  try {
    key = createPrivateKey(keyText);
  } catch (e) {
    throw new Error(`${keyFile} is not a PEM private key (${(e as Error).message})`);
  }
  if (!cert.checkPrivateKey(key)) throw new Error(`${keyFile} does not match ${certFile} (the key belongs to another certificate)`);
  const exists = (f: string) => { try { statSync(f); return true; } catch { return false; } };
  let ca: string | null = null;
  if (exists(caFile) || s.tlsVerifyPeer) {
    certificate(caFile, now);
    ca = readText(caFile);
  }
  const crl = exists(crlFile) ? readText(crlFile) : null;
  const certText = readText(certFile);
  try {
    // What Bun's TLS will be given must load as a whole (a bad CRL shows up only here).
    createSecureContext({ key: keyText, cert: certText, ...(ca ? { ca } : {}), ...(crl ? { crl } : {}) });
  } catch (e) {
    throw new Error(`the certificates in ${dir} do not load together: ${(e as Error).message}`);
  }
  return {
    kind: "x509", key: keyText, cert: certText, ca, crl, verifyPeer: s.tlsVerifyPeer,
    summary: `certificate ${cert.subject.replace(/\n/g, ", ")} (expires ${cert.validToDate.toISOString().slice(0, 10)})${s.tlsVerifyPeer ? ", client certificates required" : ""}${crl ? ", with a CRL" : ""}`,
  };
}
