#!/usr/bin/env bash
# distshare on Ray Train with a local Ray: the driver starts Ray bounded to this machine's
# CPUs (dashboard off), runs N Ray Train workers, and writes the run directory itself.
#
# The exact command:
#   distshare train --engine ray --nproc 2 --config configs/train/transformer.yaml
# The main job on Ray:
#   distshare verify --engine ray
#
# Usage: launch/ray_local.sh [extra distshare train args...]   (NPROC=4 for 4 workers)
set -euo pipefail
unset RAY_ADDRESS  # a local Ray, even if the shell points at a cluster
exec distshare train --engine ray --nproc "${NPROC:-2}" --config "${CONFIG:-configs/train/transformer.yaml}" "$@"
