// `bun-nbd verify` and `serve --verify`: sums made by the real coreutils tools (GNU text and
// binary mode, BSD --tag), bare-hash sidecars, SHA256SUMS/SHA1SUMS/MD5SUMS found beside the image,
// --sha256/--md5 on the command line, every BIN of a multi-file CUE sheet, compressed images, and
// the exit statuses: 0 match, 1 mismatch, 2 usage error, missing file or no checksum.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { copyFileSync, cpSync, mkdirSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { BUN, CLI, need, ROOT, run, runOk, scratch } from "./helpers/env.ts";
import { serve } from "./helpers/server.ts";
import { parseSums, findEntry } from "../src/verify/sums.ts";

const test = suite("verify");
const root = scratch("bun-nbd-verify-");
let n = 0;
const fresh = () => { const d = join(root, `d${n++}`); mkdirSync(d); return d; };
const verify = (args: string[], cwd?: string) => run([BUN, CLI, "verify", ...args], { cwd, timeoutMs: 60_000 });
const sh = (cmd: string, cwd: string) => runOk(["sh", "-c", cmd], { cwd });

/** A 3 MiB image with random bytes in `dir`. */
function image(dir: string, name = "disk.img"): string {
  const p = join(dir, name);
  writeFileSync(p, crypto.getRandomValues(new Uint8Array(3 << 20)).map((x, i) => (i < 65536 ? x : i & 255)));
  return p;
}

test.before(() => need("sha256sum", "sha1sum", "md5sum", "sha512sum", "gzip"));

test("sidecars and lists made by coreutils are found and checked", async () => {
  const cases: [string, string, RegExp][] = [
    ["sha256sum disk.img > disk.img.sha256", "disk.img.sha256 line 1", /sha256/],
    ["sha256sum disk.img | cut -d' ' -f1 > disk.img.sha256", "disk.img.sha256", /sha256/],
    ["sha512sum -b disk.img > disk.img.sha512", "disk.img.sha512 line 1", /sha512/],
    ["md5sum disk.img > disk.img.md5", "disk.img.md5 line 1", /md5/],
    ["(sha256sum /etc/hostname; sha256sum -b disk.img) > SHA256SUMS", "SHA256SUMS line 2", /sha256/],
    ["sha1sum ./disk.img > SHA1SUMS", "SHA1SUMS line 1", /sha1/],
    ["md5sum --tag disk.img > MD5SUMS", "MD5SUMS line 1", /md5/],
  ];
  for (const [cmd, source, algo] of cases) {
    const d = fresh();
    image(d);
    await sh(cmd, d);
    const r = await verify([join(d, "disk.img")]);
    assert.is(r.code, 0, `${cmd}: ${r.stdout}${r.stderr}`);
    assert.ok(r.stdout.includes(`disk.img: OK (`) && r.stdout.includes(`from ${source})`) && algo.test(r.stdout), `${cmd}: ${r.stdout}`);
    assert.is(r.stderr, "", "no progress bar off a terminal");
  }
});

test("a changed byte is a mismatch (exit 1) naming the expected and actual digests", async () => {
  const d = fresh();
  const p = image(d);
  await sh("sha256sum disk.img > SHA256SUMS", d);
  const expected = (await sh("sha256sum disk.img | cut -d' ' -f1", d)).stdout.trim();
  await sh("printf 'X' | dd of=disk.img bs=1 seek=1000000 conv=notrunc status=none", d);
  const actual = (await sh("sha256sum disk.img | cut -d' ' -f1", d)).stdout.trim();
  const r = await verify([p]);
  assert.is(r.code, 1);
  assert.ok(r.stdout.includes(`FAILED sha256 expected ${expected}, got ${actual}`), r.stdout);
});

