#!/usr/bin/env bash
# The GPU paths, measured on whatever GPUs this machine has: `distshare verify` on CUDA under
# torchrun (nccl), normal and exact mode; a replica check at every step and exact mode against
# normal mode (bench_check_cost.py, bench_exact.py with --device cuda: one rank on one GPU);
# the one step under torchrun (nccl) and `accelerate launch` (configs/accelerate/multi_gpu.yaml),
# against the same run on the CPU; the device fingerprint's throughput; the CUDA tests of the
# fingerprints.
#
#   benchmarks/gpu_engines.sh [OUT_DIR]        (default runs/gpu)
#   DTYPES=float32 benchmarks/gpu_engines.sh   (the engine comparison in float32 only)
#
# With one GPU the distributed runs have W = 1 (nccl refuses two ranks on one device).
set -uo pipefail
out="${1:-runs/gpu}"
mkdir -p "$out"
n=$(python3 -c 'import torch; print(torch.cuda.device_count())')
if [ "$n" -lt 1 ]; then echo "gpu_engines.sh: no CUDA GPU here" >&2; exit 2; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m distshare env
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
echo "== distshare verify on CUDA (torchrun, nccl): normal mode, then exact mode (bitwise at every step)"
for sync in ddp exact; do
  python3 -m distshare verify --engine torchrun --nproc "$n" --set device=cuda --sync $sync --no-progress \
    --out "$out/verify-$sync" | tail -n 12
done
echo "== a replica check at every step on CUDA (12.6M-parameter transformer, AdamW)"
python3 benchmarks/bench_check_cost.py --device cuda --repeats 4
echo "== exact mode against normal mode on CUDA"
python3 benchmarks/bench_exact.py --device cuda --precision-steps 0 --repeats 3 --out "$out/bench_exact_cuda.json"
echo "== CUDA tests of the fingerprints"
python3 -m pytest -q -p no:cacheprovider -p distshare.testing.pytest_plugin tests/test_checksum.py
# verify's embedded run: tiny transformer, 480 sentences, G = 48, k = 2, 30 steps, a check every step.
run=(--set plan.global_batch=48 --set data.num_samples=480 --set plan.accum_steps=2 --set plan.micro_batch=null
     --steps 30 --check-every 1 --no-progress --json)
show() { python3 - "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1] + "/result.json"))
print(f"  {r['engine']:<11} W={r['world_size']} device={r['device']} sync={r['sync']} ok={r['ok']} "
      f"seconds={r['seconds']} loss {r['losses'][0]:.4f}->{r['final_loss']:.4f} fp={r['final_fingerprint']}")
PY
}
for dtype in ${DTYPES:-float32 float64}; do
  echo "== $dtype"
  torchrun --standalone --nproc_per_node "$n" -m distshare train --engine torch --set device=cuda \
    --set model.dtype=$dtype "${run[@]}" --out "$out/torchrun-$dtype" \
    --save-params "$out/torchrun-$dtype/params.safetensors" >/dev/null && show "$out/torchrun-$dtype"
  accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes "$n" --main_process_port "$(port)" \
    -m distshare train --engine accelerate --set device=cuda --set model.dtype=$dtype "${run[@]}" \
    --out "$out/accelerate-$dtype" --save-params "$out/accelerate-$dtype/params.safetensors" >/dev/null \
    && show "$out/accelerate-$dtype"
  python3 -m distshare train --nproc "$n" --set model.dtype=$dtype "${run[@]}" --out "$out/cpu-$dtype" \
    --save-params "$out/cpu-$dtype/params.safetensors" >/dev/null && show "$out/cpu-$dtype"
  python3 - "$out" "$dtype" <<'PY'
import sys
from safetensors.torch import load_file
from distshare.numerics.diff import diff
out, dtype = sys.argv[1], sys.argv[2]
p = {k: load_file(f"{out}/{k}-{dtype}/params.safetensors") for k in ("torchrun", "accelerate", "cpu")}
for a, b in (("accelerate", "torchrun"), ("torchrun", "cpu")):
    d = diff(p[a], p[b])
    print(f"  {a} vs {b}: bitwise={d.bitwise_equal} max_abs={d.max_abs_diff:.2e} norm_rel={d.norm_rel_diff:.2e} max_ulp={d.max_ulp}")
PY
done
echo "== device fingerprint throughput"
python3 benchmarks/bench_checksum.py --device cuda
