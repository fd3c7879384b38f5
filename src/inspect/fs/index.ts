// Which file system (if any) starts at the beginning of a region: every probe in a fixed order,
// first match wins (CD formats first: an ISO's system area may hold anything).
import type { Reader } from "../reader.ts";
import type { FsInfo } from "../types.ts";
import { probeExfat, probeVfat } from "./fat.ts";
import { probeIso9660 } from "./iso9660.ts";
import { probeBtrfs, probeSwap, probeXfs } from "./misc.ts";
import { probeNtfs } from "./ntfs.ts";
import { probeExt } from "./ext.ts";
import { probeUdf } from "./udf.ts";

export { fatBootSector } from "./fat.ts";
export { ntfsBootSector } from "./ntfs.ts";
export { elTorito } from "./iso9660.ts";

export interface ProbeResult { fs: FsInfo; catalogLba?: number }

const PROBES: ((r: Reader) => Promise<FsInfo | null>)[] = [probeUdf, probeExfat, probeNtfs, probeVfat, probeExt, probeXfs, probeBtrfs, probeSwap];

export async function probeFilesystem(r: Reader): Promise<ProbeResult | null> {
  const iso = await probeIso9660(r);
  // UDF discs often carry an ISO 9660 bridge; blkid then names the UDF side
  if (iso) {
    const udf = await probeUdf(r);
    return udf ? { fs: udf } : iso;
  }
  for (const p of PROBES) {
    const fs = await p(r);
    if (fs) return { fs };
  }
  return null;
}
