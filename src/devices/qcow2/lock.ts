// Image locking compatible with QEMU's (block/file-posix.c): OFD byte-range locks on the image
// file, all shared (F_RDLCK). Byte 100+p means "this process uses permission p", byte 200+p means
// "this process does not let others have permission p". A conflict is another open file
// description holding a lock on the byte we would test with an exclusive lock: before using p, no
// one may deny it (200+p); before denying p, no one may use it (100+p).
import { F_RDLCK, F_UNLCK, F_WRLCK, ofdLock, ofdTestLock } from "../../sys/libc.ts";

export const PERM_CONSISTENT_READ = 0;
export const PERM_WRITE = 1;
export const PERM_RESIZE = 3;

const USE = 100;
const DENY = 200;
const PERM_NAMES = ["consistent read", "write", "write unchanged", "resize", "change children"];

/**
 * Take QEMU-compatible locks on `fd`: use `perms`, deny `deny` to others. Throws an Error naming
 * the file when another process (QEMU, qemu-nbd, another bun-nbd) holds a conflicting lock; then
 * nothing stays locked.
 */
export function lockImage(fd: number, path: string, perms: number[], deny: number[]): void {
  for (const p of perms) ofdLock(fd, F_RDLCK, USE + p, 1);
  for (const p of deny) ofdLock(fd, F_RDLCK, DENY + p, 1);
  for (const p of perms) {
    if (ofdTestLock(fd, F_WRLCK, DENY + p, 1) !== F_UNLCK) {
      unlockImage(fd, perms, deny);
      throw new Error(`${path}: failed to get "${PERM_NAMES[p]}" lock: another process (QEMU, qemu-nbd or bun-nbd) has the image open and does not share it`);
    }
  }
  for (const p of deny) {
    if (ofdTestLock(fd, F_WRLCK, USE + p, 1) !== F_UNLCK) {
      unlockImage(fd, perms, deny);
      throw new Error(`${path}: failed to get shared "${PERM_NAMES[p]}" lock: is another process (QEMU, qemu-nbd or bun-nbd) using the image?`);
    }
  }
}

export function unlockImage(fd: number, perms: number[], deny: number[]): void {
  for (const p of perms) ofdLock(fd, F_UNLCK, USE + p, 1);
  for (const p of deny) ofdLock(fd, F_UNLCK, DENY + p, 1);
}

/** What a read-write overlay takes (the same bytes a read-write qemu-io open takes). */
export const RW_PERMS = [PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE];
export const RW_DENY = [PERM_WRITE, PERM_RESIZE];
/** A consistent read-only view: nobody else may write meanwhile. */
export const RO_PERMS = [PERM_CONSISTENT_READ];
export const RO_DENY = [PERM_WRITE, PERM_RESIZE];
