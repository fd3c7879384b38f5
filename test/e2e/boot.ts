// SeaBIOS boots from an NBD export: the guest (hdboot.bin / cdboot.bin / fdboot.bin) does all its disk I/O
// through int 13h, prints one line per step on the serial port and leaves through isa-debug-exit
// with status 33 when everything matched.
import { closeSync, openSync, readSync } from "node:fs";
import { runQemu, tail, type QemuResult } from "./qemu.ts";

export const BOOT_TIMEOUT_MS = Number(process.env.BUN_NBD_E2E_BOOT_TIMEOUT_MS || 60_000);

export type BootMode = "ide" | "virtio" | "cdrom" | "floppy";

export function bootArgs(mode: BootMode, uri: string): string[] {
  const drive = mode === "cdrom"
    ? `file=${uri},format=raw,media=cdrom,readonly=on`
    : `file=${uri},format=raw,if=${mode}`;
  return ["-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot", "-boot", `${mode === "floppy" ? "order=a," : ""}reboot-timeout=0`,
    "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-drive", drive];
}

/** Boot; returns the run and a list of problems (empty = pass): exit status, missing or out-of-order lines. */
export async function boot(mode: BootMode, uri: string, expect: string[], logDir?: string): Promise<{ run: QemuResult; problems: string[] }> {
  const run = await runQemu(bootArgs(mode, uri), { timeoutMs: BOOT_TIMEOUT_MS, logDir });
  const problems: string[] = [];
  if (run.timedOut) problems.push(`QEMU timed out after ${BOOT_TIMEOUT_MS} ms`);
  else if (run.code !== 33) problems.push(`QEMU exit status ${run.code}, want 33`);
  let from = 0;
  for (const e of expect) {
    const i = run.lines.findIndex((l, k) => k >= from && l.text.includes(e));
    if (i < 0) problems.push(`missing serial line ${JSON.stringify(e)}${run.lines.some((l) => l.text.includes(e)) ? " (present but out of order)" : ""}`);
    else from = i; // the next expected text may be on the same line
  }
  if (problems.length) problems.push(`serial tail:\n${tail(run)}`);
  return { run, problems };
}

/** `length` bytes of a file at `offset`, read directly (not through the server). */
export function fileBytes(path: string, offset: number, length: number): Uint8Array {
  const fd = openSync(path, "r");
  try {
    const b = new Uint8Array(length);
    let n = 0;
    while (n < length) {
      const r = readSync(fd, b, n, length - n, offset + n);
      if (r === 0) break;
      n += r;
    }
    return b.subarray(0, n);
  } finally { closeSync(fd); }
}
