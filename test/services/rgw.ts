// A real S3 store for the remote-image tests: a single-node Ceph RADOS Gateway started with our copy
// of the team's recipe (ceph-rgw/start-store.sh) on free loopback ports in a scratch directory,
// its requests counted from the RGW ops log. startRgw() returns null (the caller skips, saying
// why) only when the Ceph packages are missing and cannot be installed.
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { createServer } from "node:net";
import type { Subprocess } from "bun";
import { run, runOk, scratch, SYSTEM_PATH } from "../helpers/env.ts";

const HERE = new URL(".", import.meta.url).pathname;
const START = join(HERE, "ceph-rgw/start-store.sh");
const STOP = join(HERE, "ceph-rgw/stop-store.sh");
// Distinctive keys, so a test can search any output for them.
export const ACCESS_KEY = "BNBDTESTKEY7Q2W";
export const SECRET_KEY = "bnbd-secret-Kq2x9-Zt4";

export interface Rgw {
  readonly endpoint: string;
  readonly dir: string;
  /** AWS_* variables for a child process that talks to this store. */
  readonly env: Record<string, string>;
  client(bucket: string): InstanceType<typeof Bun.S3Client>;
  createBucket(bucket: string): Promise<void>;
  /** Upload a local file (multipart, streamed); `acl: "public-read"` lets anonymous clients read it. */
  putFile(bucket: string, key: string, path: string, o?: { acl?: "public-read" }): Promise<void>;
  /** Ops-log entries so far: { op, uri, status, bytes }. */
  ops(): { op: string; uri: string; status: string; bytes: number }[];
  /** Stop the gateway alone (the cluster keeps its data); startGateway() brings it back. */
  stopGateway(): Promise<void>;
  startGateway(): Promise<void>;
  stop(): Promise<void>;
}

function portFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createServer();
    s.once("error", () => resolve(false));
    s.listen(port, "127.0.0.1", () => s.close(() => resolve(true)));
  });
}

/** Eleven free consecutive ports: S3, monitor, OSD range of nine. */
async function portBlock(): Promise<number> {
  for (let i = 0; i < 50; i++) {
    const base = 20000 + Math.floor(Math.random() * 3000) * 11;
    let ok = true;
    for (let p = base; p < base + 11 && ok; p++) ok = await portFree(p);
    if (ok) return base;
  }
  throw new Error("no block of 11 free ports for the Ceph store");
}

