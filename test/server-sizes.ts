// Export sizes around 2^31, 2^32 and 2^53 are exact on the wire (no 32-bit or float truncation),
// and requests at the very end of such exports work; one byte further is an error.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { NBD_CMD_READ, NBD_CMD_WRITE, NBD_EINVAL, NBD_ENOSPC, NBD_INFO_BLOCK_SIZE, NBD_OPT_GO, NBD_REP_INFO } from "../src/protocol/constants.ts";
import { getU16, getU64 } from "../src/protocol/codec.ts";
import { MemoryDevice } from "../src/devices/memory.ts";
import { bytesEqual } from "./helpers/assert.ts";
import { cat, clientFlags, encodeInfoRequest, fakeSession, type Msg, option, parseServer, request } from "./helpers/wire.ts";

const sizes = [2 ** 31 - 512, 2 ** 31, 2 ** 31 + 512, 2 ** 32 - 512, 2 ** 32, 2 ** 32 + 512, 2 ** 53 - 4096, 2 ** 53];

for (const size of sizes) {
  test(`export of ${size} bytes (2^${Math.log2(size).toFixed(6)})`, () => {
    const { t, s } = fakeSession([{ name: "big", device: new MemoryDevice(size) }]);
    s.onData(cat(clientFlags(), option(NBD_OPT_GO, encodeInfoRequest("big", [NBD_INFO_BLOCK_SIZE]))));
    const info = parseServer(t.bytes()).find((m) => m.kind === "optreply" && m.type === NBD_REP_INFO && getU16(m.data, 0) === 0) as Extract<Msg, { kind: "optreply" }>;
    assert.is(getU64(info.data, 2), size, "INFO_EXPORT size");
    const data = Uint8Array.from({ length: 1024 }, (_, i) => i & 255);
    t.out = [];
    s.onData(cat(
      request(NBD_CMD_WRITE, { cookie: 1, offset: size - 1024, payload: data }),
      request(NBD_CMD_READ, { cookie: 2, offset: size - 1024, length: 1024 }),
      request(NBD_CMD_READ, { cookie: 3, offset: size - 1023, length: 1024 }),
      request(NBD_CMD_WRITE, { cookie: 4, offset: size - 1, payload: data.subarray(0, 2) }),
      request(NBD_CMD_READ, { cookie: 5, offset: size, length: 1 }),
    ));
    const r = parseServer(t.bytes(), { readLengths: new Map([[2, 1024]]) }) as Extract<Msg, { kind: "simple" }>[];
    assert.equal(r.map((m) => [m.cookie, m.error]), [[1, 0], [2, 0], [3, NBD_EINVAL], [4, NBD_ENOSPC], [5, NBD_EINVAL]]);
    bytesEqual(r[1]!.data!, data, "last KiB read back");
  });
}

test("2^53 export: a request whose end rounds to 2^53 in floating point is still out of range", () => {
  const size = 2 ** 53;
  const { t, s } = fakeSession([{ name: "big", device: new MemoryDevice(size) }]);
  s.onData(cat(clientFlags(), option(NBD_OPT_GO, encodeInfoRequest("big", []))));
  t.out = [];
  // (2^53 - 1) + 2 is 2^53 + 1, which a double rounds to 2^53: the naive check would pass.
  const at = (b: Uint8Array) => { b.set([0x00, 0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], 16); return b; };
  s.onData(cat(
    at(request(NBD_CMD_WRITE, { cookie: 1, payload: new Uint8Array(2) })),
    at(request(NBD_CMD_READ, { cookie: 2, length: 2 })),
    at(request(NBD_CMD_WRITE, { cookie: 3, payload: new Uint8Array(1) })),
  ));
  const r = parseServer(t.bytes()) as Extract<Msg, { kind: "simple" }>[];
  assert.equal(r.map((m) => [m.cookie, m.error]), [[1, NBD_ENOSPC], [2, NBD_EINVAL], [3, 0]]);
});

test.run();
