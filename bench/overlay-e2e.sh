#!/bin/bash
# End-to-end overlay benchmark: the same fio workloads (nbd engine, libnbd) against a bun-nbd
# overlay export and a qemu-nbd export of an equivalent qcow2 overlay (64 KiB clusters, extended L2
# unless COMPAT=1, raw 1 GiB base), over unix sockets (no ports). First writes (into a fresh
# overlay) and rewrites (the same offsets again) are measured separately. Prints one line per
# workload and server, then the bun-nbd/qemu-nbd ratio.
#
#   bench/overlay-e2e.sh [WORKLOAD...]          (default: all)
#
# Workloads: randwrite4k (4 KiB random writes, QD32, 256 MiB), seqwrite1m (1 MiB sequential
# writes, QD16, 512 MiB), each as -first and -rewrite; randread4k (QD32, half overlay, half base)
# and seqread1m (QD16) on the overlay the write workloads left.
# Environment: SIZE_MIB (base size, default 1024), RUNTIME (seconds per read workload, default 10),
# COMPAT=1 (standard L2), KEEP=1 (keep the work directory), BUN (bun binary).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUN=${BUN:-$ROOT/node_modules/.bin/bun}
SIZE_MIB=${SIZE_MIB:-1024}
RUNTIME=${RUNTIME:-10}
export PATH=/usr/bin:/usr/sbin:/bin:/sbin:$PATH
W=$(mktemp -d "${TMPDIR:-/tmp}/bun-nbd-ovbench-XXXXXX")
SRV_PID=
cleanup() {
  [ -n "$SRV_PID" ] && kill "$SRV_PID" 2>/dev/null && wait "$SRV_PID" 2>/dev/null
  [ -n "${KEEP:-}" ] && echo "kept $W" || rm -rf "$W"
}
trap cleanup EXIT
WORKLOADS=("$@")
[ ${#WORKLOADS[@]} -eq 0 ] && WORKLOADS=(randwrite4k seqwrite1m randread4k seqread1m)
if [ -n "${COMPAT:-}" ]; then XL2=off; BUNOPT=(--compat); else XL2=on; BUNOPT=(); fi

echo "# base: $SIZE_MIB MiB of random data; overlays: 64 KiB clusters, extended_l2=$XL2" >&2
head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom >"$W/base.img"

start_server() { # which overlay
  local which=$1 ov=$2 sock=$W/$1.sock
  rm -f "$sock"
  if [ "$which" = bun-nbd ]; then
    "$BUN" "$ROOT/src/cli.ts" serve -k "$sock" --overlay "$ov" "${BUNOPT[@]}" "$W/base.img" >"$W/$which.log" 2>&1 &
  else
    qemu-nbd -f qcow2 -k "$sock" -t "$ov" >"$W/$which.log" 2>&1 &
  fi
  SRV_PID=$!
  for _ in $(seq 200); do
    if [ -S "$sock" ] && { [ "$which" = qemu-nbd ] || grep -q '^Ready' "$W/$which.log"; }; then break; fi
    sleep 0.05
  done
  [ -S "$sock" ] || { echo "$which did not start:" >&2; cat "$W/$which.log" >&2; exit 1; }
  local name=
  if [ "$which" = bun-nbd ]; then name=base; fi
  URI="nbd+unix:///$name?socket=$sock"
}

stop_server() {
  kill "$SRV_PID" 2>/dev/null || true
  wait "$SRV_PID" 2>/dev/null || true
  SRV_PID=
}

new_overlay() { # which -> path of a fresh overlay
  local ov=$W/$1.qcow2
  rm -f "$ov"
  if [ "$1" = bun-nbd ]; then
    "$BUN" "$ROOT/src/cli.ts" overlay create "${BUNOPT[@]}" "$ov" "$W/base.img" >/dev/null
  else
    qemu-img create -q -f qcow2 -o cluster_size=65536,extended_l2=$XL2 -b base.img -F raw "$ov"
  fi
  echo "$ov"
}

fio_job() { # name rw bs iodepth extra... -> MB/s
  local name=$1 rw=$2 bs=$3 qd=$4; shift 4
  fio --name="$name" --ioengine=nbd --uri="$URI" --rw="$rw" --bs="$bs" --iodepth="$qd" \
      --randrepeat=1 --random_generator=lfsr --output-format=json "$@" >"$W/fio.json" 2>"$W/fio.err" || { cat "$W/fio.err" >&2; return 1; }
  /usr/bin/python3 -c '
import json,sys
t=open(sys.argv[1]).read(); j=json.loads(t[t.index("{"):])["jobs"][0]
bw=(j["write"]["bw_bytes"]+j["read"]["bw_bytes"])/1e6
iops=j["write"]["iops"]+j["read"]["iops"]
print(f"{bw:.1f} {iops:.0f}")' "$W/fio.json"
}

declare -A RES
run_one() { # which workload
  local which=$1 wl=$2 ov
  case $wl in
    randwrite4k|seqwrite1m)
      ov=$(new_overlay "$which")
      start_server "$which" "$ov"
      if [ "$wl" = randwrite4k ]; then args=(randwrite 4k 32 --size=${SIZE_MIB}m --io_size=256m --end_fsync=1)
      else args=(write 1m 16 --size=512m --end_fsync=1); fi
      RES[$which,$wl-first]=$(fio_job first "${args[@]}")
      RES[$which,$wl-rewrite]=$(fio_job rewrite "${args[@]}")
      stop_server ;;
    randread4k|seqread1m)
      ov=$W/$which.qcow2
      [ -f "$ov" ] || ov=$(new_overlay "$which")
      start_server "$which" "$ov"
      if [ "$wl" = randread4k ]; then RES[$which,$wl]=$(fio_job rr randread 4k 32 --size=${SIZE_MIB}m --time_based --runtime="$RUNTIME")
      else RES[$which,$wl]=$(fio_job sr read 1m 16 --size=${SIZE_MIB}m --time_based --runtime="$RUNTIME"); fi
      stop_server ;;
    *) echo "unknown workload $wl" >&2; exit 2 ;;
  esac
}

for wl in "${WORKLOADS[@]}"; do
  for which in qemu-nbd bun-nbd; do run_one "$which" "$wl"; done
done

printf '%-22s %12s %12s %12s %12s %7s\n' workload "qemu-nbd MB/s" "IOPS" "bun-nbd MB/s" "IOPS" ratio
for wl in "${WORKLOADS[@]}"; do
  case $wl in randwrite4k|seqwrite1m) keys=("$wl-first" "$wl-rewrite") ;; *) keys=("$wl") ;; esac
  for k in "${keys[@]}"; do
    read -r qb qi <<<"${RES[qemu-nbd,$k]}"
    read -r bb bi <<<"${RES[bun-nbd,$k]}"
    printf '%-22s %12s %12s %12s %12s %7s\n' "$k" "$qb" "$qi" "$bb" "$bi" "$(awk -v a="$bb" -v b="$qb" 'BEGIN{printf "%.2fx", a/b}')"
  done
done
