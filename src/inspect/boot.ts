// Boot-loader fingerprints: cheap byte-string checks on a boot sector or a boot image that name
// what would run (GRUB, SYSLINUX/ISOLINUX, Windows NTLDR/BOOTMGR, FreeDOS, MS-DOS), and the
// placeholders mkfs tools write that only print "not a bootable disk".

/** Index of the ASCII `s` in `b`, or -1. */
function find(b: Uint8Array, s: string, from = 0, to = b.length): number {
  const first = s.charCodeAt(0);
  outer: for (let i = from; i + s.length <= to; i++) {
    if (b[i] !== first) continue;
    for (let k = 1; k < s.length; k++) if (b[i + k] !== s.charCodeAt(k)) continue outer;
    return i;
  }
  return -1;
}

const has = (b: Uint8Array, s: string) => find(b, s) >= 0;

/** Code that only says the disk is not bootable (mkfs.fat, mkntfs, mkfs.exfat placeholders). */
export function isPlaceholderBoot(b: Uint8Array): boolean {
  if (has(b, "This is not a bootable disk") || has(b, "is not bootable")) return true;
  return has(b, "Non-system disk") && !bootLoader(b);
}

/** Name the boot loader whose code or strings appear in `b` (a boot sector or the start of a boot image). */
export function bootLoader(b: Uint8Array): string | undefined {
  if (has(b, "ISOLINUX") || has(b, "isolinux")) return "ISOLINUX";
  if (has(b, "EXTLINUX")) return "EXTLINUX";
  if (has(b, "SYSLINUX") || has(b, "LDLINUX")) return "SYSLINUX";
  if (has(b, "GRUB")) return "GRUB";
  if (has(b, "BOOTMGR")) return "BOOTMGR (Windows)";
  if (has(b, "NTLDR")) return "NTLDR (Windows)";
  if (has(b, "FreeDOS") || has(b, "FRDOS") || has(b, "KERNEL  SYS")) return "FreeDOS";
  if (has(b, "IO      SYS") || has(b, "IBMBIO  COM")) return "MS-DOS";
  if (has(b, "Invalid partition table") && has(b, "Missing operating system")) return "DOS/Windows MBR";
  return undefined;
}

/**
 * True if sector 0 ends in 55AA and its code area holds something: the 440 bytes before an MBR's
 * disk id, or what follows a volume boot record's BPB (`from`) up to the signature.
 */
export function hasBootCode(s0: Uint8Array, from = 0, to = 440): boolean {
  if (s0[510] !== 0x55 || s0[511] !== 0xaa) return false;
  for (let i = from; i < to; i++) if (s0[i] !== 0) return true;
  return false;
}

/** Where the boot code of a volume boot record starts (after its BPB), by file system. */
export function vbrCodeStart(type: string, version?: string): number | undefined {
  if (type === "vfat") return version === "FAT32" ? 0x5a : 0x3e;
  if (type === "ntfs") return 0x54;
  if (type === "exfat") return 0x78;
  return undefined;
}
