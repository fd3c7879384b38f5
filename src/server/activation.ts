// systemd socket activation: the sockets a service manager passes (LISTEN_FDS from fd 3, for the
// process named by LISTEN_PID, with LISTEN_FDNAMES), checked to be sockets, and what each one is
// bound to (read from /proc, so the banner can print URIs). Bun.listen serves them (server.ts).
import { fstatSync, readFileSync, readlinkSync } from "node:fs";
import type { ListenAddress } from "../config/types.ts";

export const SD_LISTEN_FDS_START = 3;

export interface ActivatedSocket {
  fd: number;
  /** Its name from LISTEN_FDNAMES (FileDescriptorName= in the .socket unit), or "". */
  name: string;
  /** What it is bound to, when /proc says; null otherwise. */
  address: ListenAddress | null;
}

/**
 * The passed sockets, or null when this process was not socket-activated. The npm launcher
 * (bin/bun-nbd.cjs) runs Bun as a child: it passes the fds on and names itself in
 * BUN_NBD_LAUNCHER_PID, so LISTEN_PID may also be that parent. The variables are removed from the
 * environment, as sd_listen_fds(1) does, so that children do not take the sockets for theirs.
 * Throws when the variables are set for us but wrong (a unit file mistake worth stopping for).
 */
export function activationSockets(env: Record<string, string | undefined> = process.env, pid = process.pid, ppid = process.ppid): ActivatedSocket[] | null {
  const fdsText = env.LISTEN_FDS;
  const pidText = env.LISTEN_PID;
  if (fdsText === undefined || pidText === undefined) return null;
  const forUs = Number(pidText) === pid || (Number(pidText) === ppid && env.BUN_NBD_LAUNCHER_PID === pidText);
  if (!forUs) return null;
  const names = (env.LISTEN_FDNAMES ?? "").split(":");
  delete env.LISTEN_FDS;
  delete env.LISTEN_PID;
  delete env.LISTEN_FDNAMES;
  if (!/^\d+$/.test(fdsText) || Number(fdsText) < 1) throw new Error(`LISTEN_FDS="${fdsText}": expected a number of sockets of at least 1`);
  const out: ActivatedSocket[] = [];
  for (let i = 0; i < Number(fdsText); i++) {
    const fd = SD_LISTEN_FDS_START + i;
    let isSocket = false;
    try { isSocket = fstatSync(fd).isSocket(); } catch { /* not open */ }
    if (!isSocket) throw new Error(`LISTEN_FDS=${fdsText}: fd ${fd} is not a socket`);
    out.push({ fd, name: names[i] ?? "", address: boundAddress(fd) });
  }
  return out;
}

/** What fd is bound to, from /proc/self/fd and /proc/net/{tcp,tcp6,unix} (Linux); null if unknown. */
export function boundAddress(fd: number): ListenAddress | null {
  let inode: string;
  try {
    const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/self/fd/${fd}`));
    if (!m) return null;
    inode = m[1]!;
  } catch {
    return null;
  }
  for (const [file, v6] of [["/proc/net/tcp", false], ["/proc/net/tcp6", true]] as const) {
    for (const cols of table(file)) {
      if (cols[9] !== inode) continue;
      const [hex, portHex] = cols[1]!.split(":") as [string, string];
      return { kind: "tcp", host: v6 ? ipv6FromProc(hex) : ipv4FromProc(hex), port: parseInt(portHex, 16) };
    }
  }
  for (const cols of table("/proc/net/unix")) {
    if (cols[6] === inode && cols[7] !== undefined) return { kind: "unix", path: cols[7] };
  }
  return null;
}

function table(file: string): string[][] {
  try {
    return readFileSync(file, "utf8").split("\n").slice(1).map((l) => l.trim().split(/\s+/));
  } catch {
    return [];
  }
}

/** /proc/net/tcp writes the address as one native-endian (little-endian here) 32-bit word. */
function ipv4FromProc(hex: string): string {
  const n = parseInt(hex, 16);
  return [n & 255, (n >>> 8) & 255, (n >>> 16) & 255, n >>> 24].join(".");
}

function ipv6FromProc(hex: string): string {
  const bytes: number[] = [];
  for (let w = 0; w < 4; w++) {
    const word = hex.slice(w * 8, w * 8 + 8);
    for (let b = 3; b >= 0; b--) bytes.push(parseInt(word.slice(b * 2, b * 2 + 2), 16));
  }
  if (bytes.slice(0, 10).every((b) => b === 0) && bytes[10] === 255 && bytes[11] === 255) return bytes.slice(12).join(".");
  const groups: string[] = [];
  for (let i = 0; i < 16; i += 2) groups.push(((bytes[i]! << 8) | bytes[i + 1]!).toString(16));
  return groups.join(":").replace(/(^|:)0(:0)+(:|$)/, "::").replace(/:{3,}/, "::");
}
