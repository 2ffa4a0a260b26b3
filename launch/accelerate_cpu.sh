#!/usr/bin/env bash
# distshare under `accelerate launch` on CPU: several processes, gloo (accelerate's MULTI_CPU).
# `accelerate launch --cpu` would start ONE process; configs/accelerate/cpu.yaml is a
# MULTI_GPU config with use_cpu: true, which starts N processes that meet on gloo.
#
# The exact command (2 processes, a free port instead of the config's fixed one):
#   accelerate launch --config_file configs/accelerate/cpu.yaml --num_processes 2 --main_process_port 29511 \
#       -m distshare train --engine accelerate --config configs/train/transformer.yaml
# The main job on accelerate:
#   accelerate launch --config_file configs/accelerate/cpu.yaml -m distshare verify --engine accelerate
#
# Usage: launch/accelerate_cpu.sh [extra distshare train args...]   (NPROC=4 for 4 processes)
set -euo pipefail
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"  # keep gloo on loopback for a one-machine run
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
exec accelerate launch --config_file configs/accelerate/cpu.yaml --num_processes "${NPROC:-2}" \
  --main_process_port "$port" -m distshare train --engine accelerate \
  --config "${CONFIG:-configs/train/transformer.yaml}" "$@"
