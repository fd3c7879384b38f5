// `bun-nbd serve [options] FILE...`: parse flags, open exports, listen, print how to connect, and
// shut down cleanly on SIGINT/SIGTERM. Wiring only.
import { commandArgs } from "./args.ts";
import { REMOTE_FLAGS, REMOTE_HELP, remoteSettings } from "./remote-args.ts";
import { openExports } from "../devices/open.ts";
import { describeExports, describe } from "../devices/partition-exports.ts";
import { qemuLine, type Report } from "../inspect/index.ts";
import { createLogger } from "../server/log.ts";
import { NbdServer } from "../server/server.ts";
import { formatSize } from "./format.ts";
import { VERSION } from "../version.ts";
import { progressBar } from "./progress.ts";
import { verifyImage } from "../verify/verify.ts";

const HELP = `usage: bun-nbd serve [options] FILE...

Serve disk images over NBD. Each FILE becomes an export named after the file without its
extension (disk.img -> "disk"); the first one is also the default export "".
What FILE is comes from its content: raw images (.img, .ima, .vfd, .flp, .raw, anything else) are
served byte for byte; CD images (.cue, .ccd, or lone raw sectors) as cooked and raw track views;
ISO 9660 images like a CD (read-only, 2048-byte blocks); .xz/.gz/.zip/.imz images as their
uncompressed bytes (read-only; archive.zip/MEMBER picks a member); VHDs (fixed: read-write;
dynamic: read-only); qcow2 overlays as themselves. Each partition of an MBR or GPT disk is also
offered as NAME/p1, NAME/p2, ... (logical partitions from p5).
A FILE may be remote: https://host/path/disk.img or s3://BUCKET/KEY (raw, ISO, fixed VHD, or a
CUE sheet whose BINs sit next to it), read through a local cache (see below).
On start, serve says what each export holds and prints a QEMU command line that fits it.

options:
  -p, --port PORT      TCP port (default 10809; 0 picks a free one)
  -b, --bind ADDR      address to listen on (default 127.0.0.1; repeatable, e.g. -b ::1).
                       Only loopback is served by default: to serve other hosts, bind their
                       interface address (or 0.0.0.0 / ::) and mind that NBD has no authentication.
  -k, --socket PATH    listen on a unix socket (TCP is then off unless -p or -b is given too)
  -r, --read-only      export read-only (files are opened read-only)
  -n, --name NAME      export name (one FILE only)
  -o, --overlay FILE   send every write to this qcow2 overlay (created if missing); FILE is the
                       base and is never modified. A CD image is then one export: the cooked
                       view of its first data track
  -s, --snapshot       like --overlay with a temporary overlay that is deleted at exit
      --compat         create overlays with standard L2 entries (for QEMU older than 5.2)
      --no-partitions  do not offer partition exports (NAME/pN)
      --verify         check each FILE against its checksum first (FILE.sha256, SHA256SUMS, ...
                       beside it; see bun-nbd verify) and refuse to serve on a mismatch
  -v, --verbose        log every request (debug)
  -q, --quiet          log only warnings and errors
  -h, --help           this help
  -V, --version        print the version

${REMOTE_HELP}

Connect with, for example:
  qemu-system-x86_64 -drive file=nbd://127.0.0.1:10809/NAME,format=raw
  nbdinfo nbd://127.0.0.1:10809/NAME
  nbd-client 127.0.0.1 10809 /dev/nbd0 -N NAME`;

