// `bun-nbd copy SRC DST`: copy between NBD exports, local files and a null sink, sparse-aware.
// Wiring only: the copy engine lives in src/client/copy.ts.
import { commandArgs } from "./args.ts";
import { NBD_STATE_HOLE, NBD_STATE_ZERO } from "../protocol/constants.ts";
import {
  connect, copy, FileDestination, FileSource, NbdEndpoint, NullEndpoint, type CopyDestination, type CopySource,
  type ClientOptions, type Extent, type NbdClient,
} from "../client/index.ts";
import { haveLibc, seekData, seekHole } from "../sys/libc.ts";

const HELP = `usage: bun-nbd copy [options] SRC DST

Copy a whole disk image. SRC and DST are NBD URIs (nbd://host:port/export,
nbd+unix:///export?socket=PATH) or local files; DST may also be null: (discard).
Holes in the source (NBD block status, or SEEK_HOLE on files) are not read and
stay holes on the destination; all-zero blocks are found and treated as holes.

options:
  --sha256              print the SHA-256 of the bytes copied
  --flush               flush the destination at the end
  -q, --quiet           no progress bar
  -C, --connections N   connections per NBD export when it allows multi-conn (default 2)
  -R, --requests N      requests in flight per connection (default 32)
  --request-size BYTES  bytes per read/write request (default 262144)
  --no-zero-detect      write all-zero data blocks as data
  --busy-poll US        poll a connection for replies for up to US microseconds
                        before waiting on the event loop (default 50; 0: never)
  --timeout MS          deadline of every request (default 60000)`;

function isUri(s: string): boolean {
  return /^[a-z][a-z0-9+.-]*:\/\//i.test(s);
}

function positiveInt(v: string | undefined, name: string, dflt: number): number {
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n < 1) throw new Error(`--${name} wants a positive integer, got "${v}"`);
  return n;
}

/** Data/hole extents of a regular file through SEEK_DATA/SEEK_HOLE (null if unsupported). */
function probeFile(fd: number, size: number): Extent[] | null {
  if (!haveLibc) return null;
  const out: Extent[] = [];
  let pos = 0;
  try {
    while (pos < size) {
      let data = seekData(fd, pos);
      if (data < 0 || data > size) data = size;
      if (data > pos) out.push({ offset: pos, length: data - pos, flags: NBD_STATE_HOLE | NBD_STATE_ZERO });
      if (data >= size) break;
      let hole = seekHole(fd, data);
      if (hole < 0 || hole > size) hole = size;
      out.push({ offset: data, length: hole - data, flags: 0 });
      pos = hole;
    }
  } catch {
    return null;
  }
  return out;
}

async function openNbd(uri: string, connections: number, opts: ClientOptions): Promise<NbdEndpoint> {
  const first = await connect(uri, opts);
  const clients: NbdClient[] = [first];
  try {
    if (first.info.canMultiConn && connections > 1) {
      const more = await Promise.allSettled(Array.from({ length: connections - 1 }, () => connect(uri, opts)));
      for (const r of more) if (r.status === "fulfilled") clients.push(r.value);
      const failed = more.find((r) => r.status === "rejected");
      if (failed) throw failed.reason;
    }
  } catch (e) {
    await Promise.all(clients.map((c) => c.close()));
    throw e;
  }
  return new NbdEndpoint(clients);
}

function progressBar(quiet: boolean): ((done: number, total: number) => void) | undefined {
  if (quiet || !process.stderr.isTTY) return undefined;
  const start = performance.now();
  let last = 0;
  return (done, total) => {
    const now = performance.now();
    if (now - last < 100 && done < total) return;
    last = now;
    const frac = total ? done / total : 1;
    const width = 40;
    const fill = Math.round(frac * width);
    const mbs = done / 1e6 / Math.max(0.001, (now - start) / 1000);
    process.stderr.write(`\r[${"#".repeat(fill)}${".".repeat(width - fill)}] ${(frac * 100).toFixed(1).padStart(5)}% ${mbs.toFixed(0)} MB/s`);
    if (done >= total) process.stderr.write("\n");
  };
}

export async function main(argv: string[]): Promise<number> {
  const args = commandArgs("copy", HELP, argv, {
    sha256: { type: "boolean" },
    flush: { type: "boolean" },
    quiet: { type: "boolean", short: "q" },
    connections: { type: "string", short: "C" },
    requests: { type: "string", short: "R" },
    "request-size": { type: "string" },
    "no-zero-detect": { type: "boolean" },
    "busy-poll": { type: "string" },
    timeout: { type: "string" },
  }, { min: 2, max: 2, what: "SRC and DST" });
  if (typeof args === "number") return args;
  const o = args.values;
  const [srcArg, dstArg] = args.positionals as [string, string];
  let src: CopySource | null = null;
  let dst: CopyDestination | null = null;
  try {
    const connections = positiveInt(o.connections, "connections", 2);
    const requests = positiveInt(o.requests, "requests", 32);
    const requestSize = positiveInt(o["request-size"], "request-size", 256 * 1024);
    const nbdOpts: ClientOptions = {
      requestTimeoutMs: positiveInt(o.timeout, "timeout", 60_000),
      busyPollMicros: o["busy-poll"] === "0" ? 0 : positiveInt(o["busy-poll"], "busy-poll", 50),
    };
    src = isUri(srcArg) ? await openNbd(srcArg, connections, nbdOpts) : new FileSource(srcArg, probeFile);
    if (dstArg === "null:" || dstArg === "/dev/null") dst = new NullEndpoint();
    else if (isUri(dstArg)) dst = await openNbd(dstArg, connections, nbdOpts);
    else dst = new FileDestination(dstArg);
    const lanes = Math.max(src instanceof NbdEndpoint ? src.connections : 1, dst instanceof NbdEndpoint ? dst.connections : 1);
    const result = await copy(src, dst, {
      requestSize,
      workers: lanes * requests,
      flush: o.flush === true,
      sha256: o.sha256 === true,
      detectZeroes: o["no-zero-detect"] !== true,
      onProgress: progressBar(o.quiet === true),
    });
    if (result.sha256) console.log(`${result.sha256}  ${srcArg}`);
    return 0;
  } catch (e) {
    const err = e as Error & { code?: string };
    console.error(`bun-nbd copy: ${err.message}${err.code && !err.message.includes(err.code) ? ` (${err.code})` : ""}`);
    return 1;
  } finally {
    await Promise.allSettled([src?.close(), dst?.close()]);
  }
}
