// --metrics and --log-format json against the real CLI: curl scrapes /metrics and every line must
// be valid Prometheus text (HELP/TYPE comments or a sample), with the counts of what the test did
// (bytes, requests by command, errors by errno, a consistent latency histogram, connections);
// /healthz answers; every log line is one JSON object, and connection lines carry peer and export.
import { suite } from "uvu";
import * as assert from "uvu/assert";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { need, run, runOk, scratch, SYSTEM_PATH } from "./helpers/env.ts";
import { serve } from "./helpers/server.ts";
import { connect } from "../src/client/index.ts";
import { parseExposition, samplesOf } from "./helpers/exposition.ts";

const test = suite("metrics and logs");
const dir = scratch("bun-nbd-metrics-");
const disk = join(dir, "disk.img");
writeFileSync(disk, new Uint8Array(1 << 20));

test.before(() => need("curl", "nbdsh"));

const get = samplesOf;

test("curl scrapes /metrics: valid text format, the counts of what was done; /healthz", async () => {
  const s = await serve(["--metrics", "127.0.0.1:0", "--log-format", "json", "--verbose", disk]);
  try {
    const url = /Metrics at (http:\/\/127\.0\.0\.1:\d+\/metrics)/.exec(s.output())?.[1];
    assert.ok(url, s.output());
    const c = await connect(s.uri("disk"));
    await c.pwrite(new Uint8Array(8192).fill(1), 0);
    for (let i = 0; i < 3; i++) await c.read(4096 * i, 4096);
    await c.flush();
    // one request the server refuses (EINVAL): libnbd with its client-side checks off
    const r = await run(["nbdsh", "-u", s.uri("disk"), "-c", "h.set_strict_mode(0)",
      "-c", "try:\n  h.pread(512, 1 << 21)\nexcept nbd.Error as e:\n  print('errno', e.errno)"], { env: { PATH: SYSTEM_PATH } });
    assert.match(r.stdout, /errno/, r.stderr);
    const text = (await runOk(["curl", "-sS", "--max-time", "10", url!])).stdout;
    const m = parseExposition(text);
    const one = (name: string, labels: Record<string, string>) => {
      const x = get(m, name, labels);
      assert.is(x.length, 1, `${name} ${JSON.stringify(labels)}`);
      return x[0]!.value;
    };
    const e = { export: "disk" };
    assert.is(one("bun_nbd_written_bytes_total", e), 8192);
    assert.is(one("bun_nbd_read_bytes_total", e), 3 * 4096);
    assert.is(one("bun_nbd_requests_total", { ...e, command: "write" }), 1);
    assert.is(one("bun_nbd_requests_total", { ...e, command: "read" }), 4);
    assert.is(one("bun_nbd_requests_total", { ...e, command: "flush" }), 1);
    assert.is(one("bun_nbd_request_errors_total", { ...e, errno: "EINVAL" }), 1);
    assert.is(one("bun_nbd_export_connections", e), 1, "our client is still connected");
    assert.ok(one("bun_nbd_connections", {}) >= 1);
    const buckets = get(m, "bun_nbd_request_duration_seconds_bucket", e);
    assert.ok(buckets.length > 10);
    for (let i = 1; i < buckets.length; i++) assert.ok(buckets[i]!.value >= buckets[i - 1]!.value, "buckets are cumulative");
    const count = one("bun_nbd_request_duration_seconds_count", e);
    assert.is(buckets.at(-1)!.labels.le, "+Inf");
    assert.is(buckets.at(-1)!.value, count);
    const total = get(m, "bun_nbd_requests_total", e).reduce((a, x) => a + x.value, 0);
    assert.is(count, total, "every answered request is in the histogram");
    assert.ok(one("bun_nbd_request_duration_seconds_sum", e) > 0);
    assert.is(m.filter((x) => x.name.startsWith("bun_nbd_remote_")).length, 0, "no remote image, no remote series");
    await c.close();
    assert.is((await runOk(["curl", "-sS", url!.replace("/metrics", "/healthz")])).stdout, "ok\n");
    assert.is((await run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url!.replace("/metrics", "/nope")])).stdout, "404");
  } finally {
    assert.is(await s.stop(), 0);
  }
  // --log-format json: every line one object with time, level, message
  const lines = s.output().split("\n").filter((l) => l.trim() !== "");
  const objs = lines.map((l) => {
    try { return JSON.parse(l); } catch { throw new Error(`not a JSON log line: ${l}`); }
  });
  for (const o of objs) {
    assert.type(o.time, "string");
    assert.ok(!Number.isNaN(Date.parse(o.time)), o.time);
    assert.ok(["debug", "info", "warning", "error"].includes(o.level), o.level);
    assert.type(o.message, "string");
  }
  const opened = objs.filter((o) => /connection from/.test(o.message));
  assert.ok(opened.length >= 2 && opened.every((o) => o.peer === "127.0.0.1" && typeof o.conn === "number"), JSON.stringify(opened));
  const closed = objs.filter((o) => /\] closed$/.test(o.message));
  assert.ok(closed.some((o) => o.peer === "127.0.0.1" && o.export === "disk"), JSON.stringify(closed));
  const chose = objs.find((o) => /export "disk"/.test(o.message) && o.export === "disk");
  assert.ok(chose, "the export-chosen line carries the export");
  const einval = objs.find((o) => o.errno === "EINVAL");
  assert.ok(einval && einval.command === "READ" && einval.export === "disk" && einval.peer === "127.0.0.1", JSON.stringify(einval));
});

test("text logs stay as they were; a bad --metrics or --log-format is a clear error", async () => {
  const s = await serve([disk]);
  try {
    assert.match(s.output(), /Ready\. Press Ctrl-C to stop\./);
    assert.not.match(s.output(), /^\{/m);
  } finally {
    await s.stop();
  }
  const { BUN, CLI } = await import("./helpers/env.ts");
  const bad = await run([BUN, CLI, "serve", "--metrics", "nope", disk]);
  assert.is(bad.code, 2);
  assert.match(bad.stderr, /--metrics: "nope" is not HOST:PORT or \[IPV6\]:PORT/);
  const fmt = await run([BUN, CLI, "serve", "--log-format", "xml", disk]);
  assert.is(fmt.code, 2);
  assert.match(fmt.stderr, /--log-format must be text or json, not "xml"/);
});

test.run();