export async function main(argv: string[]): Promise<number> {
  const args = commandArgs("serve", HELP, argv, {
    port: { type: "string", short: "p" },
    bind: { type: "string", short: "b", multiple: true },
    socket: { type: "string", short: "k" },
    "read-only": { type: "boolean", short: "r" },
    name: { type: "string", short: "n" },
    overlay: { type: "string", short: "o" },
    snapshot: { type: "boolean", short: "s" },
    compat: { type: "boolean" },
    "no-partitions": { type: "boolean" },
    verify: { type: "boolean" },
    verbose: { type: "boolean", short: "v" },
    quiet: { type: "boolean", short: "q" },
    version: { type: "boolean", short: "V" },
    ...REMOTE_FLAGS,
  }, { min: 0, max: Infinity, what: "FILE..." });
  if (typeof args === "number") return args;
  const o = args.values;
  if (o.version) { console.log(VERSION); return 0; }
  if (args.positionals.length === 0) {
    console.error("bun-nbd serve: no FILE given (see bun-nbd serve --help)");
    return 2;
  }
  let port = 10809;
  if (o.port !== undefined) {
    port = Number(o.port);
    if (!/^\d+$/.test(o.port) || port > 65535) {
      console.error(`bun-nbd serve: invalid port "${o.port}"`);
      return 2;
    }
  }
  if (o.overlay && o.snapshot) {
    console.error("bun-nbd serve: --overlay and --snapshot cannot be used together");
    return 2;
  }
  const useTcp = !o.socket || o.port !== undefined || o.bind !== undefined;
  const binds = o.bind ?? ["127.0.0.1"];
  const log = createLogger(o.verbose ? "debug" : o.quiet ? "warn" : "info");

  if (o.verify) {
    for (const file of args.positionals) {
      try {
        for (const c of await verifyImage(file, { progress: (f) => (o.quiet ? undefined : progressBar(`verifying ${f}`)) })) {
          if (!c.ok) {
            console.error(`bun-nbd serve: ${c.file}: ${c.algo} mismatch: expected ${c.expected}, got ${c.actual} (from ${c.source})`);
            return 1;
          }
          log.info(`${c.file}: ${c.algo} matches ${c.source}`);
        }
      } catch (e) {
        console.error(`bun-nbd serve: --verify: ${(e as Error).message}`);
        return 1;
      }
    }
  }

  let specs;
  try {
    const remote = remoteSettings(o);
    specs = await openExports(args.positionals, {
      readOnly: o["read-only"], name: o.name, overlay: o.overlay, snapshot: o.snapshot, compat: o.compat,
      log: (m) => log.warn(m), info: (m) => log.info(m), remote,
    });
  } catch (e) {
    console.error(`bun-nbd serve: ${(e as Error).message}`);
    return 1;
  }
  let reports: Map<string, Report>;
  try {
    ({ specs, reports } = await describeExports(specs, { partitions: !o["no-partitions"], log: (m) => log.warn(m) }));
  } catch (e) {
    console.error(`bun-nbd serve: ${(e as Error).message}`);
    for (const s of specs) await s.device.close?.();
    return 1;
  }

  let server: NbdServer;
  try {
    server = new NbdServer(specs, { readOnly: o["read-only"], log });
  } catch (e) {
    console.error(`bun-nbd serve: ${(e as Error).message}`);
    for (const s of specs) await s.device.close?.();
    return 1;
  }
  const uris: string[][] = [];
  try {
    if (useTcp) {
      for (const host of binds) {
        const { port: bound } = server.listenTcp(host, port);
        port = bound; // with -p 0, every address uses the port the first one got
        const h = host.includes(":") ? `[${host}]` : host;
        uris.push(server.exports.map((e) => `nbd://${h}:${bound}/${uriName(e.name)}`));
      }
    }
    if (o.socket) {
      server.listenUnix(o.socket);
      uris.push(server.exports.map((e) => `nbd+unix:///${uriName(e.name)}?socket=${o.socket}`));
    }
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    const msg = code === "EADDRINUSE" ? `port ${port} is already in use (choose another with -p)`
      : code === "EADDRNOTAVAIL" ? `cannot bind ${binds.join(", ")}: no such local address`
      : code === "EACCES" ? `permission denied listening on port ${port}` : (e as Error).message;
    console.error(`bun-nbd serve: ${msg}`);
    await server.close(0);
    return 1;
  }

  const w = Math.max(...server.exports.map((e) => e.name.length));
  console.log(`bun-nbd ${VERSION}: serving ${server.exports.length} export${server.exports.length > 1 ? "s" : ""}`);
  server.exports.forEach((e, i) => {
    const mode = e.caps.canWrite ? "read-write" : "read-only";
    const where = uris.map((u) => u[i]).join("  ");
    console.log(`  ${e.name.padEnd(w)}  ${formatSize(e.size).padStart(9)}  ${mode.padEnd(10)}  ${where}${i === 0 ? "  (default export)" : ""}`);
    const report = reports.get(e.name);
    if (!report) return;
    const indent = "      ";
    console.log(`${indent}${describe(report)}`);
    if (!e.name.includes("/")) console.log(`${indent}${qemuLine(report, uris[0]![i]!, !e.caps.canWrite)}`);
  });
  console.log("Ready. Press Ctrl-C to stop.");

  return await new Promise<number>((resolve) => {
    let stopping = false;
    const stop = (sig: string) => {
      if (stopping) return;
      stopping = true;
      log.info(`${sig}: finishing in-flight requests and closing`);
      server.close().then(() => resolve(0), (e: Error) => { log.error(e.message); resolve(1); });
    };
    process.on("SIGINT", () => stop("SIGINT"));
    process.on("SIGTERM", () => stop("SIGTERM"));
  });
}

/** An export name in a URI path: percent-encoded, except "/" (partition exports read disk/p1). */
function uriName(name: string): string {
  return encodeURIComponent(name).replace(/%2F/g, "/");
}
