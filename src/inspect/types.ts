// The shape of an inspection report: what `bun-nbd inspect --json` prints and what `serve` reads
// its one-line summaries from. Plain data (numbers, strings, arrays) so it serialises as is.

/** A file system found at some offset, named and spelled as `blkid -p -o export` prints it. */
export interface FsInfo {
  /** blkid's TYPE: vfat, exfat, ntfs, ext2, ext3, ext4, iso9660, udf, swap, xfs, btrfs. */
  type: string;
  /** blkid's VERSION (FAT12/FAT16/FAT32, 1.0, Joliet Extension, ...), when it prints one. */
  version?: string;
  label?: string;
  uuid?: string;
  /** Bytes the file system says it covers, when its superblock tells (to spot truncation). */
  size?: number;
  /** Boot loader or boot code recognised in this file system's boot sector or contents. */
  boot?: string[];
}

export interface Partition {
  /** Linux numbering: MBR primaries 1-4, logicals from 5; GPT entries from 1. */
  number: number;
  kind: "primary" | "extended" | "logical" | "gpt";
  /** Byte offset and length on the disk. */
  start: number;
  size: number;
  /** MBR: the type byte as sfdisk prints it ("c", "83"); GPT: the type GUID, uppercase. */
  type: string;
  typeName: string;
  /** GPT partition name. */
  name?: string;
  /** GPT unique partition GUID, uppercase (as sfdisk prints it). */
  uuid?: string;
  /** MBR active flag, or GPT legacy BIOS bootable attribute. */
  bootable: boolean;
  /** EFI System Partition (GPT type or MBR 0xef). */
  esp?: boolean;
  filesystem?: FsInfo;
}

export interface PartitionTable {
  /** blkid's PTTYPE: "dos" or "gpt". */
  type: "dos" | "gpt";
  /** blkid's PTUUID: the MBR disk id (8 hex digits) or the GPT disk GUID (lowercase). */
  id?: string;
  partitions: Partition[];
  /** GPT only: the usable LBA range (sfdisk's firstlba/lastlba). */
  firstLba?: number;
  lastLba?: number;
}

export interface ElToritoEntry {
  platform: string;
  /** "no emulation", "1.2M floppy", "1.44M floppy", "2.88M floppy", "hard disk". */
  emulation: string;
  bootable: boolean;
  /** Load RBA (2048-byte sectors) and sector count (512-byte units) of the boot image. */
  loadRba: number;
  sectors: number;
  /** What the boot image looks like (ISOLINUX, GRUB, an EFI FAT image, ...). */
  loader?: string;
}

export interface BootInfo {
  /** The first sector has the 55AA signature and non-zero boot code before the table. */
  mbrCode: boolean;
  /** What the boot code in sector 0 looks like (GRUB, SYSLINUX, Windows, FreeDOS, ...). */
  mbrLoader?: string;
  /** Number of the active (bootable) MBR partition. */
  activePartition?: number;
  elTorito?: ElToritoEntry[];
  /** Numbers of EFI System Partitions. */
  esp?: number[];
  /** One line saying how it boots ("BIOS (GRUB in the MBR)", "UEFI (ESP p1)", ...). */
  summary: string[];
}

export interface FloppyGeometry {
  /** "1.44M", "720K", "1.68M DMF", ... */
  name: string;
  cylinders: number;
  heads: number;
  sectors: number;
}

export interface ContainerInfo {
  /** raw, qcow2, vhd, xz, gzip, zip, imz, cue, ccd, iso. */
  format: string;
  detail?: string;
  /** qcow2: the backing chain, nearest first (file names as stored). */
  backing?: string[];
}

export interface Report {
  source: string;
  /** Bytes of the device inspected (the export, or the image's contents). */
  size: number;
  container?: ContainerInfo;
  /** Bytes past the last whole 512-byte sector (0 when the size is a whole number of sectors). */
  partialSector: number;
  floppy?: FloppyGeometry;
  table?: PartitionTable;
  /** A file system on the whole device (a superfloppy, an ISO, a bare ext4 image). */
  filesystem?: FsInfo;
  boot: BootInfo;
  warnings: string[];
  /** Why the contents were not read (a container this build cannot open), when they were not. */
  notInspected?: string;
}
