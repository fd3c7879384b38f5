// End-to-end TLS benchmark: the same raw image served by bun-nbd and nbdkit (file plugin), plain,
// with X.509 (--tls-certificates) and with PSK (--tls-psk), the same certificates and keys for both
// (made here with openssl/psktool), and one cipher suite everywhere: the GnuTLS clients and nbdkit
// get a priority file that leaves only TLS_AES_128_GCM_SHA256 (bun-nbd prefers it anyway). Prints
// MB/s or IOPS, bun-nbd/nbdkit, server CPU seconds per GiB moved, and what TLS costs bun-nbd
// against its plain path.
//
//   bun bench/tls-e2e.ts [--quick] [--runtime SECONDS] [--rounds N] [--dir DIR]
//                        [--kinds plain,x509,psk] [--only WORKLOAD,...] [--json FILE]
//
// Workloads: fio's nbd engine (1 MiB sequential read QD16, 4 KiB random read QD32) for plain and
// X.509 (fio cannot take ?tls-psk-file=, so its X.509 client certificates come from
// $HOME/.pki/libnbd, libnbd's default); the same two patterns from bench/lib/load.ts (bun-nbd's
// client, which speaks PSK too) for every kind; and `nbdcopy URI null:`. Servers listen on
// 127.0.0.1 ports 12520-12521; --rounds N keeps each server's best result per workload.
import { spawn, spawnSync, type Subprocess } from "bun";
import { cpSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { cpus } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { makePki, type Pki } from "../test/helpers/tls.ts";
import { benchScratch, CLK_TCK, cpuTicks, fio, fsType, PATH, ROOT, stopProcess, waitPort, writeRandomImage } from "./lib/harness.ts";

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;
const { values: opt } = parseArgs({
  options: {
    quick: { type: "boolean" }, runtime: { type: "string" }, rounds: { type: "string" }, dir: { type: "string" },
    kinds: { type: "string" }, only: { type: "string" }, json: { type: "string" }, help: { type: "boolean", short: "h" },
  },
});
if (opt.help) {
  console.log(readFileSync(new URL(import.meta.url)).toString().split("\n").filter((l) => l.startsWith("//")).map((l) => l.slice(3)).join("\n"));
  process.exit(0);
}
const RUNTIME = Number(opt.runtime ?? (opt.quick ? 3 : 8));
const SIZE = opt.quick ? GiB / 4 : GiB;
const ROUNDS = Math.max(1, Number(opt.rounds ?? 1));
type Kind = "plain" | "x509" | "psk";
const KINDS = (opt.kinds ?? "plain,x509,psk").split(",") as Kind[];
const SERVERS = ["bun", "nbdkit"] as const;
const SUITE = "TLS_AES_128_GCM_SHA256";

interface Workload { id: string; label: string; unit: "MB/s" | "IOPS"; kinds: Kind[]; fio?: string[]; load?: string[]; copy?: boolean }
const WORKLOADS: Workload[] = [
  { id: "fio-seqread-1m-qd16", label: "fio 1 MiB sequential read, QD16", unit: "MB/s", kinds: ["plain", "x509"], fio: ["--rw=read", "--bs=1m", "--iodepth=16"] },
  { id: "fio-randread-4k-qd32", label: "fio 4 KiB random read, QD32", unit: "IOPS", kinds: ["plain", "x509"], fio: ["--rw=randread", "--bs=4k", "--iodepth=32"] },
  { id: "load-seqread-1m-qd16", label: "client 1 MiB sequential read, QD16", unit: "MB/s", kinds: ["plain", "x509", "psk"], load: ["read", String(MiB), "16"] },
  { id: "load-randread-4k-qd32", label: "client 4 KiB random read, QD32", unit: "IOPS", kinds: ["plain", "x509", "psk"], load: ["randread", "4096", "32"] },
  { id: "nbdcopy-null", label: "nbdcopy URI null: (whole image)", unit: "MB/s", kinds: ["plain", "x509", "psk"], copy: true },
];
if (opt.only) {
  const keep = opt.only.split(",");
  WORKLOADS.splice(0, WORKLOADS.length, ...WORKLOADS.filter((w) => keep.includes(w.id)));
}

const { dir, running } = benchScratch("bun-nbd-tls-e2e-", opt.dir);

interface Started { proc: Subprocess; uri: string; fioUri: string; log: () => string }

function uriFor(kind: Kind, port: number, pki: Pki): { uri: string; fioUri: string } {
  if (kind === "plain") return { uri: `nbd://127.0.0.1:${port}/`, fioUri: `nbd://127.0.0.1:${port}/` };
  if (kind === "x509") return { uri: `nbds://localhost:${port}/?tls-certificates=${pki.client}`, fioUri: `nbds://localhost:${port}/` };
  return { uri: `nbds://alice@localhost:${port}/?tls-psk-file=${pki.psk}`, fioUri: "" };
}

async function start(server: "bun" | "nbdkit", kind: Kind, img: string, pki: Pki): Promise<Started> {
  const port = server === "bun" ? 12520 : 12521;
  // The same flags for both servers (bun-nbd takes nbdkit's option names).
  const tls = kind === "plain" ? [] : ["--tls=require", kind === "x509" ? `--tls-certificates=${pki.server}` : `--tls-psk=${pki.psk}`];
  const cmd = server === "bun"
    ? [process.execPath, join(ROOT, "src/cli.ts"), "serve", "-p", String(port), ...tls, img]
    : ["nbdkit", "-f", "-p", String(port), "-i", "127.0.0.1", ...tls, "file", `file=${img}`];
  let log = "";
  const proc = spawn(cmd, { stdout: "ignore", stderr: "pipe", stdin: "ignore", env: { ...process.env, PATH } });
  void (async () => { const d = new TextDecoder(); for await (const c of proc.stderr) log += d.decode(c, { stream: true }); })();
  running(proc);
  const u = uriFor(kind, port, pki);
  await waitPort(u.uri, proc, `${server} ${kind}`);
  return { proc, ...u, log: () => log };
}

async function stop(s: Started): Promise<void> {
  await stopProcess(s.proc);
  running(null);
}

function runWorkload(w: Workload, s: Started): { value: number; bytes: number } {
  if (w.fio) {
    const r = fio(w.id, s.fioUri, w.fio, SIZE, RUNTIME);
    return { value: w.unit === "IOPS" ? r.iops : r.mbps, bytes: r.bytes };
  }
  if (w.load) {
    const r = spawnSync([process.execPath, join(ROOT, "bench/lib/load.ts"), s.uri, ...w.load, String(RUNTIME)], { env: { ...process.env, PATH } });
    if (r.exitCode !== 0) throw new Error(`load ${w.id} failed: ${r.stderr.toString()}`);
    const j = JSON.parse(r.stdout.toString());
    return { value: w.unit === "IOPS" ? j.iops : j.mbps, bytes: j.bytes };
  }
  const t0 = performance.now();
  const r = spawnSync(["nbdcopy", s.uri, "null:"], { env: { ...process.env, PATH } });
  if (r.exitCode !== 0) throw new Error(`nbdcopy failed: ${r.stderr.toString()}`);
  return { value: SIZE / ((performance.now() - t0) / 1000) / 1e6, bytes: SIZE };
}

interface Result { value: number; bytes: number; cpu: number }
const fmt = (v: number | undefined, unit: string) => (v === undefined ? "-" : unit === "IOPS" ? Math.round(v).toLocaleString("en-US") : v.toFixed(0));
const ratio = (a?: Result, b?: Result) => (a && b && b.value > 0 ? `${(a.value / b.value).toFixed(2)}x` : "-");
const cpu = (r?: Result) => (r ? (r.cpu / (r.bytes / GiB)).toFixed(2) : "-");

async function main(): Promise<void> {
  const pki = await makePki(join(dir, "pki"));
  // One cipher suite for every GnuTLS peer (nbdkit, nbdinfo, nbdcopy, fio's libnbd).
  const prio = join(dir, "gnutls-priority.cfg");
  writeFileSync(prio, "[overrides]\n" + ["AES-256-GCM", "CHACHA20-POLY1305", "AES-128-CCM", "AES-256-CCM"].map((c) => `tls-disabled-cipher = ${c}\n`).join(""));
  process.env.GNUTLS_SYSTEM_PRIORITY_FILE = prio;
  const home = join(dir, "home");
  mkdirSync(join(home, ".pki"), { recursive: true });
  cpSync(pki.client, join(home, ".pki", "libnbd"), { recursive: true });
  process.env.HOME = home; // libnbd's default certificate directory, for fio
  const img = join(dir, "bench.img");
  console.error(`# creating a ${(SIZE / GiB).toFixed(2)} GiB image in ${dir} (${fsType(dir)})`);
  writeRandomImage(img, SIZE, 0x2545f491);
  spawnSync(["sync"]);
  const results: Record<string, Result> = {};
  const suites = new Set<string>();
  for (let round = 1; round <= ROUNDS; round++) {
    for (const kind of KINDS) {
      for (const server of SERVERS) {
        const s = await start(server, kind, img, pki);
        try {
          for (const w of WORKLOADS.filter((x) => x.kinds.includes(kind))) {
            const c0 = cpuTicks(s.proc.pid);
            const r = runWorkload(w, s);
            const cpuS = (cpuTicks(s.proc.pid) - c0) / CLK_TCK;
            const key = `${w.id}/${kind}/${server}`;
            if (!results[key] || r.value > results[key]!.value) results[key] = { ...r, cpu: cpuS };
            console.error(`# round ${round} ${kind.padEnd(5)} ${server.padEnd(6)} ${w.id.padEnd(22)} ${fmt(r.value, w.unit).padStart(9)} ${w.unit}  server CPU ${cpuS.toFixed(2)} s for ${(r.bytes / GiB).toFixed(2)} GiB`);
          }
        } finally {
          await stop(s);
        }
        for (const m of s.log().matchAll(/TLS established \((\S+ \S+)\)/g)) suites.add(m[1]!);
      }
    }
  }
  const lines = [
    "| workload | credentials | bun-nbd | nbdkit | bun-nbd/nbdkit | CPU s/GiB bun-nbd / nbdkit | bun-nbd TLS/plain |",
    "|---|---|---:|---:|---:|---:|---:|",
  ];
  for (const w of WORKLOADS) {
    for (const kind of KINDS.filter((k) => w.kinds.includes(k))) {
      const r = (srv: string, k: Kind = kind) => results[`${w.id}/${k}/${srv}`];
      lines.push(`| ${w.label} | ${kind} | ${fmt(r("bun")?.value, w.unit)} | ${fmt(r("nbdkit")?.value, w.unit)} | ${ratio(r("bun"), r("nbdkit"))} | ${cpu(r("bun"))} / ${cpu(r("nbdkit"))} | ${kind === "plain" ? "" : ratio(r("bun"), r("bun", "plain"))} |`);
    }
  }
  const v = (cmd: string[]) => spawnSync(cmd, { env: { ...process.env, PATH } }).stdout.toString().split("\n")[0]!.trim();
  const machine = [
    `${cpus().length} x ${cpus()[0]?.model ?? "?"}, Linux ${v(["uname", "-r"])}; Bun ${Bun.version}; ${v(["nbdkit", "--version"])}; ${v(["fio", "--version"])}; nbdcopy ${v(["nbdcopy", "--version"]).replace(/^nbdcopy /, "")}`,
    `image ${(SIZE / GiB).toFixed(2)} GiB (${fsType(dir)}), TCP 127.0.0.1, ${RUNTIME} s per workload, ${ROUNDS > 1 ? `best of ${ROUNDS} rounds` : "one round"}`,
    `cipher suite: GnuTLS peers limited to ${SUITE}; bun-nbd negotiated ${[...suites].join(", ") || "-"}`,
  ].join("\n");
  console.log(`\n${machine}\n\n${lines.join("\n")}`);
  if (opt.json) writeFileSync(opt.json, JSON.stringify({ machine, results }, null, 2));
}

await main();
