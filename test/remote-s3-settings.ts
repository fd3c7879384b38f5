// S3 settings and credentials against a real Ceph RGW (test/helpers/remote-s3.ts): AWS_* variables
// and the --s3-* flags that override them, each shown to take effect at the store (AWS_SESSION_TOKEN
// through RGW's STS, the region in RGW's log of each request's credential scope, virtual-hosted
// requests to BUCKET.localhost), an s3:// base in a config file, credentials kept out of output and
// LIST, and errors at start that name the object and the status.
import * as assert from "uvu/assert";
import { mkdirSync, existsSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { rejects } from "./helpers/assert.ts";
import { BUN, CLI, run, runOk, scratch } from "./helpers/env.ts";
import { parseLocation } from "../src/devices/remote/location.ts";
import { ObjectStore } from "../src/devices/remote/store.ts";
import { BUCKET, MiB, eventually, s3Suite, same, stopped } from "./helpers/remote-s3.ts";
import { makeImage } from "./helpers/remote-images.ts";
import { serve } from "./helpers/server.ts";
import { checkPerClient, nbdpy } from "./interop-lib.ts";
import { ACCESS_KEY, SECRET_KEY, type Rgw } from "./services/rgw.ts";

const dir = scratch("bun-nbd-remote-s3-settings-");
const URL_ = `s3://${BUCKET}/golden/mid.img`;
let mid = "";

const { s3test, run: runSuite } = s3Suite("remote over S3: settings and credentials (Ceph RGW)", async (g) => {
  mid = makeImage(join(dir, "mid.img"), 12 * MiB + 2352, 32, { zeroEvery: 5 });
  await g.putFile(BUCKET, "golden/mid.img", mid);
});

/** `bun-nbd serve` that must fail at start: its stderr. */
async function refused(g: Rgw, args: string[], env: Record<string, string>): Promise<string> {
  const r = await run([BUN, CLI, "serve", "-p", "0", "--no-cache", ...args], { env: { ...g.env, ...env } });
  assert.is(r.code, 1, `exit status; stderr:\n${r.stderr}`);
  return r.stderr;
}

/** The first 64 KiB and the last 2352 bytes of the export `name`, compared with the object's. */
async function readsRight(uri: string): Promise<void> {
  const o = await nbdpy(uri, `
want = open(${JSON.stringify(mid)}, "rb").read()
out["head"] = h.pread(65536, 0) == want[:65536]
out["tail"] = h.pread(2352, len(want) - 2352) == want[-2352:]`);
  assert.equal([o.head, o.tail], [true, true], "bytes read over NBD");
}

/** Ops-log GETs of the object since entry `from` (the log drops entries: use for what they looked like, not how many). */
const getsSince = (g: Rgw, from: number) => g.ops().slice(from).filter((o) => o.op === "get_obj" && o.bucket === BUCKET && /golden\/mid\.img\?/.test(o.uri));

s3test("credentials never appear in LIST or in the server's output", 60_000, async (g) => {
  const s = await serve(["-v", "--no-cache", URL_], { env: g.env });
  let list;
  try {
    list = await runOk(["nbdinfo", "--list", s.uri()]);
    await readsRight(s.uri("mid"));
  } finally { await stopped(s); }
  assert.ok(list.stdout.includes(URL_), list.stdout);
  for (const text of [list.stdout, s.output()]) {
    for (const secret of [SECRET_KEY, ACCESS_KEY, "X-Amz-"]) assert.not.ok(text.includes(secret), `${secret} shown:\n${text}`);
  }
});

s3test("errors at start name the object and the status", 60_000, async (g) => {
  let err = await refused(g, [URL_], { AWS_SECRET_ACCESS_KEY: "wrong-secret" });
  assert.match(err, new RegExp(`s3://${BUCKET}/golden/mid\\.img: HTTP 403 Forbidden \\(SignatureDoesNotMatch\\)`));
  assert.not.ok(err.includes("wrong-secret"));
  err = await refused(g, [`s3://${BUCKET}/golden/none.img`], {});
  assert.match(err, /s3:\/\/images\/golden\/none\.img: HTTP 404 Not Found \(NoSuchKey\)/);
  err = await refused(g, ["s3://no-such-bucket/x.img"], {});
  assert.match(err, /s3:\/\/no-such-bucket\/x\.img: HTTP 404 Not Found \(NoSuchBucket\)/);
  err = await refused(g, [URL_], { AWS_ENDPOINT_URL: "http://127.0.0.1:9" });
  assert.match(err, /cannot reach s3:\/\/images\/golden\/mid\.img: connection refused/);
});

s3test("AWS_SESSION_TOKEN reaches the store: RGW's STS credentials work with it, not without it; a bogus token is refused", 90_000, async (g) => {
  const t = await g.assumeRole();
  await g.sts(true);
  try { await sessionTokens(g, t); } finally { await g.sts(false); }
});

async function sessionTokens(g: Rgw, t: Awaited<ReturnType<Rgw["assumeRole"]>>): Promise<void> {
  // Bun.S3Client falls back to AWS_SESSION_TOKEN itself: first the store layer alone, given the
  // token in its settings, in a process (this one) whose environment has none
  for (const v of ["AWS_SESSION_TOKEN", "S3_SESSION_TOKEN"]) assert.is(process.env[v], undefined, `${v} in the test's environment`);
  const s3 = { endpoint: g.endpoint, accessKeyId: t.accessKeyId, secretAccessKey: t.secretAccessKey };
  const pin = await new ObjectStore(parseLocation(URL_, { ...s3, sessionToken: t.sessionToken })).probe();
  assert.is(pin.size, 12 * MiB + 2352);
  const e = await rejects(() => new ObjectStore(parseLocation(URL_, s3)).probe(), "the temporary keys without their token");
  assert.match(e.message, /HTTP 403 Forbidden \(AccessDenied\)/);
  // then the server, from the environment
  const temp = { AWS_ACCESS_KEY_ID: t.accessKeyId, AWS_SECRET_ACCESS_KEY: t.secretAccessKey, AWS_SESSION_TOKEN: t.sessionToken };
  const s = await serve(["-v", "--no-cache", URL_], { env: { ...g.env, ...temp } });
  let list;
  try {
    await readsRight(s.uri("mid"));
    list = await runOk(["nbdinfo", "--list", s.uri()]);
  } finally { await stopped(s); }
  for (const text of [s.output(), list.stdout]) {
    for (const secret of [t.sessionToken, t.sessionToken.slice(0, 24), encodeURIComponent(t.sessionToken).slice(0, 24), t.secretAccessKey, "Security-Token"]) {
      assert.not.ok(text.includes(secret), `${secret} shown:\n${text}`);
    }
  }
  // the temporary key alone is unknown to RGW: only the token makes it a session's key
  let err = await refused(g, [URL_], { ...temp, AWS_SESSION_TOKEN: "" });
  assert.match(err, /s3:\/\/images\/golden\/mid\.img: HTTP 403 Forbidden \(AccessDenied\)/);
  // a token RGW cannot decrypt, with the user's own (valid) keys
  err = await refused(g, [URL_], { AWS_SESSION_TOKEN: "bnbd-bogus-session-token" });
  assert.match(err, /s3:\/\/images\/golden\/mid\.img: HTTP 400 Bad Request \(InvalidArgument\)/);
  assert.not.ok(err.includes("bnbd-bogus-session-token"), err);
}

s3test("--s3-endpoint overrides a wrong AWS_ENDPOINT_URL", 60_000, async (g) => {
  const env = { AWS_ENDPOINT_URL: "http://127.0.0.1:9" };
  const s = await serve(["--no-cache", "--s3-endpoint", g.endpoint, URL_], { env: { ...g.env, ...env } });
  try { await readsRight(s.uri("mid")); } finally { await stopped(s); }
  // and the other way round: a wrong flag wins over the right variable
  const err = await refused(g, ["--s3-endpoint", "http://127.0.0.1:9", URL_], {});
  assert.match(err, /cannot reach s3:\/\/images\/golden\/mid\.img: connection refused/);
});

s3test("AWS_REGION, overridden by --s3-region: the region in each GET's credential scope as RGW logged it", 60_000, async (g) => {
  for (const [args, region, not] of [[[], "us-east-1", "bnbd-region-7"], [["--s3-region", "bnbd-region-7"], "bnbd-region-7", "us-east-1"]] as const) {
    const from = g.ops().length;
    const s = await serve(["--no-cache", ...args, URL_], { env: g.env });
    try { await readsRight(s.uri("mid")); } finally { await stopped(s); }
    const scope = (r: string) => `X-Amz-Credential=${ACCESS_KEY}%2F\\d{8}%2F${r}%2Fs3%2Faws4_request`;
    assert.ok(await eventually(() => getsSince(g, from).some((o) => new RegExp(scope(region)).test(o.uri))), `a GET signed for ${region} in RGW's ops log`);
    assert.not.ok(getsSince(g, from).some((o) => new RegExp(scope(not)).test(o.uri)), `a GET signed for ${not}`);
  }
});

s3test("--s3-virtual-hosted addresses the bucket as BUCKET.host: RGW (its DNS name: localhost) serves images.localhost/KEY", 60_000, async (g) => {
  const local = g.endpoint.replace("127.0.0.1", "localhost");
  const from = g.ops().length;
  const s = await serve(["--no-cache", "--s3-virtual-hosted", "--s3-endpoint", local, URL_], { env: g.env });
  try { await readsRight(s.uri("mid")); } finally { await stopped(s); }
  const vh = () => getsSince(g, from).filter((o) => o.uri.startsWith("GET /golden/mid.img?"));
  assert.ok(await eventually(() => vh().length > 0), `a GET of /golden/mid.img (bucket in the host) in RGW's ops log:\n${getsSince(g, from).map((o) => o.uri.slice(0, 40)).join("\n")}`);
  assert.is(getsSince(g, from).filter((o) => o.uri.startsWith("GET /images/")).length, 0, "path-style GETs");
  // the same without the flag: the bucket goes in the path
  const from2 = g.ops().length;
  const p = await serve(["--no-cache", "--s3-endpoint", local, URL_], { env: g.env });
  try { await readsRight(p.uri("mid")); } finally { await stopped(p); }
  assert.ok(await eventually(() => getsSince(g, from2).some((o) => o.uri.startsWith("GET /images/golden/mid.img?"))), "a path-style GET without the flag");
});

s3test("a config file names an s3:// base: served as is and as per-client overlays that keep their writes", 120_000, async (g) => {
  const ov = join(dir, "pc-overlays");
  mkdirSync(ov, { recursive: true });
  const conf = join(dir, "remote.toml");
  writeFileSync(conf, `[[export]]\nname = "plain"\nfile = "${URL_}"\n\n` +
    `[[export]]\nname = "farm"\nfile = "${URL_}"\noverlay = "per-client"\noverlay-dir = "${ov}"\n`);
  const s = await serve(["--config", conf, "--no-cache"], { env: g.env });
  let list;
  try {
    list = await runOk(["nbdinfo", "--list", s.uri()]);
    await runOk(["nbdcopy", s.uri("plain"), join(dir, "plain.out")]);
    await checkPerClient(s, "farm", mid);
  } finally { await stopped(s); }
  assert.match(list.stdout, /plain/);
  await same(join(dir, "plain.out"), mid);
  assert.ok(existsSync(join(ov, "farm@vm1.qcow2")), "the client's overlay is on disk");
  assert.ok(readFileSync(join(ov, "farm@vm1.qcow2")).includes(Buffer.from(URL_)), "the overlay names its s3:// base");
  for (const secret of [SECRET_KEY, ACCESS_KEY]) assert.not.ok(s.output().includes(secret) || list.stdout.includes(secret), `${secret} shown`);
});

runSuite();
