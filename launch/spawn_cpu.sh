#!/usr/bin/env bash
# distshare on simulated CPU ranks: no launcher, distshare spawns N gloo processes itself.
#
#   distshare verify                                                   # the main job, 2 ranks
#   distshare train --config configs/train/transformer.yaml --nproc 2  # training, 2 ranks
#
# Usage: launch/spawn_cpu.sh [N] [extra distshare train args...]
set -euo pipefail
nproc="${1:-2}"
shift || true
exec distshare train --config "${CONFIG:-configs/train/transformer.yaml}" --nproc "$nproc" "$@"
