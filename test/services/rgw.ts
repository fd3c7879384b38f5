// A real S3 store for the remote-image tests: a single-node Ceph RADOS Gateway started with our copy
// of the team's recipe (ceph-rgw/start-store.sh) on free loopback ports in a scratch directory,
// its GETs counted from radosgw's perf counters (admin socket; exact, unlike the ops log, which
// drops entries and is used only to see what a request looked like). startRgw() returns null (the
// caller skips, saying why) only when the Ceph packages are missing and cannot be installed.
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { createConnection, createServer } from "node:net";
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
  /**
   * Ops-log entries so far: { op, uri, bucket, status, bytes }. RGW drops entries (and writes them
   * after the responses): good for what a request looked like, not for counting; see perf().
   */
  ops(): { op: string; uri: string; bucket: string; status: string; bytes: number }[];
  /**
   * radosgw's own counters since the gateway (re)started, from its admin socket: `gets`, the GET
   * (and HEAD) object requests it executed (refused ones, failing authentication, are not counted),
   * and `getBytes`, their bytes (RGW counts each ranged GET one byte short).
   */
  perf(): Promise<{ gets: number; getBytes: number }>;
  /**
   * Turn RGW's STS (session tokens) on or off: rewrites its config and restarts the gateway (which
   * resets perf()). Off by default: with it on, a bad signature is AccessDenied, not SignatureDoesNotMatch.
   */
  sts(on: boolean): Promise<void>;
  /** Temporary credentials from RGW's STS (AssumeRole of a role that may read every bucket; using them needs sts(true)). */
  assumeRole(): Promise<{ accessKeyId: string; secretAccessKey: string; sessionToken: string }>;
  /**
   * Stop the gateway alone (the cluster keeps its data); startGateway() brings it back. SIGKILL by
   * default: its watches then linger in the cluster for ~30 s, and until they expire a metadata
   * change (a new role, bucket) waits for them; SIGTERM stops it cleanly.
   */
  stopGateway(signal?: "SIGKILL" | "SIGTERM"): Promise<void>;
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

/** One admin-socket command: the JSON command and a NUL out; a 32-bit big-endian length and the answer back. */
function adminSocket(path: string, prefix: string): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    const s = createConnection({ path }, () => s.write(JSON.stringify({ prefix }) + "\0"));
    s.setTimeout(10_000, () => s.destroy(new Error(`${path}: no answer to ${prefix}`)));
    s.on("data", (c: Buffer) => chunks.push(c));
    s.on("error", reject);
    s.on("close", () => {
      const all = Buffer.concat(chunks);
      if (all.length < 4 || all.length < 4 + all.readUInt32BE(0)) return reject(new Error(`${path}: short answer to ${prefix}`));
      try { resolve(JSON.parse(all.subarray(4, 4 + all.readUInt32BE(0)).toString())); } catch (e) { reject(e); }
    });
  });
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
  let role = false;
  const client = (bucket: string) => new Bun.S3Client({ endpoint, accessKeyId: ACCESS_KEY, secretAccessKey: SECRET_KEY, bucket });
  const g: Rgw = {
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
      const out: { op: string; uri: string; bucket: string; status: string; bytes: number }[] = [];
      for (const line of text.split("\n")) {
        if (!line.trim()) continue;
        try {
          const j = JSON.parse(line) as { operation?: string; uri?: string; bucket?: string; http_status?: string; bytes_sent?: number };
          out.push({ op: j.operation ?? "", uri: j.uri ?? "", bucket: j.bucket ?? "", status: String(j.http_status ?? ""), bytes: Number(j.bytes_sent ?? 0) });
        } catch { /* a line being written */ }
      }
      return out;
    },
    async perf() {
      const d = await adminSocket(join(dir, "run/client.rgw.a.asok"), "perf dump") as { rgw?: { get?: number; get_b?: number } };
      if (typeof d.rgw?.get !== "number") throw new Error(`no rgw.get in radosgw's perf dump: ${JSON.stringify(d).slice(0, 300)}`);
      return { gets: d.rgw.get, getBytes: d.rgw.get_b ?? 0 };
    },
    async sts(on) {
      const conf = join(dir, "ceph.conf"), text = readFileSync(conf, "utf8");
      const next = text.replace(/^rgw_s3_auth_use_sts = \w+$/m, `rgw_s3_auth_use_sts = ${on}`);
      if (!/^rgw_s3_auth_use_sts = /m.test(text)) throw new Error(`${conf}: no rgw_s3_auth_use_sts line`);
      if (next === text) return;
      writeFileSync(conf, next);
      await g.stopGateway("SIGTERM");
      await g.startGateway();
    },
    async assumeRole() {
      // RGW's IAM and STS APIs: form POSTs signed by curl (RGW needs the payload hash header)
      const post = async (service: string, form: Record<string, string>) => {
        const body = Object.entries(form).map(([k, v]) => `${k}=${encodeURIComponent(v)}`).join("&");
        const r = await runOk(["curl", "-sSf", "-X", "POST", "--aws-sigv4", `aws:amz:us-east-1:${service}`, "--user", `${ACCESS_KEY}:${SECRET_KEY}`,
          "-H", `x-amz-content-sha256: ${new Bun.CryptoHasher("sha256").update(body).digest("hex")}`,
          "-H", "Content-Type: application/x-www-form-urlencoded", "--data", body, `${endpoint}/`]);
        return r.stdout;
      };
      if (!role) {
        const policy = (statement: object) => JSON.stringify({ Version: "2012-10-17", Statement: [statement] });
        await post("iam", { Action: "CreateRole", RoleName: "reader",
          AssumeRolePolicyDocument: policy({ Effect: "Allow", Principal: { AWS: ["arn:aws:iam:::user/test"] }, Action: ["sts:AssumeRole"] }) });
        await post("iam", { Action: "PutRolePolicy", RoleName: "reader", PolicyName: "read",
          PolicyDocument: policy({ Effect: "Allow", Action: ["s3:GetObject", "s3:ListBucket"], Resource: "arn:aws:s3:::*" }) });
        role = true;
      }
      const answer = await post("sts", { Action: "AssumeRole", RoleArn: "arn:aws:iam:::role/reader", RoleSessionName: "bun-nbd-test", DurationSeconds: "3600", Version: "2011-06-15" });
      const field = (name: string) => {
        const m = new RegExp(`<${name}>([^<]+)</${name}>`).exec(answer);
        if (!m) throw new Error(`no ${name} in RGW's AssumeRole answer: ${answer.slice(0, 500)}`);
        return m[1]!;
      };
      return { accessKeyId: field("AccessKeyId"), secretAccessKey: field("SecretAccessKey"), sessionToken: field("SessionToken") };
    },
    async stopGateway(signal = "SIGKILL") {
      const rgw = gateway?.pid ?? pids[pids.length - 1]!;
      try { process.kill(rgw, signal); } catch { /* gone */ }
      for (let i = 0; i < 200; i++) {
        try { process.kill(rgw, 0); } catch { return; }
        if (i === 100) try { process.kill(rgw, "SIGKILL"); } catch { /* gone */ }
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
  return g;
}
