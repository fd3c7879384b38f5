// Host-side access to an export through a fresh NBD connection, with libnbd's python module
// (nbdsh), independent of the server under test and of the guest.
import { createHash } from "node:crypto";
import { runOk } from "../helpers/env.ts";

const PY = "/usr/bin/python3"; // the system python has python3-libnbd

async function nbdsh(uri: string, code: string, stdin?: Uint8Array): Promise<string> {
  const r = await runOk([PY, "-m", "nbd", "-u", uri, "-c", code], { timeoutMs: 60_000, stdin });
  return r.stdout.trim();
}

export async function nbdSize(uri: string): Promise<number> {
  return Number(await nbdsh(uri, "print(h.get_size())"));
}

export async function nbdRead(uri: string, offset: number, length: number): Promise<Uint8Array> {
  const b64 = await nbdsh(uri, `import base64,sys\nout=bytearray()\nfor o in range(0, ${length}, 1<<22): out += h.pread(min(1<<22, ${length}-o), ${offset}+o)\nsys.stdout.write(base64.b64encode(bytes(out)).decode())`);
  return new Uint8Array(Buffer.from(b64, "base64"));
}

export async function nbdWrite(uri: string, offset: number, data: Uint8Array): Promise<void> {
  await nbdsh(uri, `import base64,sys\nh.pwrite(base64.b64decode(sys.stdin.read()), ${offset})\nh.can_flush() and h.flush()`, Buffer.from(Buffer.from(data).toString("base64")));
}

export const md5 = (data: Uint8Array) => createHash("md5").update(data).digest("hex");
