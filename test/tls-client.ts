// The project's client over TLS (nbds:// and nbds+unix:// with libnbd's query parameters) against
// nbdkit --tls=require, qemu-nbd with tls-creds objects and bun-nbd, each with X.509 (client
// certificates required) and PSK: under Bun (its own transport: Bun's TLS for X.509, the OpenSSL
// engine for PSK; and the node:net transport for X.509) and under Node (node:tls). Reads and
// writes are checked against the files; the client commands work on nbds:// URIs; and the client
// refuses what it must (untrusted CA, wrong name, wrong key, a server without TLS).
import * as assert from "uvu/assert";
import { readFileSync, writeFileSync } from "node:fs";
import { createHash } from "node:crypto";
import { join } from "node:path";
import type { Subprocess } from "bun";
import {
  connect, NbdDisconnectedError, NbdOptionError, NbdUsageError, Negotiation, parseNbdUri,
} from "../src/client/index.ts";
import { useTransport } from "../src/client/transport.ts";
import { bytesEqual, deadline, rejects } from "./helpers/assert.ts";
import { BUN, CLI, need, ROOT, run, runOk, scratch, SYSTEM_PATH } from "./helpers/env.ts";
import { serve, type Served } from "./helpers/server.ts";
import { makePki, type Pki } from "./helpers/tls.ts";
import { guardedSuite } from "./interop-lib.ts";
import { pattern } from "./robustness-wire.ts";

const dir = scratch("bun-nbd-tls-client-");
const SIZE = 4 * 1024 * 1024;
let pki: Pki;
const procs: Subprocess[] = [];
const served: Served[] = [];
interface Peer { name: string; uri: string; img: string }
const peers: Peer[] = [];

async function waitSocket(path: string, proc: Subprocess): Promise<void> {
  const limit = Date.now() + 15_000;
  for (;;) {
    try {
      await (await Negotiation.open({ transport: "unix", path, exportName: "" }, { connectTimeoutMs: 1000 })).abort();
      return;
    } catch (e) {
      if (proc.exitCode !== null) throw new Error(`${path}: the server exited ${proc.exitCode}`);
      if (Date.now() > limit) throw e;
      await Bun.sleep(30);
    }
  }
}

async function daemon(name: string, cmd: string[], img: string, uri: (sock: string) => string): Promise<void> {
  const sock = join(dir, `${name}.sock`);
  const proc = Bun.spawn([...cmd.map((a) => a.replace("SOCK", sock)), img], { stdout: "ignore", stderr: "ignore", env: { ...process.env, PATH: SYSTEM_PATH } });
  procs.push(proc);
  await waitSocket(sock, proc);
  peers.push({ name, uri: uri(sock), img });
}

function image(name: string): string {
  const p = join(dir, `${name}.img`);
  writeFileSync(p, pattern(SIZE, 0, name.length));
  return p;
}

const { test, after, run: runSuite } = guardedSuite("tls-client", async () => {
  need("openssl", "psktool", "nbdkit", "qemu-nbd", "node");
  pki = await makePki(join(dir, "pki"));
  const x509 = (sock: string) => `nbds+unix:///?socket=${sock}&tls-certificates=${pki.client}`;
  const psk = (sock: string) => `nbds+unix://alice@/?socket=${sock}&tls-psk-file=${pki.psk}`;
  await daemon("nbdkit-x509", ["nbdkit", "-f", "-U", "SOCK", "--tls=require", `--tls-certificates=${pki.server}`, "--tls-verify-peer", "file"], image("nbdkit-x509"), x509);
  await daemon("nbdkit-psk", ["nbdkit", "-f", "-U", "SOCK", "--tls=require", `--tls-psk=${pki.psk}`, "file"], image("nbdkit-psk"), psk);
  await daemon("qemu-nbd-x509", ["qemu-nbd", "-f", "raw", "-t", "-k", "SOCK", "-x", "", "--object",
    `tls-creds-x509,id=tls0,dir=${pki.server},endpoint=server,verify-peer=on`, "--tls-creds", "tls0"], image("qemu-nbd-x509"), x509);
  await daemon("qemu-nbd-psk", ["qemu-nbd", "-f", "raw", "-t", "-k", "SOCK", "-x", "", "--object",
    `tls-creds-psk,id=tls0,dir=${pki.pskDir},endpoint=server`, "--tls-creds", "tls0"], image("qemu-nbd-psk"), psk);
  const bx = image("bun-x509");
  const s1 = await serve(["--tls=require", "--tls-certificates", pki.server, "--tls-verify-peer", "-n", "", bx]);
  served.push(s1);
  peers.push({ name: "bun-nbd-x509", uri: `nbds://localhost:${s1.port}/?tls-certificates=${pki.client}`, img: bx });
  const bp = image("bun-psk");
  const s2 = await serve(["--tls=require", "--tls-psk", pki.psk, "-n", "", bp]);
  served.push(s2);
  peers.push({ name: "bun-nbd-psk", uri: `nbds://alice@localhost:${s2.port}/?tls-psk-file=${pki.psk}`, img: bp });
});

