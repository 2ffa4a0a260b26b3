"""Per-rank memory of DDP, FSDP2 and HSDP on the benchmark model; and what a logical digest costs.

    python benchmarks/bench_memory.py                          # W = 2 and 4, gloo CPU, a few minutes
    python benchmarks/bench_memory.py --world 4 --repeats 5 --json
    python benchmarks/bench_memory.py --parallel fsdp hsdp --repeats 7   # the digest timings only need these

The model is `bench_check_cost.py`'s 12.6M-parameter transformer (d_model 512, 4 layers,
d_ff 2048, AdamW, svo data, G = 32). Each (layout, W) runs in a world of its own (so a
process's peak RSS is that layout's alone): `distshare.training.train` for `--steps` steps
with `parallel` ddp, fsdp or hsdp (HSDP at W = 4 only: 2 replica groups x 2 shards; at W = 2
it would be DDP or FSDP again). After the last step each rank counts the bytes it holds:

- parameters: each parameter's local tensor (a DDP replica: the whole tensor; FSDP2 / HSDP:
  this rank's shard, `DTensor.to_local()`);
- optimizer state: every tensor of `optimizer.state` (AdamW's two moments and step counts), local;
- peak RSS: the process's high-water mark (`VmHWM`) over the run, read before the digest
  timings below (which gather whole tensors), everything included: torch itself (about 330 MB
  at start), the data, activations, gradients, DDP's buckets, FSDP2's all-gathered layers,
  the gloo buffers; and the RSS at start, to subtract.

Expectation (issue 17): FSDP's parameters + optimizer state per rank are about 1/W of DDP's.

In the sharded worlds the same trained state is also digested both ways, interleaved
(`--repeats` times each, median): the logical digest (`fingerprint_state`: lsh128 from each
rank's shards, one all-gather of 2 int64 per tensor) against gathering every tensor
(`DTensor.full_tensor()`) and hashing it whole with xxh3_128, over every tensor of the model
and the AdamW state. Reported as the ratio logical / (gather + xxh3); the gather alone and
lsh128 of the gathered tensors are reported too, to say where the time goes.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.bench_check_cost import OVERRIDES as CHECK_COST_MODEL  # noqa: E402
from distshare.config import load_config  # noqa: E402
from distshare.distributed.spawn import run_distributed  # noqa: E402
from distshare.distributed.world import World  # noqa: E402
from distshare.integrity.fingerprint import fingerprint, fingerprint_many, fingerprint_state  # noqa: E402
from distshare.integrity.logical import LOGICAL_ALGORITHM, is_dtensor  # noqa: E402
from distshare.integrity.state import named_state_tensors  # noqa: E402
from distshare.training import Run, train  # noqa: E402

OVERRIDES = [*CHECK_COST_MODEL, "data.name=svo"]  # bench_check_cost.py's model
MB = 1e6


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if is_dtensor(t) else t
    return local.numel() * local.element_size()


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux


def _ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def _digest_costs(run: Run, repeats: int) -> dict[str, Any]:
    """Logical digest vs gather + xxh3 of the same state, interleaved; medians in ms."""
    model, opt = run.model, run.optimizer
    tensors = dict(named_state_tensors(model, opt, shards=False))

    def logical() -> None:
        fingerprint_state(model, opt)

    def gather() -> dict[str, torch.Tensor]:
        return {n: t.full_tensor() if is_dtensor(t) else t for n, t in tensors.items()}

    def gather_xxh3() -> None:
        for t in gather().values():
            fingerprint(t, "xxh3_128")

    gathered = gather()

    def lsh128_of_gathered() -> None:
        fingerprint_many(gathered, LOGICAL_ALGORITHM)

    runs: dict[str, list[float]] = {"logical": [], "gather_xxh3": [], "gather": [], "lsh128_gathered": []}
    variants = [
        ("logical", logical),
        ("gather_xxh3", gather_xxh3),
        ("gather", gather),
        ("lsh128_gathered", lsh128_of_gathered),
    ]
    logical()  # warm
    gather_xxh3()
    for i in range(repeats):
        for name, fn in variants[i % len(variants) :] + variants[: i % len(variants)]:  # rotated order
            torch.distributed.barrier()
            runs[name].append(_ms(fn))
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "digest_ms": med,
        "digest_runs_ms": runs,
        "digest_tensors": len(tensors),
        "ratio_logical_over_gather_xxh3": med["logical"] / med["gather_xxh3"],
    }


def bench_rank(world: World, parallel: str, steps: int, repeats: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    rss_start = _status_kb("VmRSS")
    cfg = load_config(
        None, [*OVERRIDES, f"plan.world_size={world.world_size}", f"steps={steps}", f"parallel={parallel}"]
    )
    kept: list[Run] = []

    def on_step(run: Run, step: int) -> None:
        if step == steps - 1:
            kept.append(run)

    train(cfg, world, progress=False, on_step=on_step)
    run = kept[0]
    params = [p for p in run.model.parameters()]
    out: dict[str, Any] = {
        "rank": world.rank,
        "param_count": sum(p.numel() for p in params),  # logical
        "param_bytes": sum(_local_bytes(p) for p in params),
        "optim_bytes": sum(
            _local_bytes(v) for s in run.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)
        ),
        "rss_start_mb": rss_start / 1e3,  # torch imported, nothing built yet
        "rss_mb": _status_kb("VmRSS") / 1e3,  # after the last step
        "peak_rss_mb": _status_kb("VmHWM") / 1e3,  # over the run, before the digest timings gather anything
    }
    if parallel != "ddp":
        out |= _digest_costs(run, repeats)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4], help="world sizes")
    parser.add_argument("--parallel", nargs="+", default=["ddp", "fsdp", "hsdp"], help="layouts to run")
    parser.add_argument("--steps", type=int, default=2, help="training steps before measuring")
    parser.add_argument("--repeats", type=int, default=3, help="timings of each digest variant")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    for w in args.world:
        for parallel in args.parallel:
            if parallel == "hsdp" and (w < 4 or w % 2):
                continue
            ranks = run_distributed(bench_rank, w, parallel, args.steps, args.repeats, timeout_s=600, deadline_s=3600)
            rows.append({"world": w, "parallel": parallel, "ranks": ranks})
    if args.json:
        print(json.dumps(rows))
        return 0
    print("| layout | W | params / rank | optimizer state / rank | sum | vs DDP | peak RSS / rank (max) | at start |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        ranks = row["ranks"]
        total = max(r["param_bytes"] + r["optim_bytes"] for r in ranks)
        ddp = next((x for x in rows if x["world"] == row["world"] and x["parallel"] == "ddp"), row)["ranks"]
        ddp_total = max(r["param_bytes"] + r["optim_bytes"] for r in ddp)  # (itself when ddp was not run)
        mesh = {"ddp": "", "fsdp": f" (1 x {row['world']})", "hsdp": f" (2 x {row['world'] // 2})"}[row["parallel"]]
        print(
            f"| {row['parallel']}{mesh} | {row['world']} | {max(r['param_bytes'] for r in ranks) / MB:.1f} MB "
            f"| {max(r['optim_bytes'] for r in ranks) / MB:.1f} MB | {total / MB:.1f} MB | {total / ddp_total:.3f} "
            f"| {max(r['peak_rss_mb'] for r in ranks):.0f} MB | {max(r['rss_start_mb'] for r in ranks):.0f} MB |"
        )
    print(f"\n{ranks[0]['param_count'] / 1e6:.1f}M parameters (logical)")
    print("\n| layout | W | logical digest | gather + xxh3 | ratio | gather alone | lsh128 of gathered |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        r0 = row["ranks"][0]
        if "digest_ms" not in r0:
            continue
        d = r0["digest_ms"]
        print(
            f"| {row['parallel']} | {row['world']} | {d['logical']:.1f} ms | {d['gather_xxh3']:.1f} ms "
            f"| {r0['ratio_logical_over_gather_xxh3']:.2f} | {d['gather']:.1f} ms | {d['lsh128_gathered']:.1f} ms |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
