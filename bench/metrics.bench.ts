// What the metrics cost per request on the hot path: ExportStats.record (two performance.now()
// reads, counter bumps, a bucket search over 16 bounds) against the bare clock read it needs.
// NO_COLOR=1 node_modules/.bin/bun bench/metrics.bench.ts
import { bench, run, summary } from "mitata";
import { ExportStats } from "../src/server/metrics.ts";

const s = new ExportStats("disk");
let t = 0;
summary(() => {
  bench("performance.now() x2 (the clock reads alone)", () => { t += performance.now(); t -= performance.now(); });
  bench("ExportStats.record (read, 4 KiB)", () => { s.record(0, 4096, 0, performance.now()); });
  bench("ExportStats.record (error)", () => { s.record(1, 4096, 5, performance.now()); });
});
await run();