/** Whether the Ceph packages are there (or can be installed by the recipe, as root). */
export function cephAvailable(): string | null {
  const have = (c: string) => Bun.spawnSync(["sh", "-c", `command -v ${c}`], { env: { ...process.env, PATH: SYSTEM_PATH } }).exitCode === 0;
  if (["ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "monmaptool"].every(have)) return null;
  if (process.getuid?.() !== 0 || !have("apt-get")) return "the Ceph packages (ceph-mon ceph-osd radosgw ceph-common) are not installed and cannot be installed here (not root or no apt-get); run .ci/setup.sh";
  return null;
}

export async function startRgw(): Promise<Rgw | null> {
  const why = cephAvailable();
  if (why !== null) { console.log(`  SKIP: no Ceph RGW: ${why}`); return null; }
  let dir = "", endpoint = "", log = "";
  for (let attempt = 0; attempt < 3; attempt++) {
    dir = join(scratch("bun-nbd-rgw-"), "store");
    const base = await portBlock();
    const env = {
      S3_PORT: String(base), MON_PORT: String(base + 1), OSD_PORT_MIN: String(base + 2), OSD_PORT_MAX: String(base + 10),
      S3_ACCESS_KEY: ACCESS_KEY, S3_SECRET_KEY: SECRET_KEY,
    };
    const r = await run(["bash", START, dir], { env, timeoutMs: 600_000 });
    log = r.stdout + r.stderr;
    const m = /S3 endpoint ready: (http:\/\/127\.0\.0\.1:\d+)/.exec(r.stdout);
    if (r.code === 0 && m) { endpoint = m[1]!; break; }
    if (/installing ceph packages/.test(log) && r.code !== 0 && !existsSync("/usr/bin/radosgw")) {
      console.log(`  SKIP: no Ceph RGW: the packages could not be installed:\n${log.slice(-1500)}`);
      return null;
    }
  }
  if (!endpoint) throw new Error(`Ceph RGW did not start:\n${log.slice(-3000)}`);
  const pids = readFileSync(join(dir, "pids"), "utf8").split(/\s+/).filter(Boolean).map(Number);
  // Whatever way the test process ends, the store's processes go with it (by PID: the scratch
  // directory, and with it the pids file, may be gone by then).
  const killAll = () => { for (const p of pids) { try { process.kill(p, "SIGKILL"); } catch { /* gone */ } } };
  process.on("exit", killAll);
  let gateway: Subprocess | null = null;
  const client = (bucket: string) => new Bun.S3Client({ endpoint, accessKeyId: ACCESS_KEY, secretAccessKey: SECRET_KEY, bucket });
  return {
    endpoint, dir,
    env: { AWS_ACCESS_KEY_ID: ACCESS_KEY, AWS_SECRET_ACCESS_KEY: SECRET_KEY, AWS_ENDPOINT_URL: endpoint, AWS_REGION: "us-east-1" },
    client,
    async createBucket(bucket) {
      // S3Client has no bucket call: a signed PUT by curl, as in the recipe (RGW needs the payload hash header).
      await runOk(["curl", "-sSf", "-X", "PUT", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user", `${ACCESS_KEY}:${SECRET_KEY}`,
        "-H", "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", `${endpoint}/${bucket}`]);
    },
    async putFile(bucket, key, path, o = {}) {
      if (o.acl) {
        // Bun's multipart writer drops the ACL (measured against RGW): one PUT carries it
        await client(bucket).write(key, readFileSync(path), { acl: o.acl });
        return;
      }
      const w = client(bucket).file(key).writer({ partSize: 16 * 1024 * 1024, queueSize: 4, retry: 3 });
      for await (const chunk of Bun.file(path).stream()) await w.write(chunk);
      await w.end();
    },
    ops() {
      let text = "";
      try { text = readFileSync(join(dir, "log/ops.log"), "utf8"); } catch { return []; }
      const out: { op: string; uri: string; status: string; bytes: number }[] = [];
      for (const line of text.split("\n")) {
        if (!line.trim()) continue;
        try {
          const j = JSON.parse(line) as { operation?: string; uri?: string; http_status?: string; bytes_sent?: number };
          out.push({ op: j.operation ?? "", uri: j.uri ?? "", status: String(j.http_status ?? ""), bytes: Number(j.bytes_sent ?? 0) });
        } catch { /* a line being written */ }
      }
      return out;
    },
    async stopGateway() {
      const rgw = gateway?.pid ?? pids[pids.length - 1]!;
      try { process.kill(rgw, "SIGKILL"); } catch { /* gone */ }
      for (let i = 0; i < 100; i++) {
        try { process.kill(rgw, 0); } catch { return; }
        await Bun.sleep(50);
      }
    },
    async startGateway() {
      const cmd = readFileSync(join(dir, "rgw.cmd"), "utf8").trim().split(" ");
      gateway = Bun.spawn(cmd, { stdin: "ignore", stdout: "ignore", stderr: "ignore", env: { ...process.env, PATH: SYSTEM_PATH } });
      gateway.unref();
      pids.push(gateway.pid);
      Bun.spawnSync(["sh", "-c", `echo ${gateway.pid} >> ${join(dir, "pids")}`]);
      for (let i = 0; i < 400; i++) {
        try { await (await fetch(`${endpoint}/`)).arrayBuffer(); return; } catch { await Bun.sleep(50); }
      }
      throw new Error("radosgw did not come back");
    },
    async stop() {
      await run(["bash", STOP, dir], { timeoutMs: 60_000 });
      killAll();
    },
  };
}