after(async () => {
  for (const p of procs) p.kill("SIGTERM");
  for (const s of served) await s.stop();
  await Promise.all(procs.map((p) => p.exited));
  useTransport("auto");
});

/** Read 1 MiB at 1 MiB, write 64 KiB at 2 MiB and read it back, flush: checked against the file. */
async function exercise(p: Peer, tag: string): Promise<void> {
  const c = await connect(p.uri);
  try {
    assert.is(c.size, SIZE, `${tag} ${p.name}: size`);
    bytesEqual(await c.read(1 << 20, 1 << 20), readFileSync(p.img).subarray(1 << 20, 2 << 20), `${tag} ${p.name}: read`);
    const data = pattern(65536, 0, 99);
    await c.pwrite(data, 2 << 20);
    await c.flush();
    bytesEqual(await c.read(2 << 20, 65536), data, `${tag} ${p.name}: read back`);
  } finally {
    await c.close();
  }
  bytesEqual(readFileSync(p.img).subarray(2 << 20, (2 << 20) + 65536), pattern(65536, 0, 99), `${tag} ${p.name}: in the file`);
}

test("under Bun (Bun's TLS for X.509, the OpenSSL engine for PSK): nbdkit, qemu-nbd, bun-nbd", () => deadline(60_000, "bun", async () => {
  useTransport("auto");
  for (const p of peers) await exercise(p, "bun");
}));

