// bun-nbd serving over TLS to real clients, with certificates and keys made in the test: nbdinfo,
// nbdsh (libnbd) and nbdcopy (both directions, byte-exact) with X.509 and PSK; qemu-img info and
// convert with tls-creds-x509 / tls-creds-psk objects (and TLS 1.2 PSK through a GnuTLS priority);
// the refusals (plain client on a TLS-only server, no client certificate, another CA's, an
// expired or revoked one, a wrong PSK key, an unknown PSK user, an old protocol version), each
// with its log line; and the configuration errors caught at start.
import * as assert from "uvu/assert";
import { copyFileSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { connect as tlsConnect } from "node:tls";
import { join } from "node:path";
import { connect } from "../src/client/index.ts";
import { bytesEqual, deadline, rejects } from "./helpers/assert.ts";
import { BUN, CLI, need, run, runOk, scratch } from "./helpers/env.ts";
import { serve, type Served, waitForOutput } from "./helpers/server.ts";
import { makePki, type Pki } from "./helpers/tls.ts";
import { TlsWire } from "./helpers/tls-wire.ts";
import { guardedSuite, nbdpy } from "./interop-lib.ts";
import { pattern } from "./robustness-wire.ts";

const dir = scratch("bun-nbd-tls-server-");
const SIZE = 8 * 1024 * 1024;
const img = join(dir, "disk.img");
let pki: Pki;
let x509: Served;
let verify: Served; // --tls-verify-peer, with a CRL
let psk: Served;

const { test, after, run: runSuite } = guardedSuite("tls-server", async () => {
  need("openssl", "psktool", "nbdinfo", "nbdcopy", "nbdsh", "qemu-img");
  writeFileSync(img, pattern(SIZE, 0, 5));
  pki = await makePki(join(dir, "pki"));
  x509 = await serve(["--tls=require", "--tls-certificates", pki.server, img]);
  verify = await serve(["--tls=require", "--tls-certificates", pki.serverWithCrl, "--tls-verify-peer", img]);
  psk = await serve(["--tls=require", "--tls-psk", pki.psk, img]);
});

after(async () => {
  for (const s of [x509, verify, psk]) await s?.stop();
});

const x509Uri = (s: Served, certs: string) => `nbds://localhost:${s.port}/disk?tls-certificates=${certs}`;
const pskUri = (s: Served, file: string, user = "alice") => `nbds://${user}@localhost:${s.port}/disk?tls-psk-file=${file}`;


test("nbdinfo over TLS: X.509 and PSK, over TCP and a unix socket", () => deadline(30_000, "nbdinfo", async () => {
  const sock = join(dir, "tls.sock");
  const unix = await serve(["--tls=require", "--tls-certificates", pki.server, img], { socket: sock });
  try {
    for (const uri of [x509Uri(x509, pki.client), pskUri(psk, pki.psk), `nbds+unix:///disk?socket=${sock}&tls-certificates=${pki.client}`]) {
      const j = JSON.parse((await runOk(["nbdinfo", "--json", uri])).stdout);
      assert.is(j.TLS, true, `${uri}: TLS negotiated`);
      assert.is(j.exports[0]["export-size"], SIZE);
    }
  } finally {
    await unix.stop();
  }
  await waitForOutput(x509, /TLS established \(TLSv1\.3 [A-Z0-9_]+\), no client certificate/);
  await waitForOutput(psk, /TLS established \(TLSv1\.3 TLS_AES_128_GCM_SHA256\), PSK user "alice"/);
}));

test("nbdcopy over TLS, both directions, byte-exact (X.509 and PSK)", () => deadline(60_000, "nbdcopy", async () => {
  for (const [name, uri] of [["x509", x509Uri(x509, pki.client)], ["psk", pskUri(psk, pki.psk)]] as const) {
    const out = join(dir, `copy-${name}.img`);
    await runOk(["nbdcopy", uri, out]);
    bytesEqual(readFileSync(out), readFileSync(img), `nbdcopy ${name} read`);
    // Write a new pattern through TLS and read the file directly.
    const src = join(dir, `src-${name}.img`);
    const data = pattern(SIZE, 0, name === "x509" ? 11 : 13);
    writeFileSync(src, data);
    await runOk(["nbdcopy", src, uri]);
    bytesEqual(readFileSync(img), data, `nbdcopy ${name} write`);
  }
  writeFileSync(img, pattern(SIZE, 0, 5));
}));

test("nbdsh (libnbd) over TLS: pread, pwrite, flush, and TLS reported negotiated", () => deadline(30_000, "nbdsh", async () => {
  for (const uri of [x509Uri(x509, pki.client), pskUri(psk, pki.psk)]) {
    const out = await nbdpy(uri, [
      "h.set_uri_allow_local_file(True)", // libnbd's guard for ?tls-certificates= and ?tls-psk-file=
      "h.connect_uri(uri)",
      "out['tls'] = h.get_tls_negotiated()",
      "h.pwrite(b'\\xab' * 4096, 65536)",
      "h.flush()",
      "out['read'] = h.pread(4096, 65536).hex()",
      "out['first'] = h.pread(16, 0).hex()",
    ].join("\n"), { connect: false });
    assert.is(out.tls, true);
    assert.is(out.read, "ab".repeat(4096));
    assert.is(out.first, pattern(16, 0, 5).toString("hex"));
  }
  writeFileSync(img, pattern(SIZE, 0, 5));
}));

function qemuImage(port: number, creds: string): string[] {
  return ["--object", creds, "--image-opts", `driver=nbd,server.type=inet,server.host=localhost,server.port=${port},export=disk,tls-creds=tls0`];
}

test("qemu-img info and convert with tls-creds-x509 and tls-creds-psk (TLS 1.3, and 1.2 PSK)", () => deadline(60_000, "qemu-img", async () => {
  const cases: [string, number, string][] = [
    ["x509", x509.port, `tls-creds-x509,id=tls0,dir=${pki.client},endpoint=client`],
    ["psk", psk.port, `tls-creds-psk,id=tls0,dir=${pki.pskDir},username=alice,endpoint=client`],
    ["psk-tls12", psk.port, `tls-creds-psk,id=tls0,dir=${pki.pskDir},username=alice,endpoint=client,priority=NORMAL:-VERS-TLS1.3`],
  ];
  for (const [name, port, creds] of cases) {
    const info = await runOk(["qemu-img", "info", "--output=json", ...qemuImage(port, creds)]);
    assert.is(JSON.parse(info.stdout)["virtual-size"], SIZE, `${name}: size`);
    const out = join(dir, `qemu-${name}.raw`);
    await runOk(["qemu-img", "convert", "-O", "raw", ...qemuImage(port, creds).slice(0, 2), "--image-opts", qemuImage(port, creds)[3]!, out]);
    bytesEqual(readFileSync(out), readFileSync(img), `qemu-img convert ${name}`);
  }
  await waitForOutput(psk, /TLS established \(TLSv1\.2 [A-Z0-9-]+\), PSK user "alice"/);
}));

test("refused: a plain client on a TLS-only server (ERR_TLS_REQD)", () => deadline(30_000, "plain", async () => {
  const r = await run(["nbdinfo", `nbd://localhost:${x509.port}/disk`]);
  assert.is.not(r.code, 0, "nbdinfo without TLS fails");
  const e = await rejects(() => connect(`nbd://localhost:${x509.port}/disk`), "our client without TLS");
  assert.match(e.message, /ERR_TLS_REQD/);
}));

test("refused with --tls-verify-peer: no client certificate, another CA's, expired, revoked (each logged)", () => deadline(60_000, "verify", async () => {
  const ok = JSON.parse((await runOk(["nbdinfo", "--json", x509Uri(verify, pki.client)])).stdout);
  assert.is(ok.TLS, true, "alice's certificate is accepted");
  await waitForOutput(verify, /client certificate CN="alice"/);
  const refusals: [string, RegExp][] = [
    [pki.clientNoCert, /no client certificate; tls-verify-peer requires one/],
    [pki.clientExpired, /client certificate expired/],
    [pki.clientRevoked, /client certificate revoked by ca-crl\.pem/],
  ];
  for (const [certs, why] of refusals) {
    const r = await run(["nbdinfo", x509Uri(verify, certs)]);
    assert.is.not(r.code, 0, `${certs}: refused`);
    await waitForOutput(verify, why);
  }
  // GnuTLS does not send a certificate the server's CA list does not name; our client (BoringSSL) does.
  await rejects(() => connect(x509Uri(verify, pki.clientOtherCa)), "another CA's certificate");
  await waitForOutput(verify, /TLS handshake failed: .*\(bad client certificate: not signed by ca-cert\.pem\)/);
}));

test("refused: a wrong PSK key and an unknown PSK user (each logged)", () => deadline(30_000, "psk refusals", async () => {
  assert.is.not((await run(["nbdinfo", pskUri(psk, pki.pskWrongKey)])).code, 0, "wrong key");
  await waitForOutput(psk, /TLS handshake failed: .*\(wrong pre-shared key\)/);
  assert.is.not((await run(["nbdinfo", pskUri(psk, pki.pskUnknownUser, "bob")])).code, 0, "unknown user");
  await waitForOutput(psk, /TLS handshake failed: unknown PSK identity "bob"/);
  const q = await run(["qemu-img", "info", ...qemuImage(psk.port, `tls-creds-psk,id=tls0,dir=${pki.pskWrongKeyDir},username=alice,endpoint=client`)]);
  assert.is.not(q.code, 0, "qemu-img with the wrong key");
}));

test("refused: a client that offers only TLS 1.1 (protocol version logged)", () => deadline(30_000, "version", async () => {
  const w = await TlsWire.open({ port: x509.port });
  await w.hello();
  w.sendOption(5);
  assert.is((await w.optionReply()).type, 1);
  w.sock.removeAllListeners("data");
  const failed = await new Promise<boolean>((resolve) => {
    const t = tlsConnect({ socket: w.sock, maxVersion: "TLSv1.1", minVersion: "TLSv1", rejectUnauthorized: false });
    t.once("secureConnect", () => { t.destroy(); resolve(false); });
    t.once("error", () => resolve(true));
    t.once("close", () => resolve(true));
  });
  assert.ok(failed, "no TLS 1.1 session");
  await waitForOutput(x509, /TLS handshake failed: .*\(protocol version: TLS 1\.2 or later is required\)/);
  w.destroy();
}));

/** `bun-nbd serve ARGS` that must exit with `code` before serving; returns stderr. */
async function startFails(args: string[], code: number): Promise<string> {
  const r = await run([BUN, CLI, "serve", "-p", "0", ...args, img], { timeoutMs: 20_000 });
  assert.is(r.code, code, `exit status of serve ${args.join(" ")}: ${r.stdout}${r.stderr}`);
  assert.not.match(r.stdout, /Ready/);
  return r.stderr;
}

test("certificates and keys are checked at start: missing, unreadable, mismatched, expired, malformed", () => deadline(60_000, "startup", async () => {
  const broken = join(dir, "broken");
  mkdirSync(broken, { recursive: true });
  for (const f of ["ca-cert.pem", "server-cert.pem"]) copyFileSync(join(pki.server, f), join(broken, f));
  assert.match(await startFails(["--tls=require", "--tls-certificates", broken], 1), new RegExp(`${broken}/server-key\\.pem is missing`));
  mkdirSync(join(broken, "server-key.pem")); // a directory where a file should be: unreadable
  assert.match(await startFails(["--tls=require", "--tls-certificates", broken], 1), /cannot read .*server-key\.pem/);
  rmSync(join(broken, "server-key.pem"), { recursive: true });
  assert.match(await startFails(["--tls=require", "--tls-certificates", pki.serverMismatch], 1), /server-key\.pem does not match .*server-cert\.pem/);
  assert.match(await startFails(["--tls=require", "--tls-certificates", pki.serverExpired], 1), /server-cert\.pem expired on \d{4}-/);
  writeFileSync(join(broken, "server-key.pem"), "not a key\n");
  assert.match(await startFails(["--tls=require", "--tls-certificates", broken], 1), /server-key\.pem is not a PEM private key/);
  assert.match(await startFails(["--tls=require", "--tls-certificates", join(dir, "nope")], 1), /nope is not a directory/);
  const badPsk = join(dir, "bad.psk");
  writeFileSync(badPsk, "alice:00112233\nbob-without-a-key\n");
  assert.match(await startFails(["--tls=require", "--tls-psk", badPsk], 1), /bad\.psk:2: expected "username:hexkey"/);
}));

test("TLS settings that cannot work are refused at start", () => deadline(60_000, "settings", async () => {
  assert.match(await startFails(["--tls=require"], 1), /tls=require needs credentials/);
  assert.match(await startFails(["--tls-certificates", pki.server], 1), /TLS is off: add tls=require/);
  assert.match(await startFails(["--tls=on", "--tls-certificates", pki.server, "--tls-psk", pki.psk], 1), /cannot be used together/);
  assert.match(await startFails(["--tls=require", "--tls-psk", pki.psk, "--tls-verify-peer"], 1), /tls-verify-peer checks client certificates/);
  assert.match(await startFails(["--tls=maybe"], 2), /invalid --tls "maybe"/);
}));

test("SIGHUP reads the credentials again; a broken replacement keeps the old ones", () => deadline(30_000, "sighup", async () => {
  const certs = join(dir, "reload");
  mkdirSync(certs, { recursive: true });
  for (const f of ["ca-cert.pem", "server-cert.pem", "server-key.pem"]) copyFileSync(join(pki.server, f), join(certs, f));
  const s = await serve(["--tls=require", "--tls-certificates", certs, img]);
  try {
    s.proc.kill("SIGHUP");
    await waitForOutput(s, /SIGHUP: credentials read again/);
    writeFileSync(join(certs, "server-key.pem"), readFileSync(join(pki.clientOtherCa, "client-key.pem")));
    s.proc.kill("SIGHUP");
    await waitForOutput(s, /SIGHUP: keeping the old credentials: .*server-key\.pem does not match/);
    const j = JSON.parse((await runOk(["nbdinfo", "--json", x509Uri(s, pki.client)])).stdout);
    assert.is(j.TLS, true, "still serving with the old credentials");
  } finally {
    await s.stop();
  }
}));

runSuite();
