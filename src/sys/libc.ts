// src/sys: the floor below protocol, server, client and devices; the only place that imports bun:ffi.
// The few libc calls Bun does not expose, through bun:ffi: fallocate (hole punching and zero
// ranges), lseek with SEEK_DATA/SEEK_HOLE (sparse extents), OFD byte-range locks (compatible with
// QEMU's image locking), sendfile, send with MSG_MORE, socket buffer sizes and TCP_NOTSENT_LOWAT
// (the server's reply path), recv without waiting (the client's in-place receive), and the
// blocking socket calls of a connection served on a thread of its own (server/connection-thread.ts). Each
// wrapper throws an Error with a `code` like Node's (e.g. "EOPNOTSUPP") so errors map to NBD
// errnos in one place. If libc cannot be loaded, `libc`
// is null and callers fall back to portable paths.
//
// bun:ffi is loaded with require, not imported: a static import would be hoisted into any bundle
// that contains this module (the client's Bun transport uses it), and that bundle would then fail to
// load under Node; a top-level await would make every importer an async module, which CommonJS
// loaders (uvu's runner) refuse. Under Node the require fails, `haveLibc` is false and the
// portable paths are taken.
type Ffi = typeof import("bun:ffi");
let ffi: Ffi | null = null;
try {
  ffi = require("bun:ffi") as Ffi;
} catch {
  ffi = null;
}

const ERRNO_NAMES: Record<number, string> = {
  1: "EPERM", 2: "ENOENT", 5: "EIO", 6: "ENXIO", 9: "EBADF", 11: "EAGAIN", 12: "ENOMEM", 13: "EACCES",
  16: "EBUSY", 22: "EINVAL", 27: "EFBIG", 28: "ENOSPC", 29: "ESPIPE", 30: "EROFS", 38: "ENOSYS",
  75: "EOVERFLOW", 95: "EOPNOTSUPP", 122: "EDQUOT",
};

export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;
const SEEK_DATA = 3;
const SEEK_HOLE = 4;
const F_OFD_GETLK = 36;
const F_OFD_SETLK = 37;
export const F_RDLCK = 0;
export const F_WRLCK = 1;
export const F_UNLCK = 2;

type Lib = ReturnType<typeof load>;
function load(f: Ffi) {
  const { FFIType } = f;
  return f.dlopen("libc.so.6", {
    fallocate: { args: [FFIType.i32, FFIType.i32, FFIType.i64, FFIType.i64], returns: FFIType.i32 },
    lseek: { args: [FFIType.i32, FFIType.i64, FFIType.i32], returns: FFIType.i64_fast },
    fcntl: { args: [FFIType.i32, FFIType.i32, FFIType.ptr], returns: FFIType.i32 },
    sendfile: { args: [FFIType.i32, FFIType.i32, FFIType.ptr, FFIType.u64], returns: FFIType.i64_fast },
    recv: { args: [FFIType.i32, FFIType.ptr, FFIType.u64, FFIType.i32], returns: FFIType.i64_fast },
    send: { args: [FFIType.i32, FFIType.ptr, FFIType.u64, FFIType.i32], returns: FFIType.i64_fast },
    pread: { args: [FFIType.i32, FFIType.ptr, FFIType.u64, FFIType.i64], returns: FFIType.i64_fast },
    setsockopt: { args: [FFIType.i32, FFIType.i32, FFIType.i32, FFIType.ptr, FFIType.u32], returns: FFIType.i32 },
    getsockopt: { args: [FFIType.i32, FFIType.i32, FFIType.i32, FFIType.ptr, FFIType.ptr], returns: FFIType.i32 },
    posix_fadvise: { args: [FFIType.i32, FFIType.i64, FFIType.i64, FFIType.i32], returns: FFIType.i32 },
    calloc: { args: [FFIType.u64, FFIType.u64], returns: FFIType.ptr },
    free: { args: [FFIType.ptr], returns: FFIType.void },
    dup: { args: [FFIType.i32], returns: FFIType.i32 },
    close: { args: [FFIType.i32], returns: FFIType.i32 },
    shutdown: { args: [FFIType.i32, FFIType.i32], returns: FFIType.i32 },
    ioctl: { args: [FFIType.i32, FFIType.u64, FFIType.ptr], returns: FFIType.i32 },
    __errno_location: { args: [], returns: FFIType.ptr },
  }).symbols;
}

