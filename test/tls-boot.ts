// QEMU boots over TLS: the same SeaBIOS guest as boot-qemu.ts (int 13h reads, a write, a read-back,
// exit status 33) from a bun-nbd export that requires TLS, once with -object tls-creds-x509
// (client certificate checked with --tls-verify-peer) and once with -object tls-creds-psk. The
// sector the guest wrote is then checked in the file.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { copyFileSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { bytesEqual } from "./helpers/assert.ts";
import { need, ROOT, scratch } from "./helpers/env.ts";
import { serve } from "./helpers/server.ts";
import { makePki, type Pki } from "./helpers/tls.ts";
import { BOOT_TIMEOUT_MS, bootArgs, fileBytes } from "./e2e/boot.ts";
import { expectedWrittenSector, hdExpectations, MiB } from "./e2e/images.ts";
import { runQemu, tail } from "./e2e/qemu.ts";

const test = suite("tls-boot");
const dir = scratch("bun-nbd-tls-boot-");
let pki: Pki;

test.before(async () => {
  need("qemu-system-x86_64", "openssl", "psktool");
  pki = await makePki(join(dir, "pki"));
});

async function bootOverTls(tag: string, serverArgs: string[], creds: string): Promise<void> {
  const d = join(dir, tag);
  mkdirSync(d, { recursive: true });
  const image = join(d, "boot.img");
  copyFileSync(join(ROOT, "examples/boot.img"), image);
  const want = hdExpectations(4 * MiB);
  const server = await serve(["--tls=require", ...serverArgs, image]);
  try {
    const args = [
      ...bootArgs("ide", "unused").slice(0, -2), "-object", creds,
      "-drive", `file.driver=nbd,file.server.type=inet,file.server.host=localhost,file.server.port=${server.port},file.export=boot,file.tls-creds=tls0,format=raw,if=ide`,
    ];
    const run = await runQemu(args, { timeoutMs: BOOT_TIMEOUT_MS, logDir: join(d, "log") });
    const problems: string[] = [];
    if (run.code !== 33) problems.push(`QEMU exit status ${run.code}${run.timedOut ? " (timed out)" : ""}, want 33: ${run.stderr}`);
    let from = 0;
    for (const e of want.expect) {
      const i = run.lines.findIndex((l, k) => k >= from && l.text.includes(e));
      if (i < 0) problems.push(`missing serial line ${JSON.stringify(e)}`);
      else from = i;
    }
    assert.ok(problems.length === 0, `${problems.join("\n")}\nserial tail:\n${tail(run)}`);
    assert.match(server.output(), /TLS established/);
  } finally {
    assert.is(await server.stop(), 0, "server exit status after SIGTERM");
  }
  bytesEqual(fileBytes(image, want.writeLba * 512, 512), expectedWrittenSector(), "written sector in the image file");
}

test("QEMU boots with -object tls-creds-x509 (client certificate verified)", () =>
  bootOverTls("x509", ["--tls-certificates", pki.server, "--tls-verify-peer"], `tls-creds-x509,id=tls0,dir=${pki.client},endpoint=client`));

test("QEMU boots with -object tls-creds-psk", () =>
  bootOverTls("psk", ["--tls-psk", pki.psk], `tls-creds-psk,id=tls0,dir=${pki.pskDir},username=alice,endpoint=client`));

test.run();
