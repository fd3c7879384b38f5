#!/usr/bin/env bash
# Long crash and power-loss runs (CI runs the same tests briefly): the kill -9 harness for hundreds of
# rounds per L2 type and for raw files (test/overlay-crash.ts), then the power-loss model over many
# workloads, crash points and states, with many of them through qemu-img (test/overlay-powerloss.ts).
# Usage: bash bench/crash-long.sh [crash|powerloss]   (both by default; knobs below, from the environment)
set -euo pipefail
cd "$(dirname "$0")/.."
BUN=node_modules/.bin/bun
what=${1:-all}

export OVERLAY_CRASH_ROUNDS=${OVERLAY_CRASH_ROUNDS:-300}     # kills per kind (extended L2, standard L2, raw)
export OVERLAY_CRASH_MS=${OVERLAY_CRASH_MS:-3600000}          # time budget per kind
export POWERLOSS_SEEDS=${POWERLOSS_SEEDS:-6}                  # workloads per layout
export POWERLOSS_OPS=${POWERLOSS_OPS:-120}                    # operations per workload
export POWERLOSS_RANDOM=${POWERLOSS_RANDOM:-10}               # random subsets per crash point (half torn)
export POWERLOSS_MAX=${POWERLOSS_MAX:-40}                     # states per crash point
export POWERLOSS_QEMU_EVERY=${POWERLOSS_QEMU_EVERY:-8}        # every Nth state through qemu-img check/convert
export POWERLOSS_EXTRA_POINTS=${POWERLOSS_EXTRA_POINTS:-0.02} # share of other log positions also taken as crash points

start=$(date +%s)
if [ "$what" = all ] || [ "$what" = crash ]; then
  echo "== kill -9: $OVERLAY_CRASH_ROUNDS rounds per kind (budget ${OVERLAY_CRASH_MS} ms each)"
  $BUN x --bun uvu test "overlay-crash\.ts$"
fi
if [ "$what" = all ] || [ "$what" = powerloss ]; then
  echo "== power loss: $POWERLOSS_SEEDS workloads of $POWERLOSS_OPS ops per layout, up to $POWERLOSS_MAX states per crash point, every ${POWERLOSS_QEMU_EVERY}th through qemu-img"
  $BUN x --bun uvu test "overlay-powerloss\.ts$"
fi
echo "crash-long: finished in $(( $(date +%s) - start )) s"