let lib: Lib | null = null;
// Without bun:ffi these are never called: every wrapper checks `lib` first.
const { ptr, read } = ffi ?? { ptr: () => 0, read: { i32: () => 0 } };
try {
  lib = ffi ? load(ffi) : null;
} catch {
  lib = null;
}
export const haveLibc = lib !== null;

function errno(): number {
  return read.i32(lib!.__errno_location()!, 0);
}

export function errnoError(syscall: string, e: number, path?: string): Error {
  const code = ERRNO_NAMES[e] ?? `E${e}`;
  const err = new Error(`${syscall}${path ? ` ${path}` : ""}: ${code}`) as Error & { code: string; errno: number; syscall: string };
  err.code = code;
  err.errno = e;
  err.syscall = syscall;
  return err;
}

/** fallocate(2). Throws with code EOPNOTSUPP where the filesystem lacks the mode. */
export function fallocate(fd: number, mode: number, offset: number, length: number): void {
  if (!lib) throw errnoError("fallocate", 95);
  if (lib.fallocate(fd, mode, offset, length) !== 0) throw errnoError("fallocate", errno());
}

/**
 * lseek(2) with SEEK_DATA / SEEK_HOLE. Returns the offset found, or -1 when there is no more data
 * (ENXIO past the last data). Throws on other errors (EINVAL: filesystem lacks support).
 */
export function seekData(fd: number, offset: number): number {
  return seek(fd, offset, SEEK_DATA);
}
export function seekHole(fd: number, offset: number): number {
  return seek(fd, offset, SEEK_HOLE);
}
function seek(fd: number, offset: number, whence: number): number {
  if (!lib) throw errnoError("lseek", 22);
  const r = Number(lib.lseek(fd, offset, whence));
  if (r >= 0) return r;
  const e = errno();
  if (e === 6) return -1; // ENXIO
  throw errnoError("lseek", e);
}

/** posix_fadvise(POSIX_FADV_WILLNEED): start reading the range into the page cache, without waiting. */
export function willNeed(fd: number, offset: number, length: number): void {
  if (!lib) return;
  const r = lib.posix_fadvise(fd, offset, length, 3);
  if (r !== 0) throw errnoError("posix_fadvise", r);
}

/**
 * Zeroed memory outside the JavaScript heap, for C structs a library keeps pointers to between
 * calls (zlib checks that its z_stream never moves). Returns the address and a view of the bytes.
 */
export function cAlloc(size: number): { addr: number; bytes: Uint8Array } {
  if (!lib || !ffi) throw errnoError("calloc", 38);
  const addr = lib.calloc(1, size);
  if (!addr) throw errnoError("calloc", 12);
  return { addr: addr as number, bytes: new Uint8Array(ffi.toArrayBuffer(addr, 0, size)) };
}
export function cFree(addr: number): void {
  if (lib && addr) lib.free(addr as never);
}

/**
 * sendfile(2) from `inFd` at `offset` to `outFd`. Returns bytes sent (may be short), 0 at the end of
 * the file, or -11 when the socket is full (EAGAIN); a call a signal interrupted is made again.
 * The offset is passed as two 32-bit halves of an off_t: no BigInt per call on the reply path.
 */
const sendfileOffset = new Uint32Array(2);
const EINTR = 4;
export function sendfile(outFd: number, inFd: number, offset: number, count: number): number {
  if (!lib) throw errnoError("sendfile", 38);
  for (;;) {
    sendfileOffset[0] = offset >>> 0;
    sendfileOffset[1] = Math.floor(offset / 4294967296);
    const r = lib.sendfile(outFd, inFd, ptr(sendfileOffset), count) as number;
    if (r >= 0) return r;
    const e = errno();
    if (e === 11) return -11;
    if (e !== EINTR) throw errnoError("sendfile", e);
  }
}

const MSG_MORE = 0x8000;
const MSG_NOSIGNAL = 0x4000;
const MSG_DONTWAIT = 0x40;
/**
 * send(2) of `b[off, off+len)` without waiting, with MSG_MORE: TCP holds the bytes back until what
 * follows (a sendfile payload) fills the segment, so a reply header does not leave as a packet of
 * its own. Returns the count taken: 0 when the socket is full or on any error (the caller writes
 * the rest through its event loop, which reports a closed socket its own way).
 */
export function sendMore(fd: number, b: Uint8Array, off: number, len: number): number {
  const r = lib!.send(fd, ptr(b, off), len, MSG_MORE | MSG_NOSIGNAL | MSG_DONTWAIT) as number;
  return r > 0 ? r : 0;
}

