#!/usr/bin/env bash
# Install what the test suite needs on a Debian machine: the npm dependencies (Bun, uvu, mitata,
# TypeScript) and the real NBD consumers and peers the interop tests drive (QEMU, libnbd tools,
# nbdkit (with its xz and gzip filters), nbd-client, fio, xorriso, e2fsprogs), the mkfs/partitioning
# tools the inspect, partition-export and floppy tests make images with and compare against (blkid,
# sfdisk, sgdisk, mkfs.fat, mkfs.exfat, mkfs.ntfs, mkfs.xfs, mkfs.btrfs, mkudffs, mtools, nbdfuse's
# fusermount3), the compressors the compressed-image tests use (xz-utils, gzip, zip; liblzma5 and
# zlib1g are loaded through bun:ffi), openssl and GnuTLS's psktool, which the TLS tests make
# certificates and keys with (openssl pulls in libssl3, which bun-nbd loads for TLS-PSK),
# systemd's socket-activation and unit-verify tools, curl (the metrics scrape; it also creates
# buckets), and the stores the remote-image tests start themselves: nginx (nginx-light) and a
# single-node Ceph RADOS Gateway (ceph-mon, ceph-osd, radosgw, ceph-common; script(1) gives the
# publish test a terminal).
# Idempotent: skips apt-get when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(qemu-utils qemu-system-x86 libnbd-bin python3-libnbd nbdkit nbd-client fio xorriso genisoimage
      e2fsprogs binutils busybox-static procps
      util-linux fdisk gdisk dosfstools exfatprogs ntfs-3g xfsprogs btrfs-progs udftools mtools fuse3
      xz-utils gzip zip unzip liblzma5 zlib1g
      openssl gnutls-bin systemd curl
      nginx-light ceph-mon ceph-osd radosgw ceph-common bsdutils)
# Commands that prove the packages are there (one per package, same order).
CMDS=(qemu-img qemu-system-x86_64 nbdinfo /usr/lib/python3/dist-packages/nbd.py nbdkit nbd-client fio xorriso isoinfo
      mke2fs as /bin/busybox ps
      blkid sfdisk sgdisk mkfs.fat mkfs.exfat mkfs.ntfs mkfs.xfs mkfs.btrfs mkudffs mdir fusermount3
      xz gzip zip unzip /usr/lib/x86_64-linux-gnu/liblzma.so.5 /usr/lib/x86_64-linux-gnu/libz.so.1
      openssl psktool systemd-socket-activate curl
      nginx ceph-mon ceph-osd radosgw ceph script)

missing=()
for i in "${!PKGS[@]}"; do
  c=${CMDS[$i]}
  if [[ $c == /* ]]; then [ -e "$c" ] || missing+=("${PKGS[$i]}")
  else PATH=/usr/bin:/usr/sbin:/bin:/sbin:$PATH command -v "$c" >/dev/null || missing+=("${PKGS[$i]}"); fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[ -x node_modules/.bin/bun ] || npm install --no-audit --no-fund
echo "setup: ready ($(node_modules/.bin/bun --version) bun, $(qemu-img --version | head -1))"
