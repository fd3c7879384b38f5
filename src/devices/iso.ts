// ISO 9660 images served the way a CD is: a read-only filter with 2048-byte blocks (QEMU's CD
// drive reads nothing smaller, and it tells other clients so). What the volume descriptors say
// (label, El Torito, UDF) is src/inspect's to read: serve adds it to the description.
import { Passthrough } from "./passthrough.ts";
import type { BlockDevice, BlockSize, Capabilities, DeviceRecipe, FileRange } from "./types.ts";

export const ISO_SECTOR = 2048;
/** "CD001" at byte 1 of sector 16: the primary volume descriptor. */
export const CD001_OFFSET = 16 * ISO_SECTOR + 1;

/** True if `head` (the first bytes of an image) has an ISO 9660 volume descriptor at sector 16. */
export function hasCd001(head: Uint8Array, at = CD001_OFFSET): boolean {
  return head.length >= at + 5 && head[at] === 0x43 && head[at + 1] === 0x44 && head[at + 2] === 0x30 && head[at + 3] === 0x30 && head[at + 4] === 0x31;
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
  recipe(): DeviceRecipe | null {
    const inner = this.next.recipe?.() ?? null;
    return inner && { kind: "iso", inner };
  }
}
