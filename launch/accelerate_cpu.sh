#!/usr/bin/env bash
# distshare under `accelerate launch` on CPU: several processes, gloo (accelerate's MULTI_CPU).
#
# Why not `accelerate launch --cpu --num_processes 2`: --cpu selects accelerate's
# single-process launcher, which starts the script ONCE whatever --num_processes says (so
# does --num_processes without --multi_gpu on a machine with no GPU). distshare refuses that
# launch in one line. The shipped cpu.yaml is a MULTI_GPU config with use_cpu: true: it starts
# N processes (torchrun's agent) that meet on gloo. The same without a file:
#   ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m distshare train --engine accelerate
#
# The exact command (2 processes, a free port instead of the config's fixed one):
#   accelerate launch --config_file "$(python -c 'import distshare.config as c; print(c.SHIPPED_CONFIGS)')/accelerate/cpu.yaml" \
#       --num_processes 2 --main_process_port 0 -m distshare train --engine accelerate --config transformer
# (in a checkout, configs/accelerate/cpu.yaml is the same file). The main job on accelerate:
#   accelerate launch --config_file configs/accelerate/cpu.yaml -m distshare verify --engine accelerate
#
# Usage: launch/accelerate_cpu.sh [extra distshare train args...]   (NPROC=4 for 4 processes)
# Works from any directory: the config is the one shipped inside the installed package.
set -euo pipefail
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"  # keep gloo on loopback for a one-machine run
config=$(python -c 'import distshare.config as c; print(c.SHIPPED_CONFIGS / "accelerate" / "cpu.yaml")')
exec accelerate launch --config_file "$config" --num_processes "${NPROC:-2}" \
  --main_process_port 0 -m distshare train --engine accelerate \
  --config "${CONFIG:-transformer}" "$@"