test("--sha256, --md5 and --sums; usage errors, a missing file and no checksum exit 2", async () => {
  const d = fresh();
  const p = image(d);
  const sha = (await sh("sha256sum disk.img | cut -d' ' -f1", d)).stdout.trim();
  const md5 = (await sh("md5sum disk.img | cut -d' ' -f1", d)).stdout.trim();
  assert.is((await verify([p, "--sha256", sha])).code, 0);
  assert.is((await verify([p, "--sha256", sha.toUpperCase()])).code, 0, "hex case does not matter");
  assert.is((await verify([p, "--md5", md5])).code, 0);
  assert.is((await verify([p, "--sha256", sha.replace(/^./, (c) => (c === "0" ? "1" : "0"))])).code, 1);
  const elsewhere = join(fresh(), "published.txt");
  await sh(`sha256sum disk.img > ${elsewhere}`, d);
  assert.is((await verify([p, "--sums", elsewhere])).code, 0);
  for (const [args, re] of [
    [[p, "--sha256", "abc"], /wants 64 hex digits/],
    [[p, "--sha256", sha, "--md5", md5], /give one of/],
    [[join(d, "nope.img"), "--sha256", sha], /no such file/],
    [[p], /no checksum found for disk\.img \(looked for disk\.img\.sha256, .*SHA256SUMS/],
    [[p, "--sums", join(d, "missing.sums")], /cannot read/],
    [[], /expected one IMAGE/],
  ] as [string[], RegExp][]) {
    const r = await verify(args);
    assert.is(r.code, 2, `${args.join(" ")}: ${r.stdout}${r.stderr}`);
    assert.match(r.stderr, re);
  }
});

test("a multi-file CUE sheet: every BIN it names is checked (names with spaces and parentheses)", async () => {
  const d = fresh();
  cpSync(join(ROOT, "test/fixtures/cd/split"), d, { recursive: true });
  await sh("sha1sum *.bin > SHA1SUMS", d);
  const r = await verify([join(d, "mixed.cue")]);
  assert.is(r.code, 0, r.stdout + r.stderr);
  assert.is(r.stdout.trim().split("\n").length, 3, r.stdout);
  for (const f of readdirSync(d).filter((x) => x.endsWith(".bin"))) assert.ok(r.stdout.includes(`${f}: OK (sha1 from SHA1SUMS line`), `${f}: ${r.stdout}`);
  await sh("printf 'Z' | dd of='mixed (Track 2).bin' bs=1 seek=100 conv=notrunc status=none", d);
  const bad = await verify([join(d, "mixed.cue")]);
  assert.is(bad.code, 1);
  assert.match(bad.stdout, /mixed \(Track 2\)\.bin: FAILED sha1/);
  assert.match(bad.stdout, /mixed \(Track 1\)\.bin: OK/);
});

test("compressed images: the stored bytes when the sums name the compressed file", async () => {
  const d = fresh();
  image(d);
  await sh("gzip -k disk.img && sha256sum disk.img.gz > SHA256SUMS", d);
  const r = await verify([join(d, "disk.img.gz")]);
  assert.is(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /disk\.img\.gz: OK \(sha256 from SHA256SUMS line 1\)/);
  // sums naming the uncompressed image: its uncompressed bytes, where this build can decompress
  const d2 = fresh();
  image(d2);
  await sh("sha256sum disk.img > SHA256SUMS && gzip disk.img", d2);
  const u = await verify([join(d2, "disk.img.gz")]);
  if (u.code === 0) assert.match(u.stdout, /OK \(sha256 of the uncompressed contents from SHA256SUMS line 1\)/);
  else {
    assert.is(u.code, 2, u.stdout + u.stderr);
    assert.match(u.stderr, /cannot decompress \.gz files/);
  }
});

test("serve --verify: serves a matching image, refuses a mismatch in one line, refuses without a checksum", async () => {
  const d = fresh();
  const p = image(d);
  await sh("sha256sum disk.img > disk.img.sha256", d);
  const s = await serve(["--verify", p]);
  try {
    assert.match(s.output(), /disk\.img: sha256 matches disk\.img\.sha256 line 1/);
  } finally { await s.stop(); }
  const expected = (await sh("cut -d' ' -f1 disk.img.sha256", d)).stdout.trim();
  await sh("printf 'Q' | dd of=disk.img bs=1 seek=7 conv=notrunc status=none", d);
  const actual = (await sh("sha256sum disk.img | cut -d' ' -f1", d)).stdout.trim();
  const bad = await run([BUN, CLI, "serve", "-p", "0", "--verify", p], { timeoutMs: 30_000 });
  assert.is(bad.code, 1);
  const lines = bad.stderr.replace(/\x1b\[[0-9;]*m/g, "").trim().split("\n"); // FORCE_COLOR (uvu) colours console.error
  assert.is(lines.length, 1, bad.stderr);
  assert.is(lines[0], `bun-nbd serve: ${p}: sha256 mismatch: expected ${expected}, got ${actual} (from disk.img.sha256 line 1)`);
  assert.not.match(bad.stdout, /Ready/);
  const other = join(fresh(), "other.img");
  copyFileSync(p, other);
  const none = await run([BUN, CLI, "serve", "-p", "0", "--verify", other], { timeoutMs: 30_000 });
  assert.is(none.code, 1);
  assert.match(none.stderr, /--verify: no checksum found for other\.img/);
});

test("sums parsing: GNU escapes, BSD tags, comments and PGP armour", () => {
  const text = [
    "-----BEGIN PGP SIGNED MESSAGE-----", "Hash: SHA256", "",
    `${"a".repeat(64)}  debian-12.iso`,
    `\\${"b".repeat(64)}  odd\\\\name\\nwith newline.img`,
    `SHA256 (tagged.img) = ${"C".repeat(64)}`,
    "# a comment", "-----BEGIN PGP SIGNATURE-----", "iQIzBAEBCgAdFiEE", "-----END PGP SIGNATURE-----",
  ].join("\n");
  const e = parseSums(text, "sha256");
  assert.equal(e.map((x) => x.name), ["debian-12.iso", "odd\\name\nwith newline.img", "tagged.img"]);
  assert.is(findEntry(e, "tagged.img")?.hash, "c".repeat(64));
});

test.run();
