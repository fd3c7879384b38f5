// Regression tests for what the fuzzer (test/fuzz/) found: one test per bug, each with the smallest
// input that showed it. Run alone with: bun x --bun uvu test "fuzz-regressions\.ts$"
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { NBD_OPT_GO, NBD_OPT_LIST, NBD_REP_ACK, NBD_REP_ERR_INVALID } from "../src/protocol/constants.ts";
import { MemoryDevice } from "../src/devices/memory.ts";
import { parseCue } from "../src/devices/cd/cue.ts";
import { deadline } from "./helpers/assert.ts";
import { cat, clientFlags, fakeSession, option, parseServer } from "./helpers/wire.ts";

const test = suite("fuzz regressions");
const MiB = 1024 * 1024;

test("an option dribbled in one byte at a time is buffered in linear time (was quadratic: a CPU DoS)", () => deadline(10_000, "dribbled option", async () => {
  // A 512 KiB GO option (its name length lies), then LIST, fed byte by byte. The handshake used to
  // copy everything pending on every chunk: 512 Ki chunks x 256 KiB = 128 GiB of copying.
  const { t, s } = fakeSession([{ name: "disk", device: new MemoryDevice(MiB) }]);
  const data = new Uint8Array(512 * 1024).fill(0x61);
  const input = cat(clientFlags(), option(NBD_OPT_GO, data), option(NBD_OPT_LIST));
  for (let i = 0; i < input.length; i++) {
    s.onData(input.subarray(i, i + 1));
    if (i % 4096 === 0) await new Promise((r) => setImmediate(r)); // let the deadline fire
  }
  const replies = parseServer(t.bytes()).filter((m) => m.kind === "optreply");
  assert.equal(replies.map((m) => m.kind === "optreply" && [m.option, m.type]).slice(0, 1), [[NBD_OPT_GO, NBD_REP_ERR_INVALID]]);
  assert.equal(replies.at(-1)!.kind === "optreply" && replies.at(-1)!.type, NBD_REP_ACK);
}));

test("CUE: a file's last track without INDEX 01 is refused at the next FILE line (was a TypeError when laid out)", () => {
  const sheet = 'FILE "a.bin" BINARY\n  TRACK 01 MODE1/2352\nFILE "b.bin" BINARY\n  TRACK 02 MODE1/2352\n    INDEX 01 00:00:00\n';
  assert.throws(() => parseCue(new TextEncoder().encode(sheet), "x.cue"), /x\.cue:2: TRACK 01 has no INDEX 01/);
});

test.run();