test("under Bun with the node:net transport (X.509; PSK is refused clearly: BoringSSL has none)", () => deadline(60_000, "bun-node", async () => {
  useTransport("node");
  try {
    for (const p of peers.filter((x) => x.name.endsWith("x509"))) await exercise(p, "node:net");
    const e = await rejects(() => connect(peers.find((x) => x.name === "nbdkit-psk")!.uri), "PSK on Bun's node:tls");
    assert.instance(e, NbdUsageError);
    assert.match(e.message, /TLS-PSK is not in Bun's node:tls/);
  } finally {
    useTransport("auto");
  }
}));

test("under Node (node:tls, X.509 and PSK): every peer", () => deadline(90_000, "node", async () => {
  const script = join(dir, "read.ts");
  writeFileSync(script, [
    `import { connect } from ${JSON.stringify(join(ROOT, "src/client/index.ts"))};`,
    'import { createHash } from "node:crypto";',
    "const c = await connect(process.argv[2]);",
    "const b = await c.read(0, 1 << 20);",
    "await c.pwrite(new Uint8Array(4096).fill(0x5a), 3 << 20);",
    "await c.flush();",
    "console.log(JSON.stringify({ size: c.size, sha: createHash('sha256').update(b).digest('hex') }));",
    "await c.close();",
  ].join("\n"));
  await runOk([BUN, "build", script, "--target=node", "--format=esm", `--outfile=${join(dir, "read.mjs")}`]);
  for (const p of peers) {
    const r = await run(["node", join(dir, "read.mjs"), p.uri], { timeoutMs: 30_000 });
    assert.is(r.code, 0, `node against ${p.name}: ${r.stderr}`);
    const out = JSON.parse(r.stdout);
    assert.is(out.size, SIZE);
    assert.is(out.sha, createHash("sha256").update(readFileSync(p.img).subarray(0, 1 << 20)).digest("hex"), `node ${p.name}: read`);
    bytesEqual(readFileSync(p.img).subarray(3 << 20, (3 << 20) + 4096), new Uint8Array(4096).fill(0x5a), `node ${p.name}: write`);
  }
}));

test("bun-nbd info, list, map and copy with nbds:// URIs", () => deadline(60_000, "cli", async () => {
  for (const p of [peers.find((x) => x.name === "nbdkit-x509")!, peers.find((x) => x.name === "bun-nbd-psk")!]) {
    const info = await runOk([BUN, CLI, "info", "--json", p.uri]);
    assert.is(JSON.parse(info.stdout).TLS, true, `${p.name}: info reports TLS`);
    await runOk([BUN, CLI, "list", p.uri]);
    const map = await runOk([BUN, CLI, "map", p.uri]);
    assert.match(map.stdout, /data/);
    const out = join(dir, `cli-${p.name}.img`);
    await runOk([BUN, CLI, "copy", "-q", p.uri, out]);
    bytesEqual(readFileSync(out), readFileSync(p.img), `copy from ${p.name}`);
  }
}));

test("URIs: libnbd's TLS parameters and the user part", () => {
  const t = parseNbdUri("nbds://bob@host:1234/disk?tls-psk-file=/k.psk&tls-hostname=nas");
  assert.equal(t, { transport: "tcp", host: "host", port: 1234, exportName: "disk", tls: { verifyPeer: true, pskFile: "/k.psk", username: "bob", hostname: "nas" } });
  const u = parseNbdUri("nbds+unix:///d?socket=/s&tls-certificates=/c&tls-verify-peer=false&tls-username=al");
  assert.equal(u, { transport: "unix", path: "/s", exportName: "d", tls: { verifyPeer: false, certificates: "/c", username: "al" } });
});

test("refusals: untrusted CA, wrong name, wrong PSK key, unknown user, a server without TLS", () => deadline(60_000, "refusals", async () => {
  const nk = peers.find((x) => x.name === "nbdkit-x509")!;
  const bx = peers.find((x) => x.name === "bun-nbd-x509")!;
  const untrusted = await rejects(() => connect(nk.uri.replace(pki.client, pki.clientWrongCa)), "untrusted CA");
  assert.instance(untrusted, NbdDisconnectedError);
  assert.is((untrusted as NbdDisconnectedError).code, "TLS_FAILED");
  const name = await rejects(() => connect(`${bx.uri}&tls-hostname=elsewhere.example`), "wrong name");
  assert.match(name.message, /elsewhere\.example/);
  const np = peers.find((x) => x.name === "nbdkit-psk")!;
  const key = await rejects(() => connect(np.uri.replace(pki.psk, pki.pskWrongKey)), "wrong key");
  assert.is((key as NbdDisconnectedError).code, "TLS_FAILED");
  const user = await rejects(() => connect(np.uri.replace("alice@", "carol@")), "no key for carol");
  assert.instance(user, NbdUsageError);
  assert.match(user.message, /has no key for user "carol"/);
  const plain = await serve(["-n", "", join(dir, "bun-psk.img")]);
  try {
    const e = await rejects(() => connect(`nbds://localhost:${plain.port}/?tls-psk-file=${pki.psk}&tls-username=alice`), "no TLS on the server");
    assert.instance(e, NbdOptionError);
    assert.is((e as NbdOptionError).code, "ERR_POLICY");
    assert.match(e.message, /TLS was required, but the server refused STARTTLS/);
  } finally {
    await plain.stop();
  }
  // tls-verify-peer=false accepts a server the client cannot verify (as libnbd does).
  const open = await serve(["--tls=require", "--tls-certificates", pki.server, "-n", "", join(dir, "bun-psk.img")]);
  try {
    const uri = `nbds://localhost:${open.port}/?tls-certificates=${pki.clientWrongCa}`;
    assert.is((await rejects(() => connect(uri), "unverified") as NbdDisconnectedError).code, "TLS_FAILED");
    const c = await connect(`${uri}&tls-verify-peer=false`);
    assert.is(c.size, SIZE);
    await c.close();
  } finally {
    await open.stop();
  }
}));

runSuite();
