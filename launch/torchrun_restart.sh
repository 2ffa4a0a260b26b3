#!/usr/bin/env bash
# A worker that dies, and a run that does not: torchrun restarts the workers, and they
# resume from the newest verified checkpoint (distshare/training/checkpointer.py).
#
#   torchrun --standalone --nproc_per_node 2 --max-restarts 1 \
#       -m distshare train --steps 20 --checkpoint-dir ckpt --checkpoint-every 5
#
# This script runs that with rank 1 killed right after step 12 (the test plugin
# distshare.testing.faults, DISTSHARE_FAULT_EXIT, first attempt only): the restarted ranks
# continue from ckpt/step-000010 and end with the final fingerprint of a run that never stopped.
# result.json says "restarts": 1 and from which step. The restart continues the first attempt's
# run directory (runs/train-<time>; ckpt/.distshare-run-dir remembers which): one directory per run.
#
# Usage: launch/torchrun_restart.sh [CKPT_DIR] [extra distshare train args...]
set -euo pipefail
ckpt="${1:-runs/restart-ckpt}"
shift || true
config="${CONFIG:-configs/train/transformer.yaml}"
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"  # keep gloo on loopback for a one-machine run
export DISTSHARE_PLUGINS="${DISTSHARE_PLUGINS:-distshare.testing.faults}"  # test tooling, loaded on every rank
export DISTSHARE_FAULT_EXIT="${DISTSHARE_FAULT_EXIT:-1:12}"

exec torchrun --standalone --nproc_per_node "${NPROC:-2}" --max-restarts "${MAX_RESTARTS:-1}" \
  -m distshare train --config "$config" --steps 20 --checkpoint-dir "$ckpt" --checkpoint-every 5 \
  --resume auto "$@"
