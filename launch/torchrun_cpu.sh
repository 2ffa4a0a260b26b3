#!/usr/bin/env bash
# distshare under torchrun on CPU (gloo). Every rank runs the same `distshare train`; the
# ranks find each other through torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR).
#
# One machine, 2 processes:
#   torchrun --standalone --nproc_per_node 2 -m distshare train --config configs/train/transformer.yaml
#
# Two "nodes" on localhost (what a two-machine run looks like; on real machines use the
# first machine's address for --master_addr and run one command on each):
#   torchrun --nnodes 2 --node_rank 0 --nproc_per_node 1 --master_addr 127.0.0.1 --master_port 29533 \
#       -m distshare train --config configs/train/transformer.yaml &
#   torchrun --nnodes 2 --node_rank 1 --nproc_per_node 1 --master_addr 127.0.0.1 --master_port 29533 \
#       -m distshare train --config configs/train/transformer.yaml
#
# Usage: launch/torchrun_cpu.sh [standalone|two-nodes] [extra distshare train args...]
set -euo pipefail
mode="${1:-standalone}"
shift || true
config="${CONFIG:-configs/train/transformer.yaml}"
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"  # keep gloo on loopback for a one-machine run

case "$mode" in
  standalone)
    exec torchrun --standalone --nproc_per_node "${NPROC:-2}" -m distshare train --config "$config" "$@"
    ;;
  two-nodes)
    # A free port, chosen by the OS, so two runs on one machine never collide.
    port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    torchrun --nnodes 2 --node_rank 1 --nproc_per_node 1 --master_addr 127.0.0.1 --master_port "$port" \
      -m distshare train --config "$config" "$@" >/dev/null &
    worker=$!
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 1 --master_addr 127.0.0.1 --master_port "$port" \
      -m distshare train --config "$config" "$@"
    wait "$worker"
    ;;
  *)
    echo "usage: $0 [standalone|two-nodes] [distshare train args...]" >&2
    exit 2
    ;;
esac
