// TLS credentials made for a test run with `openssl` and `psktool`, in the directory layout nbdkit,
// qemu and libnbd share: a CA, a server certificate for localhost/127.0.0.1/::1, a client
// certificate (CN alice), a second CA's client certificate, expired certificates, a key that does
// not match, a CRL revoking a client, and psktool key files. EC P-256 keys, so this takes well
// under a second.
import { copyFileSync, mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { runOk } from "./env.ts";

export interface Pki {
  root: string;
  /** Server side: ca-cert.pem, server-cert.pem, server-key.pem. */
  server: string;
  /** Server side with ca-crl.pem revoking the "revoked" client. */
  serverWithCrl: string;
  /** Server side whose server-cert.pem has expired. */
  serverExpired: string;
  /** Server side whose server-key.pem belongs to another certificate. */
  serverMismatch: string;
  /** Client side: ca-cert.pem, client-cert.pem (CN alice), client-key.pem. */
  client: string;
  /** Client side with only ca-cert.pem (no client certificate). */
  clientNoCert: string;
  /** Client certificate (CN mallory) signed by another CA. */
  clientOtherCa: string;
  /** Client certificate (CN alice) that has expired. */
  clientExpired: string;
  /** Client certificate (CN eve) listed in serverWithCrl's ca-crl.pem. */
  clientRevoked: string;
  /** A CA that signed nothing here: a client trusting only it rejects the server. */
  clientWrongCa: string;
  /** psktool files: alice's key, alice with a wrong key, bob (unknown to the server). */
  psk: string;
  pskWrongKey: string;
  pskUnknownUser: string;
  /** Directories with keys.psk (what qemu's tls-creds-psk reads). */
  pskDir: string;
  pskWrongKeyDir: string;
}

const ossl = (args: string[], cwd: string) => runOk(["openssl", ...args], { cwd, timeoutMs: 30_000 });

async function ca(dir: string, name: string, cn: string): Promise<void> {
  await ossl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", `${name}-key.pem`,
    "-out", `${name}-cert.pem`, "-days", "30", "-subj", `/CN=${cn}`,
    "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"], dir);
}

async function leaf(dir: string, name: string, cn: string, caName: string, kind: "server" | "client", days = 30): Promise<void> {
  const ext = kind === "server"
    ? "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n"
    : "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n";
  writeFileSync(join(dir, `${name}.ext`), ext);
  await ossl(["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", `${name}-key.pem`,
    "-out", `${name}.csr`, "-subj", `/CN=${cn}`], dir);
  // -days -1 makes a certificate whose notAfter is already past: expired.
  await ossl(["x509", "-req", "-in", `${name}.csr`, "-CA", `${caName}-cert.pem`, "-CAkey", `${caName}-key.pem`, "-CAcreateserial",
    "-out", `${name}-cert.pem`, "-days", String(days), "-extfile", `${name}.ext`], dir);
}

function layout(root: string, dir: string, files: Record<string, string>): string {
  const d = join(root, dir);
  mkdirSync(d, { recursive: true });
  for (const [to, from] of Object.entries(files)) copyFileSync(join(root, "work", from), join(d, to));
  return d;
}

/** Makes every credential under `root`. */
export async function makePki(root: string): Promise<Pki> {
  const w = join(root, "work");
  mkdirSync(w, { recursive: true });
  await ca(w, "ca", "bun-nbd test CA");
  await ca(w, "ca2", "another CA");
  await ca(w, "ca3", "unrelated CA");
  await leaf(w, "server", "localhost", "ca", "server");
  await leaf(w, "server-expired", "localhost", "ca", "server", -1);
  await leaf(w, "alice", "alice", "ca", "client");
  await leaf(w, "alice-expired", "alice", "ca", "client", -1);
  await leaf(w, "eve", "eve", "ca", "client");
  await leaf(w, "mallory", "mallory", "ca2", "client");
  // A CRL from the CA revoking eve (openssl ca needs a tiny database).
  writeFileSync(join(w, "index.txt"), "");
  writeFileSync(join(w, "crlnumber"), "01\n");
  writeFileSync(join(w, "ca.cnf"), `[ca]\ndefault_ca = d\n[d]\ndatabase = ${join(w, "index.txt")}\ncrlnumber = ${join(w, "crlnumber")}\ndefault_md = sha256\ndefault_crl_days = 30\n`);
  await ossl(["ca", "-config", "ca.cnf", "-revoke", "eve-cert.pem", "-keyfile", "ca-key.pem", "-cert", "ca-cert.pem"], w);
  await ossl(["ca", "-config", "ca.cnf", "-gencrl", "-keyfile", "ca-key.pem", "-cert", "ca-cert.pem", "-out", "crl.pem"], w);

  const serverFiles = { "ca-cert.pem": "ca-cert.pem", "server-cert.pem": "server-cert.pem", "server-key.pem": "server-key.pem" };
  const client = (cert: string) => ({ "ca-cert.pem": "ca-cert.pem", "client-cert.pem": `${cert}-cert.pem`, "client-key.pem": `${cert}-key.pem` });
  const pki: Pki = {
    root,
    server: layout(root, "server", serverFiles),
    serverWithCrl: layout(root, "server-crl", { ...serverFiles, "ca-crl.pem": "crl.pem" }),
    serverExpired: layout(root, "server-expired", { ...serverFiles, "server-cert.pem": "server-expired-cert.pem", "server-key.pem": "server-expired-key.pem" }),
    serverMismatch: layout(root, "server-mismatch", { ...serverFiles, "server-key.pem": "alice-key.pem" }),
    client: layout(root, "client", client("alice")),
    clientNoCert: layout(root, "client-nocert", { "ca-cert.pem": "ca-cert.pem" }),
    clientOtherCa: layout(root, "client-otherca", client("mallory")),
    clientExpired: layout(root, "client-expired", client("alice-expired")),
    clientRevoked: layout(root, "client-revoked", client("eve")),
    clientWrongCa: layout(root, "client-wrongca", { "ca-cert.pem": "ca3-cert.pem" }),
    psk: join(root, "psk", "keys.psk"),
    pskWrongKey: join(root, "psk-wrong", "keys.psk"),
    pskUnknownUser: join(root, "psk-bob", "keys.psk"),
    pskDir: join(root, "psk"),
    pskWrongKeyDir: join(root, "psk-wrong"),
  };
  for (const d of [pki.pskDir, pki.pskWrongKeyDir, join(root, "psk-bob")]) mkdirSync(d, { recursive: true });
  await runOk(["psktool", "-u", "alice", "-p", pki.psk], { timeoutMs: 30_000 });
  await runOk(["psktool", "-u", "alice", "-p", pki.pskWrongKey], { timeoutMs: 30_000 });
  await runOk(["psktool", "-u", "bob", "-p", pki.pskUnknownUser], { timeoutMs: 30_000 });
  return pki;
}
