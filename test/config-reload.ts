// `serve --config` and SIGHUP, against the real CLI: a new export appears in LIST (nbdinfo), a
// removed one refuses new connections while a connection opened before keeps working to the end,
// a changed one applies to new connections only, and a config that fails to load (bad syntax, a
// missing file, an overlay that will not open) is logged and the running one kept.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { bytesEqual } from "./helpers/assert.ts";
import { need, run, scratch } from "./helpers/env.ts";
import { serve, type Served } from "./helpers/server.ts";
import { connect, NbdOptionError } from "../src/client/index.ts";

const test = suite("config reload");
const dir = scratch("bun-nbd-reload-");
const MiB = 1 << 20;

function image(name: string, fill: number): string {
  const p = join(dir, name);
  writeFileSync(p, new Uint8Array(MiB).fill(fill));
  return p;
}
const A = image("a.img", 0xaa);
const B = image("b.img", 0xbb);
const C = image("c.img", 0xcc);
const cfg = join(dir, "bun-nbd.toml");
const exp = (name: string, file: string, extra = "") => `[[export]]\nname = "${name}"\nfile = "${file}"\n${extra}\n`;

/** SIGHUP, then wait for the server's log line about it (success or failure). */
async function hup(s: Served): Promise<string> {
  const before = s.output().length;
  s.proc.kill("SIGHUP");
  const limit = Date.now() + 10_000;
  for (;;) {
    const tail = s.output().slice(before);
    const m = /^.*(reloaded |reload of ).*$/m.exec(tail);
    if (m) return m[0];
    if (Date.now() > limit) throw new Error(`no reload line after SIGHUP:\n${s.output()}`);
    await Bun.sleep(20);
  }
}

async function listed(s: Served): Promise<Record<string, string>> {
  const r = await run(["nbdinfo", "--list", "--json", s.uri("")]);
  assert.is(r.code, 0, r.stderr);
  return Object.fromEntries(JSON.parse(r.stdout).exports.map((e: { "export-name": string; description?: string }) => [e["export-name"], e.description ?? ""]));
}

const first = (b: Uint8Array) => b[0];

test.before(() => need("nbdinfo"));

test("SIGHUP: added, removed, changed exports; a failed reload keeps the running table", async () => {
  writeFileSync(cfg, `[server]\nlisten = ["127.0.0.1:0"]\n${exp("alpha", A)}${exp("beta", B)}`);
  const s = await serve(["--config", cfg]);
  try {
    assert.equal(Object.keys(await listed(s)), ["alpha", "beta"]);

    // 1. a new export appears in LIST and serves its file
    writeFileSync(cfg, `[server]\nlisten = ["127.0.0.1:0"]\n${exp("alpha", A)}${exp("beta", B)}${exp("gamma", C, 'description = "the third"')}`);
    assert.match(await hup(s), /reloaded .*1 added \(gamma\), 0 removed, 0 changed, 2 unchanged/);
    const l = await listed(s);
    assert.equal(Object.keys(l), ["alpha", "beta", "gamma"]);
    assert.is(l.gamma, "the third");
    const g = await connect(s.uri("gamma"));
    assert.is(first(await g.read(0, 512)), 0xcc);
    await g.close();

    // 2. a removed export refuses new connections; one opened before keeps working until it closes
    const oldBeta = await connect(s.uri("beta"));
    const oldAlpha = await connect(s.uri("alpha"));
    writeFileSync(cfg, `[server]\nlisten = ["127.0.0.1:0"]\n${exp("alpha", C, 'description = "now c"')}${exp("gamma", C, 'description = "the third"')}`);
    assert.match(await hup(s), /1 removed \(beta\), 1 changed \(alpha\), 1 unchanged/);
    assert.equal(Object.keys(await listed(s)), ["alpha", "gamma"]);
    let refused: unknown = null;
    try { await (await connect(s.uri("beta"))).close(); } catch (e) { refused = e; }
    assert.ok(refused instanceof NbdOptionError && refused.code === "ERR_UNKNOWN", `beta refused with ERR_UNKNOWN: ${refused}`);
    assert.is(first(await oldBeta.read(0, 512)), 0xbb, "the old connection still reads beta");
    await oldBeta.pwrite(new Uint8Array(4096).fill(0x11), 0);
    await oldBeta.flush();
    await oldBeta.close();
    const inFile = new Uint8Array(await Bun.file(B).slice(0, 4096).arrayBuffer());
    bytesEqual(inFile, new Uint8Array(4096).fill(0x11), "the old connection's write reached b.img");

    // 3. a changed export: the connection opened before sees the old stack, new ones the new
    assert.is(first(await oldAlpha.read(0, 512)), 0xaa, "old connection: a.img");
    const newAlpha = await connect(s.uri("alpha"));
    assert.is(first(await newAlpha.read(0, 512)), 0xcc, "new connection: c.img");
    await newAlpha.close();
    await oldAlpha.close();
    assert.is((await listed(s)).alpha, "now c");

    // 4. configs that fail to load: logged with file and line, the running table kept
    const running = await listed(s);
    writeFileSync(cfg, `[server]\nlisten = ["127.0.0.1:0"]\n${exp("alpha", A)}[[export]]\nname = = "x"\n`);
    assert.match(await hup(s), /reload of .*bun-nbd\.toml failed, keeping the running configuration: .*bun-nbd\.toml:8: syntax error/);
    assert.equal(await listed(s), running);
    writeFileSync(cfg, `[server]\nlisten = ["127.0.0.1:0"]\n${exp("alpha", A)}${exp("delta", join(dir, "missing.img"))}`);
    assert.match(await hup(s), /failed, keeping the running configuration: .*bun-nbd\.toml:9: export\[2\]\.file: no such file: .*missing\.img/);
    const bad = join(dir, "garbage.qcow2");
    writeFileSync(bad, new Uint8Array(65536).fill(7));
    writeFileSync(cfg, `[server]\nlisten = ["127.0.0.1:0"]\n${exp("alpha", A)}${exp("delta", A, `overlay = "${bad}"`)}`);
    assert.match(await hup(s), /failed, keeping the running configuration: .*bun-nbd\.toml:7: export "delta": /);
    assert.equal(await listed(s), running);
    const still = await connect(s.uri("alpha"));
    assert.is(first(await still.read(0, 512)), 0xcc, "alpha still serves c.img");
    await still.close();
  } finally {
    assert.is(await s.stop(), 0, s.output());
  }
});

test("without --config, SIGHUP is logged and changes nothing", async () => {
  const s = await serve([A]);
  try {
    const before = s.output().length;
    s.proc.kill("SIGHUP");
    const limit = Date.now() + 5000;
    while (!/no config file to reload/.test(s.output().slice(before))) {
      if (Date.now() > limit) throw new Error(s.output());
      await Bun.sleep(20);
    }
    assert.equal(Object.keys(await listed(s)), ["a"]);
  } finally {
    assert.is(await s.stop(), 0);
  }
});

test.run();