/**
 * sendfile(2) done in user space: up to `len` bytes of file `inFd` at `offset` read into `buf`, then
 * sent on socket `outFd` without waiting. Returns the bytes sent (bytes read but not sent are read
 * again next time), 0 at the end of the file, or -11 when the socket is full; throws on an error
 * (EPIPE, ECONNRESET, EIO). The header of a reply goes separately (sendMore): put in front of the
 * payload it would shift every later piece off the page alignment that makes both copies fast
 * (measured: twice the server CPU per byte). See SocketTransport for when this beats sendfile.
 */
export function copySend(outFd: number, inFd: number, offset: number, len: number, buf: Uint8Array): number {
  if (!lib) throw errnoError("pread", 38);
  const n = lib.pread(inFd, ptr(buf), Math.min(len, buf.length), offset) as number;
  if (n < 0) throw errnoError("pread", errno());
  if (n === 0) return 0;
  const r = lib.send(outFd, ptr(buf), n, MSG_NOSIGNAL | MSG_DONTWAIT) as number;
  if (r >= 0) return r;
  const e = errno();
  if (e === 11) return -11;
  throw errnoError("send", e);
}

/**
 * send(2) of `len` bytes at native address `addr` (memory owned by a C library) without waiting:
 * the count sent, 0 when the socket is full, -1 on an error (the caller goes through its event
 * loop, which reports a closed socket its own way).
 */
export function sendAddr(fd: number, addr: number, len: number): number {
  const r = lib!.send(fd, addr as never, len, MSG_NOSIGNAL | MSG_DONTWAIT) as number;
  if (r >= 0) return r;
  return errno() === 11 ? 0 : -1;
}

const SOL_SOCKET = 1;
const SO_SNDBUF = 7;
const SO_RCVBUF = 8;
const sockInt = new Int32Array(2);
/** The kernel's send and receive buffer sizes of a socket (SO_SNDBUF, SO_RCVBUF), or null. */
export function socketBuffers(fd: number): { send: number; receive: number } | null {
  if (!lib) return null;
  const out = [0, 0];
  for (const [i, opt] of [[0, SO_SNDBUF], [1, SO_RCVBUF]] as const) {
    sockInt[0] = 0;
    sockInt[1] = 4;
    if (lib.getsockopt(fd, SOL_SOCKET, opt, ptr(sockInt), ptr(sockInt, 4)) !== 0) return null;
    out[i] = sockInt[0]!;
  }
  return { send: out[0]!, receive: out[1]! };
}

/** Ask for a send buffer of `bytes` (the kernel doubles it for bookkeeping, capped by net.core.wmem_max). */
export function setSendBuffer(fd: number, bytes: number): boolean {
  if (!lib) return false;
  sockInt[0] = bytes;
  return lib.setsockopt(fd, SOL_SOCKET, SO_SNDBUF, ptr(sockInt), 4) === 0;
}

const IPPROTO_TCP = 6;
const TCP_NOTSENT_LOWAT = 25;
/** TCP_NOTSENT_LOWAT: the socket counts as full once `bytes` wait unsent (see SocketTransport). */
export function setNotSentLowat(fd: number, bytes: number): boolean {
  if (!lib) return false;
  sockInt[0] = bytes;
  return lib.setsockopt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, ptr(sockInt), 4) === 0;
}

/**
 * recv(2) with MSG_DONTWAIT into `dst[off, off+len)`: what the socket holds now, without waiting.
 * Returns the byte count, or 0 when nothing is there (EAGAIN), at end of stream or on an error: the
 * event loop that owns the socket sees those itself and reports them through its own callbacks.
 */
export function recvNow(fd: number, dst: Uint8Array, off: number, len: number): number {
  const r = lib!.recv(fd, ptr(dst, off), len, MSG_DONTWAIT) as number;
  return r > 0 ? r : 0;
}

// struct flock on x86_64/aarch64 Linux: short l_type, short l_whence, (pad), off_t l_start,
// off_t l_len, pid_t l_pid (+pad) = 32 bytes.
const flockBuf = new ArrayBuffer(32);
const flockView = new DataView(flockBuf);
const flockBytes = new Uint8Array(flockBuf);
function setFlock(type: number, start: number, len: number): void {
  flockBytes.fill(0);
  flockView.setInt16(0, type, true);
  flockView.setInt16(2, 0 /* SEEK_SET */, true);
  flockView.setBigInt64(8, BigInt(start), true);
  flockView.setBigInt64(16, BigInt(len), true);
}

