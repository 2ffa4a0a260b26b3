#!/usr/bin/env bash
# distshare under `accelerate launch` on every GPU of this machine: one process per GPU, nccl.
#
# The exact command (N = the number of GPUs; --set device=cuda puts the run on the GPUs):
#   accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes N \
#       -m distshare train --engine accelerate --set device=cuda --config configs/train/transformer.yaml
# The main job on the GPUs:
#   accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes N \
#       -m distshare verify --engine accelerate --set device=cuda
#
# Usage: launch/accelerate_multi_gpu.sh [extra distshare train args...]   (NPROC overrides the GPU count)
set -euo pipefail
gpus=$(python -c 'import torch; print(torch.cuda.device_count())')
if [ "${NPROC:-$gpus}" -lt 1 ]; then
  echo "accelerate_multi_gpu.sh: no CUDA GPU here (torch.cuda.device_count() is 0); use launch/accelerate_cpu.sh" >&2
  exit 2
fi
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
exec accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes "${NPROC:-$gpus}" \
  --main_process_port "$port" -m distshare train --engine accelerate --set device=cuda \
  --config "${CONFIG:-configs/train/transformer.yaml}" "$@"
