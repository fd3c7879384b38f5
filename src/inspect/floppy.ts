// Standard floppy disk sizes and their geometry (cylinders / heads / sectors per track), as PC
// BIOSes and QEMU's floppy controller know them. A size matches exactly or not at all.
import type { FloppyGeometry } from "./types.ts";

export const FLOPPIES: readonly FloppyGeometry[] = [
  { name: "160K", cylinders: 40, heads: 1, sectors: 8 },
  { name: "180K", cylinders: 40, heads: 1, sectors: 9 },
  { name: "320K", cylinders: 40, heads: 2, sectors: 8 },
  { name: "360K", cylinders: 40, heads: 2, sectors: 9 },
  { name: "720K", cylinders: 80, heads: 2, sectors: 9 },
  { name: "1.2M", cylinders: 80, heads: 2, sectors: 15 },
  { name: "1.44M", cylinders: 80, heads: 2, sectors: 18 },
  { name: "1.68M DMF", cylinders: 80, heads: 2, sectors: 21 },
  { name: "1.72M", cylinders: 82, heads: 2, sectors: 21 },
  { name: "2.88M", cylinders: 80, heads: 2, sectors: 36 },
];

export const floppyBytes = (g: FloppyGeometry): number => g.cylinders * g.heads * g.sectors * 512;

/** The standard floppy of exactly `size` bytes, if there is one. */
export function floppyFor(size: number): FloppyGeometry | undefined {
  return FLOPPIES.find((g) => floppyBytes(g) === size);
}

/** "80/2/18" */
export const chs = (g: FloppyGeometry): string => `${g.cylinders}/${g.heads}/${g.sectors}`;