/**
 * Take (or release, with F_UNLCK) an open-file-description byte-range lock without waiting.
 * Returns false if another open file description holds a conflicting lock.
 */
export function ofdLock(fd: number, type: number, start: number, len: number): boolean {
  if (!lib) return true; // no libc: locking is best effort
  setFlock(type, start, len);
  if (lib.fcntl(fd, F_OFD_SETLK, ptr(flockBytes)) === 0) return true;
  const e = errno();
  if (e === 11 || e === 13) return false; // EAGAIN / EACCES: conflict
  throw errnoError("fcntl(F_OFD_SETLK)", e);
}

/** Would a lock of `type` on the range conflict? Returns the conflicting lock type or F_UNLCK. */
export function ofdTestLock(fd: number, type: number, start: number, len: number): number {
  if (!lib) return F_UNLCK;
  setFlock(type, start, len);
  if (lib.fcntl(fd, F_OFD_GETLK, ptr(flockBytes)) !== 0) throw errnoError("fcntl(F_OFD_GETLK)", errno());
  return flockView.getInt16(0, true);
}

// ---------------------------------------------------------------- sockets owned by a thread ---
// A connection handed to a thread of its own (server/thread-pool.ts) is a blocking socket there:
// the thread sleeps in recv(2) until a request comes, and its sends wait for room.

const FIONBIO = 0x5421;
const SO_LINGER = 13;

/**
 * A second descriptor for the socket `fd`, in blocking mode, that outlives `fd` being closed (the
 * event loop closes its own when it lets the connection go). Throws when libc is missing.
 */
export function adoptSocket(fd: number): number {
  if (!lib) throw errnoError("dup", 38);
  const d = lib.dup(fd);
  if (d < 0) throw errnoError("dup", errno());
  sockInt[0] = 0;
  if (lib.ioctl(d, FIONBIO, ptr(sockInt)) !== 0) {
    const e = errno();
    lib.close(d);
    throw errnoError("ioctl(FIONBIO)", e);
  }
  return d;
}

/**
 * recv(2) that waits for data: the count read, 0 at the end of the stream (or after
 * shutdownRead), -1 on an error (ECONNRESET...).
 */
export function recvWait(fd: number, dst: Uint8Array, off: number, len: number): number {
  for (;;) {
    const r = lib!.recv(fd, ptr(dst, off), len, 0) as number;
    if (r >= 0) return r;
    if (errno() !== EINTR) return -1;
  }
}

/** send(2) all of `b[off, off+len)`, waiting for room; MSG_MORE with `more`. Throws on an error (EPIPE). */
export function sendWait(fd: number, b: Uint8Array, off: number, len: number, more = false): void {
  const flags = MSG_NOSIGNAL | (more ? MSG_MORE : 0);
  while (len > 0) {
    const r = lib!.send(fd, ptr(b, off), len, flags) as number;
    if (r < 0) {
      const e = errno();
      if (e === EINTR) continue;
      throw errnoError("send", e);
    }
    off += r;
    len -= r;
  }
}

/**
 * sendfile(2) of `len` bytes of `inFd` at `offset`, waiting for room. Returns the bytes sent: less
 * than `len` only when the file ended first. Throws on an error (EPIPE, EIO).
 */
export function sendfileWait(outFd: number, inFd: number, offset: number, len: number): number {
  let sent = 0;
  while (sent < len) {
    const r = sendfile(outFd, inFd, offset + sent, len - sent); // a blocking socket: never -11
    if (r <= 0) break;
    sent += r;
  }
  return sent;
}

/** shutdown(SHUT_RD): a recvWait blocked on `fd` (in another thread) returns 0. */
export function shutdownRead(fd: number): void {
  lib?.shutdown(fd, 0);
}

/**
 * close(2) a socket with a normal FIN: SO_LINGER is cleared first (an event loop that let the
 * connection go may have set it to reset on close, and the setting belongs to the socket, not to
 * one of its descriptors).
 */
export function closeSocket(fd: number): void {
  if (!lib) return;
  sockInt[0] = 0;
  sockInt[1] = 0;
  lib.setsockopt(fd, SOL_SOCKET, SO_LINGER, ptr(sockInt), 8);
  lib.close(fd);
}
