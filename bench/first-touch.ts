// What this machine charges for memory the first time it is touched: writes GiB after GiB into
// files on a tmpfs (memory, no disk), keeping them all, and prints each GiB's speed. On a physical
// machine every GiB runs at memory speed. In a VM whose hypervisor backs guest memory lazily and
// takes free pages back (Firecracker with free page reporting, as here: see `dmesg | grep
// page_reporting`), the first GiB or two reuse pages the guest freed a moment ago and run at
// memory speed, and the rest fault every page in from the host, several times slower. Every
// benchmark that allocates memory pays this: a server filling a cache file (a remote image's
// persistent cache), the page cache filling with an image after it was dropped, nbdcopy's and the
// kernel's buffers. It is why whole-image rows move between runs and machines; read their
// ratios with this table beside them.
//
//   bun bench/first-touch.ts [--gib N (default 4)] [--dir DIR (default /dev/shm)]
import { closeSync, mkdtempSync, openSync, rmSync, writeSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { fsType } from "./lib/harness.ts";

const { values: opt } = parseArgs({ options: { gib: { type: "string" }, dir: { type: "string" } } });
const GIB = Math.max(1, Number(opt.gib ?? 4));
const parent = opt.dir ?? "/dev/shm";
const dir = mkdtempSync(join(parent, "bun-nbd-touch-"));
const chunk = new Uint8Array(1 << 20).fill(0x5a);
console.log(`${GIB} files of 1 GiB written into ${dir} (${fsType(dir)}), all kept until the end:\n`);
console.log("| GiB | MB/s |");
console.log("|---:|---:|");
try {
  for (let g = 0; g < GIB; g++) {
    const fd = openSync(join(dir, `f${g}`), "w");
    const t0 = performance.now();
    for (let i = 0; i < 1024; i++) writeSync(fd, chunk);
    const s = (performance.now() - t0) / 1000;
    closeSync(fd);
    console.log(`| ${g + 1} | ${(2 ** 30 / s / 1e6).toFixed(0)} |`);
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
