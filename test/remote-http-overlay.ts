// A persistent overlay over an HTTP base records the base's identity (URL + ETag) and refuses to
// open over a different one: another URL, or the same URL after the object was replaced. Each
// test makes its own images and overlay; a control opens the overlay over its own base first, so
// a refusal is the identity check and not some other failure.
import * as assert from "uvu/assert";
import { renameSync, utimesSync } from "node:fs";
import { join } from "node:path";
import { connect } from "../src/client/index.ts";
import { bytesEqual, deadline } from "./helpers/assert.ts";
import { BUN, CLI, need, run, runOk, scratch } from "./helpers/env.ts";
import { makeImage } from "./helpers/remote-images.ts";
import { serve } from "./helpers/server.ts";
import { guardedSuite } from "./interop-lib.ts";
import { startNginx, type Nginx } from "./services/nginx.ts";

const MiB = 1024 * 1024;
const dir = scratch("bun-nbd-remote-overlay-");
let ngx: Nginx;

const { test, run: runSuite } = guardedSuite("remote over http: overlay base identity", async () => {
  need("nginx");
  ngx = await startNginx();
});

const WRITE = new Uint8Array(4096).fill(0x5a);

/** Create an overlay over `url`, write a block through it and check it reads back (the control). */
async function overlayOver(ov: string, url: string): Promise<void> {
  await runOk([BUN, CLI, "overlay", "create", ov, url]);
  const s = await serve(["--no-cache", "--overlay", ov, url]);
  try {
    const c = await connect(s.uri());
    try {
      await c.pwrite(WRITE, MiB);
      await c.flush();
      bytesEqual(await c.read(MiB, 4096), WRITE, "the write through the overlay");
    } finally { await c.close(); }
  } finally { assert.is(await s.stop(), 0, s.output()); }
}

/** `serve --overlay ov url`: must exit 1 before serving; returns its stderr. */
async function refused(ov: string, url: string): Promise<string> {
  const r = await run([BUN, CLI, "serve", "-p", "0", "--no-cache", "--overlay", ov, url], { timeoutMs: 30_000 });
  assert.is(r.code, 1, `serve --overlay ${ov} ${url}: exit ${r.code}\n${r.stdout}${r.stderr}`);
  assert.not.match(r.stdout + r.stderr, /Ready\./, "nothing was served");
  return r.stderr;
}

const esc = (s: string) => s.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");

test("an overlay made over one URL refuses another URL, even with the same size and ETag, naming both", () => deadline(60_000, "other URL", async () => {
  const when = new Date(Date.now() - 3600_000);
  // nginx's ETag is mtime-size: the two objects get the same one, so only the URL tells them apart
  for (const [name, seed] of [["one", 61], ["two", 62]] as const) utimesSync(makeImage(join(ngx.root, `${name}.img`), 4 * MiB, seed), when, when);
  const ov = join(dir, "one.qcow2");
  await overlayOver(ov, ngx.url("one.img"));
  const err = await refused(ov, ngx.url("two.img"));
  assert.match(err, new RegExp(`one\\.qcow2: its base differs \\(location\\): it was made over http ${esc(ngx.url("one.img"))} .*the base given is http ${esc(ngx.url("two.img"))} `));
  // the refusal left the overlay as it was: over its own base it still holds the write
  const s = await serve(["--no-cache", "--overlay", ov, ngx.url("one.img")]);
  try {
    const c = await connect(s.uri());
    try { bytesEqual(await c.read(MiB, 4096), WRITE, "the write, after the refusal"); } finally { await c.close(); }
  } finally { assert.is(await s.stop(), 0, s.output()); }
}));

test("an overlay made over an object refuses it once it was replaced (new ETag, same URL and size)", () => deadline(60_000, "replaced object", async () => {
  const path = makeImage(join(ngx.root, "swap.img"), 4 * MiB, 63);
  const ov = join(dir, "swap.qcow2");
  await overlayOver(ov, ngx.url("swap.img"));
  const before = await fetch(ngx.url("swap.img"), { method: "HEAD" });
  const oldTag = before.headers.get("etag")!;
  const next = makeImage(join(ngx.root, "swap.next"), 4 * MiB, 64);
  utimesSync(next, new Date(), new Date(Date.now() + 10_000)); // another mtime: nginx gives another ETag
  renameSync(next, path);
  const after = await fetch(ngx.url("swap.img"), { method: "HEAD" });
  const newTag = after.headers.get("etag")!;
  assert.is.not(newTag, oldTag, "nginx names the new object by another ETag");
  const err = await refused(ov, ngx.url("swap.img"));
  assert.match(err, new RegExp(`swap\\.qcow2: its base differs \\(version\\): it was made over http ${esc(ngx.url("swap.img"))} .*version ${esc(oldTag)}.*the base given is .*version ${esc(newTag)}`));
}));

runSuite();
