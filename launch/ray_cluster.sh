#!/usr/bin/env bash
# distshare on a Ray cluster: what a run looks like once one machine is not enough. Here the
# "cluster" is a head and a worker node started with `ray start` on localhost; on real
# machines run the head on one and `ray start --address HEAD:PORT` on each of the others.
#
# The exact commands:
#   ray start --head --port 6390 --num-cpus 1 --include-dashboard false        # the head node
#   ray start --address 127.0.0.1:6390 --num-cpus 1                            # a worker node
#   distshare train --engine ray --nproc 2 --ray-address 127.0.0.1:6390 --config configs/train/transformer.yaml
#   ray stop                                                                   # both nodes
# Ray starts clusters with token authentication: the head writes the token to ~/.ray/auth_token;
# copy it to every other machine (or set RAY_AUTH_TOKEN) before `ray start --address`.
#
# Usage: launch/ray_cluster.sh [extra distshare train args...]
set -euo pipefail
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"  # the head makes a token (~/.ray/auth_token); every node and driver presents it
stop() { ray stop --force >/dev/null 2>&1 || true; }  # note: stops every Ray of this user on this machine
trap stop EXIT
ray start --head --port "$port" --num-cpus 1 --include-dashboard false --disable-usage-stats >/dev/null
# A second node on the same machine: its own raylet, joining the head as another machine would.
ray start --address "127.0.0.1:$port" --num-cpus 1 --disable-usage-stats >/dev/null
distshare train --engine ray --nproc 2 --ray-address "127.0.0.1:$port" \
  --config "${CONFIG:-configs/train/transformer.yaml}" "$@"
