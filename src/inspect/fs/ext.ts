// ext2/ext3/ext4 (and an external journal, "jbd"): the superblock at 1 KiB, told apart by feature
// bits exactly as blkid tells them (ext4 = something ext3 does not know; ext3 = a journal).
import { fixedText, isZero, le16, le32, uuidBytes } from "../bytes.ts";
import type { Reader } from "../reader.ts";
import type { FsInfo } from "../types.ts";

const COMPAT_HAS_JOURNAL = 0x4;
const INCOMPAT_FILETYPE = 0x2, INCOMPAT_RECOVER = 0x4, INCOMPAT_JOURNAL_DEV = 0x8, INCOMPAT_META_BG = 0x10, INCOMPAT_64BIT = 0x80;
const RO_SPARSE = 0x1, RO_LARGE_FILE = 0x2, RO_BTREE_DIR = 0x4;
const EXT2_RO_SUPP = RO_SPARSE | RO_LARGE_FILE | RO_BTREE_DIR;
const EXT2_INCOMPAT_SUPP = INCOMPAT_FILETYPE | INCOMPAT_META_BG;
const EXT3_RO_SUPP = EXT2_RO_SUPP;
const EXT3_INCOMPAT_SUPP = INCOMPAT_FILETYPE | INCOMPAT_RECOVER | INCOMPAT_META_BG;
const FLAGS_TEST_FILESYS = 0x4;

export async function probeExt(r: Reader): Promise<FsInfo | null> {
  if (r.size < 2048) return null;
  const sb = await r.read(1024, 1024);
  if (le16(sb, 0x38) !== 0xef53) return null;
  const compat = le32(sb, 0x5c), incompat = le32(sb, 0x60), ro = le32(sb, 0x64);
  let type: string | null;
  if (incompat & INCOMPAT_JOURNAL_DEV) type = "jbd";
  else if ((ro & ~EXT3_RO_SUPP) !== 0 || (incompat & ~EXT3_INCOMPAT_SUPP) !== 0) {
    type = le32(sb, 0x160) & FLAGS_TEST_FILESYS ? "ext4dev" : "ext4";
  } else if (compat & COMPAT_HAS_JOURNAL) type = "ext3";
  else if ((ro & ~EXT2_RO_SUPP) === 0 && (incompat & ~EXT2_INCOMPAT_SUPP) === 0) type = "ext2";
  else type = null;
  if (!type) return null;
  const info: FsInfo = { type, version: `${le32(sb, 0x4c)}.${le16(sb, 0x3e)}` };
  if (sb[0x78] !== 0) {
    const label = fixedText(sb, 0x78, 16);
    if (label) info.label = label;
  }
  if (!isZero(sb, 0x68, 16)) info.uuid = uuidBytes(sb, 0x68);
  const logBlock = le32(sb, 0x18);
  if (logBlock < 16) {
    const blocks = le32(sb, 0x04) + (incompat & INCOMPAT_64BIT ? le32(sb, 0x150) * 2 ** 32 : 0);
    info.size = blocks * 1024 * 2 ** logBlock;
  }
  return info;
}
