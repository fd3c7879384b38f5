// ISO 9660 images served the way a CD is: a read-only filter with 2048-byte blocks (QEMU's CD
// drive reads nothing smaller, and it tells other clients so), and a description naming what the
// volume descriptors say: volume label, El Torito boot record, a UDF bridge.
import { Passthrough } from "./passthrough.ts";
import { type BlockDevice, type BlockSize, type Capabilities, type FileRange, isPromise } from "./types.ts";

export const ISO_SECTOR = 2048;
/** "CD001" at byte 1 of sector 16: the primary volume descriptor. */
export const CD001_OFFSET = 16 * ISO_SECTOR + 1;

/** True if `head` (the first bytes of an image) has an ISO 9660 volume descriptor at sector 16. */
export function hasCd001(head: Uint8Array, at = CD001_OFFSET): boolean {
  return head.length >= at + 5 && head[at] === 0x43 && head[at + 1] === 0x44 && head[at + 2] === 0x30 && head[at + 3] === 0x30 && head[at + 4] === 0x31;
}

export interface IsoFacts { label: string; elTorito: boolean; udf: boolean; descriptors: number }

/** Read the volume descriptor set (at most 32 descriptors, then the UDF recognition sequence). */
export async function isoFacts(dev: BlockDevice): Promise<IsoFacts> {
  const facts: IsoFacts = { label: "", elTorito: false, udf: false, descriptors: 0 };
  const s = new Uint8Array(ISO_SECTOR);
  const text = (a: number, n: number) => new TextDecoder("latin1").decode(s.subarray(a, a + n)).replace(/[\0 ]+$/, "");
  let sector = 16;
  for (; sector < 16 + 64 && (sector + 1) * ISO_SECTOR <= dev.size(); sector++) {
    const r = dev.pread(s, sector * ISO_SECTOR, 0);
    if (isPromise(r)) await r;
    const id = text(1, 5);
    if (id !== "CD001") {
      if (id === "NSR02" || id === "NSR03") facts.udf = true;
      if (id === "BEA01" || id === "NSR02" || id === "NSR03" || id === "TEA01") continue;
      break;
    }
    facts.descriptors++;
    const type = s[0]!;
    if (type === 0 && text(7, 32) === "EL TORITO SPECIFICATION") facts.elTorito = true;
    if (type === 1) facts.label = text(40, 32);
  }
  return facts;
}

/** One phrase: `ISO 9660 "LABEL", El Torito bootable, UDF bridge`. */
export function describeIso(f: IsoFacts): string {
  return [`ISO 9660${f.label ? ` "${f.label}"` : ""}`, f.elTorito ? "El Torito bootable" : "", f.udf ? "UDF bridge" : ""].filter(Boolean).join(", ");
}

/** Read-only, 2048-byte blocks, over any device holding an ISO 9660 image. */
export class IsoView extends Passthrough {
  constructor(next: BlockDevice) { super(next); }
  override blockSize(): BlockSize { return { minimum: ISO_SECTOR, preferred: ISO_SECTOR, maximum: 32 * 1024 * 1024 }; }
  override capabilities(): Capabilities {
    const c = this.next.capabilities();
    return { ...c, canWrite: false, canFlush: false, canFua: false, canTrim: false, canZero: false, canFastZero: false };
  }
  fileRange(offset: number, length: number, out: FileRange): boolean {
    // The bytes pass through unchanged, so the plugin's file range is ours.
    return this.next.fileRange?.(offset, length, out) ?? false;
  }
}
