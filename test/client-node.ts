// The client library runs under Node 20+ (node:net, node:fs, node:crypto only): bundle the
// examples for Node with `bun build --target=node` and run them with the system `node` against
// nbdkit, and check that nothing under src/client imports a Bun API.
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { Negotiation } from "../src/client/index.ts";
import { deadline } from "./helpers/assert.ts";
import { BUN, need, ROOT, runOk, scratch, SYSTEM_PATH } from "./helpers/env.ts";

need("node", "nbdkit", "sha256sum");
const dir = scratch("bun-nbd-client-node-");

// The one exception is the Bun transport adapter (and its TLS-PSK part, which only it imports),
// which only transport.ts loads, by a dynamic import taken under Bun: no other file may import
// them statically.
const BUN_ADAPTERS = ["transport-bun.ts", "transport-bun-psk.ts"];

test("src/client uses no Bun APIs", () => {
  for (const f of readdirSync(join(ROOT, "src/client"))) {
    const text = readFileSync(join(ROOT, "src/client", f), "utf8");
    if (BUN_ADAPTERS.includes(f)) continue;
    assert.not.match(text, /^(?:import|export)[^;(]*?from "\.\/transport-bun(-psk)?\.ts"/m, `${f} imports a Bun adapter statically`);
    assert.not.match(text, /from "bun(:[a-z]+)?"|\bBun\./, `${f} uses Bun`);
    for (const m of text.matchAll(/^(?:import|export)[^;]*?from "([^"]+)"/gm)) {
      const spec = m[1]!;
      assert.ok(spec.startsWith("node:") || spec.startsWith("./") || spec.startsWith("../protocol/"), `${f} imports ${spec}`);
    }
  }
});

test("the examples run under Node against nbdkit", () => deadline(60_000, "node", async () => {
  const version = (await runOk(["node", "--version"])).stdout.trim();
  assert.ok(Number(/^v(\d+)/.exec(version)?.[1]) >= 20, `node ${version}`);
  for (const ex of ["client-read", "client-copy"]) {
    await runOk([BUN, "build", join(ROOT, "examples", `${ex}.ts`), "--target=node", "--format=esm", `--outfile=${join(dir, `${ex}.mjs`)}`]);
  }
  const sock = join(dir, "k.sock");
  const proc = Bun.spawn(["nbdkit", "-f", "-U", sock, "data", '"bun-nbd" @1048576 ( "on node " * 512 ) @8388607 0'], {
    stdout: "ignore", stderr: "ignore", env: { ...process.env, PATH: SYSTEM_PATH },
  });
  try {
    for (let i = 0; ; i++) {
      try {
        await (await Negotiation.open({ transport: "unix", path: sock, exportName: "" }, { connectTimeoutMs: 1000 })).abort();
        break;
      } catch (e) {
        if (i > 200) throw e;
        await Bun.sleep(30);
      }
    }
    const uri = `nbd+unix:///?socket=${sock}`;
    const read = await runOk(["node", join(dir, "client-read.mjs"), uri, "--write"]);
    assert.match(read.stdout, /export "": 8388608 bytes/);
    assert.match(read.stdout, /first sector: 62756e2d6e6264/, "starts with \"bun-nbd\"");
    assert.match(read.stdout, /^ +1048576 \+\d+ data$/m);
    assert.match(read.stdout, /wrote and read back 4096 bytes at 8384512: same/);
    const out = join(dir, "copy.img");
    const copied = await runOk(["node", join(dir, "client-copy.mjs"), uri, out]);
    const sum = (await runOk(["sha256sum", out])).stdout.split(" ")[0]!;
    assert.match(copied.stdout, new RegExp(`^${sum}  `, "m"), "digest of the copy");
    assert.match(copied.stdout, /^8388608 bytes: \d+ data/m);
  } finally {
    proc.kill("SIGTERM");
    await proc.exited;
  }
}));

test.run();
