// The fuzzer in CI: `npm run fuzz` with a fixed seed and a short budget (all three modes: the
// in-process session, the file parsers, hostile sockets against a real server). A finding fails
// the test with the fuzzer's report, which names the oracle and the command that replays it.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { BUN, ROOT, run } from "./helpers/env.ts";

const SECONDS = Number(process.env.FUZZ_SECONDS ?? 40);
const SEED = Number(process.env.FUZZ_SEED ?? 1);

const test = suite("fuzz");

test(`npm run fuzz -- --seconds ${SECONDS} --seed ${SEED}: no finding`, async () => {
  const r = await run([BUN, "test/fuzz/cli.ts", "--seconds", String(SECONDS), "--seed", String(SEED), "--stall", "30"], {
    cwd: ROOT, timeoutMs: (SECONDS + 60) * 1000,
  });
  const out = r.stdout + r.stderr;
  assert.ok(/fuzz: \d+ inputs in all/.test(out), `the fuzzer did not finish:\n${out}`);
  for (const mode of ["session", "parsers", "socket"]) {
    const m = new RegExp(`fuzz ${mode}: (\\d+) inputs`).exec(out);
    assert.ok(m && Number(m[1]) > 0, `mode ${mode} ran no input:\n${out}`);
  }
  assert.is(r.code, 0, `the fuzzer reported a finding:\n${out}`);
});

test.run();
