"""Step time of distshare's training loop against a hand-written DDP loop, side by side.

    python benchmarks/bench_step.py                          # 2 ranks, transformer, about 1 minute
    python benchmarks/bench_step.py --model cnn --json --out bench-cnn.json
    python benchmarks/bench_step.py --nproc 2 --steps 100 --warmup 10 --repeats 20 --model transformer

Both sides run on the same gloo ranks (one `run_distributed` call: same process group,
same `torch.set_num_threads`), on the same data, model and optimizer, with the same global
batch plan (G = W x k x b from `configs/train/<model>.yaml`) and the same sample order:

- baseline: the textbook DDP loop; plain `DistributedDataParallel` (default averaging),
  `no_sync()` on all but the last micro-batch, `cross_entropy(mean) / k`, `step`, `zero_grad`;
  micro-batches are contiguous slices of a fixed per-epoch permutation, no checks at all.
- distshare: `distshare.training.train(cfg, world, out_dir, progress)`, what every rank of
  `distshare train --nproc 2` runs, with replicas checked as the config says (`check_every`
  of `configs/train/<model>.yaml`), at every step (`check_every=1`, what `distshare verify`
  does), or only once after the loop (`check_every=0`).

Each rank timestamps the end of every step (for distshare through `train`'s `on_step`
callback, i.e. after the loss all-reduce, the replica check, the metrics line); a step's time
is the gap between consecutive timestamps, so setup (data, model, DDP wrapper) is never
counted, and the first `--warmup` steps are dropped. The variants are interleaved inside the
ranks, in a rotated order each repeat, so drift of the machine hits all of them. The ratio is
the median over repeats of median(distshare step) / median(baseline step) of adjacent runs,
on rank 0's clock; the same is reported for rank 0's CPU time, which other processes on a
shared machine disturb less. See benchmarks/README.md for the measured numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from distshare.config import RunConfig, load_config
from distshare.data import TensorTable, build_dataset
from distshare.distributed.spawn import run_distributed
from distshare.distributed.world import World
from distshare.errors import DistshareError
from distshare.models import build_model
from distshare.training import train

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "train"
VARIANTS = ("baseline", "distshare_as_configured", "distshare_check_every_step", "distshare_check_at_end")
GOAL = 1.05  # distshare's step may cost at most 5% more than the hand-written loop
Stamp = tuple[float, float]  # (wall clock, this process's CPU time, all threads) at the end of a step, s


# ---------------------------------------------------------------------------------------
# The hand-written baseline: what a user would write without distshare.


def baseline_loop(cfg: RunConfig, world: World, steps: int) -> tuple[list[Stamp], dict[str, torch.Tensor]]:
    """The textbook DDP loop; returns the end-of-step timestamps and the final parameters."""
    dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.model.dtype]
    dataset, info = build_dataset(cfg.data)
    table = TensorTable.from_dataset(dataset, info, dtype)
    model = DistributedDataParallel(build_model(cfg.model, info, seed=cfg.seed))
    o = cfg.optim
    if o.name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    plan = cfg.plan.resolve(world.world_size)
    g, k, b = plan.global_batch, plan.accum_steps, plan.micro_batch
    n = len(table)
    per_epoch = n // g  # drop_last
    order = np.empty(0, dtype=np.int64)
    stamps: list[Stamp] = []
    for step in range(steps):
        epoch, pos = divmod(step, per_epoch)
        if pos == 0:
            # One fixed permutation per epoch. The same generator as distshare's plan, so the two
            # sides see the same samples and their final parameters can be compared.
            order = np.random.default_rng([cfg.plan.seed, epoch]).permutation(n)
        start = pos * g + world.rank * k * b  # this rank's contiguous share of the global batch
        for m in range(k):
            idx = torch.from_numpy(order[start + m * b : start + (m + 1) * b])
            inputs = {name: t[idx] for name, t in table.inputs.items()}
            labels = table.labels[idx]
            last = m == k - 1
            with model.no_sync() if not last else contextlib.nullcontext():
                logits = model(**inputs)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="mean")
                (loss / k).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append((time.perf_counter(), time.process_time()))
    state = {name: p.detach().clone() for name, p in model.module.named_parameters()}
    return stamps, state


# ---------------------------------------------------------------------------------------
# distshare's side: the very function `distshare train` runs on every rank.


def distshare_loop(
    cfg: RunConfig, world: World, check_every: int, progress: bool, out_dir: Path | None
) -> tuple[list[Stamp], float, dict[str, torch.Tensor], bool]:
    """`distshare.training.train`; returns step timestamps, the end of train(), parameters, in-sync."""
    stamps: list[Stamp] = []
    params: dict[str, torch.Tensor] = {}

    def on_step(run: Any, step: int) -> None:
        stamps.append((time.perf_counter(), time.process_time()))
        if step == cfg.steps - 1:
            params.update({name: p.detach().clone() for name, p in run.model.named_parameters()})

    run_cfg = dataclasses.replace(cfg, check_every=check_every)
    result = train(run_cfg, world, out_dir=out_dir, progress=progress, on_step=on_step)
    return stamps, time.perf_counter(), params, result.replicas_in_sync


# ---------------------------------------------------------------------------------------
# On every rank: all variants, interleaved.


def bench_rank(world: World, cfg: RunConfig, repeats: int, warmup: int, progress: bool, files: bool) -> dict:
    """Every variant `repeats` times, in a rotated order; per-step wall and CPU times in ms."""
    wall: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    tails: dict[str, list[float]] = {v: [] for v in VARIANTS[1:]}
    diffs: list[float] = []
    in_sync = True
    with tempfile.TemporaryDirectory(prefix="distshare-bench-") as tmp:
        for r in range(repeats):
            # Rotate the order (A B C D, B C D A, C D A B, ...) so no variant always runs first or
            # right after another one.
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            final: dict[str, dict[str, torch.Tensor]] = {}
            for variant in order:
                dist.barrier()
                if variant == "baseline":
                    stamps, final[variant] = baseline_loop(cfg, world, cfg.steps)
                else:
                    check_every = {"distshare_as_configured": cfg.check_every, "distshare_check_every_step": 1}.get(
                        variant, 0
                    )
                    out = Path(tmp, f"{variant}-{r}") if files else None
                    stamps, end, final[variant], ok = distshare_loop(cfg, world, check_every, progress, out)
                    in_sync = in_sync and ok
                    tails[variant].append((end - stamps[-1][0]) * 1e3)
                wall[variant].append(_gaps_ms(stamps[warmup:], 0))
                cpu[variant].append(_gaps_ms(stamps[warmup:], 1))
            # Same plan, same sample order, same init: both sides must end in the same place.
            base = final["baseline"]
            for variant in VARIANTS[1:]:
                diffs.append(max(float((base[n] - p).abs().max()) for n, p in final[variant].items()))
    return {
        "wall_ms": wall,
        "cpu_ms": cpu,
        "tail_ms": tails,
        "max_abs_param_diff": max(diffs),
        "replicas_in_sync": in_sync,
    }


def _gaps_ms(stamps: list[Stamp], clock: int) -> list[float]:
    """Time of each step: the gap between consecutive end-of-step stamps of one clock, in ms."""
    return [(b[clock] - a[clock]) * 1e3 for a, b in zip(stamps, stamps[1:], strict=False)]


# ---------------------------------------------------------------------------------------
# The caller: spawn the ranks, summarize, print.


def _stats(runs: list[list[float]], base_runs: list[list[float]]) -> dict[str, Any]:
    """Median over all timed steps, its spread, and the ratio to the baseline, paired by repeat."""
    pooled = [t for run in runs for t in run]
    medians = [statistics.median(run) for run in runs]
    # Repeat r of a variant ran right next to repeat r of the baseline: their ratio cancels
    # slow drift of the machine (other processes), so its median is the headline ratio.
    paired = [m / statistics.median(b) for m, b in zip(medians, base_runs, strict=True)]
    q1, _, q3 = statistics.quantiles(paired, n=4) if len(paired) > 1 else (paired[0], 0, paired[0])
    return {
        "median_ms": statistics.median(pooled),
        "p10_ms": float(np.percentile(pooled, 10)),
        "p90_ms": float(np.percentile(pooled, 90)),
        "repeat_medians_ms": [round(m, 4) for m in medians],
        "ratio": statistics.median(paired),
        "ratio_q1": q1,
        "ratio_q3": q3,
        "steps_timed": len(pooled),
    }


def summarize(rank0: dict, cfg: RunConfig, args: argparse.Namespace, load: tuple[float, float]) -> dict[str, Any]:
    plan = cfg.plan.resolve(args.nproc)
    wall = {name: _stats(runs, rank0["wall_ms"]["baseline"]) for name, runs in rank0["wall_ms"].items()}
    cpu = {name: _stats(runs, rank0["cpu_ms"]["baseline"]) for name, runs in rank0["cpu_ms"].items()}
    for name, ms in rank0["tail_ms"].items():
        wall[name]["after_loop_ms"] = statistics.median(ms)
    ratios = {name: v["ratio"] for name, v in wall.items() if name != "baseline"}
    return {
        "benchmark": "step_time",
        "command": "python benchmarks/bench_step.py " + " ".join(sys.argv[1:]),
        "model": args.model,
        "nproc": args.nproc,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "progress_bar": not args.no_progress,
        "metrics_file": not args.no_files,
        "plan": {"global_batch": plan.global_batch, "accum_steps": plan.accum_steps, "micro_batch": plan.micro_batch},
        "wall": wall,
        "cpu": cpu,
        "ratios": ratios,
        "cpu_ratios": {name: v["ratio"] for name, v in cpu.items() if name != "baseline"},
        "goal_ratio": GOAL,
        "meets_goal": {name: r <= GOAL for name, r in ratios.items()},
        "max_abs_param_diff_vs_baseline": rank0["max_abs_param_diff"],
        "replicas_in_sync": rank0["replicas_in_sync"],
        "machine": {
            "cpus": os.cpu_count(),
            "threads_per_rank": max(1, (os.cpu_count() or 1) // args.nproc),
            "load_average_before_after": [round(x, 2) for x in load],
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }


def table(result: dict[str, Any]) -> str:
    p, m = result["plan"], result["machine"]
    timed = result["steps"] - result["warmup"] - 1
    lines = [
        f"step time: {result['model']}, {result['nproc']} gloo ranks, G={p['global_batch']} "
        f"(k={p['accum_steps']} x b={p['micro_batch']} per rank); {timed} steps x {result['repeats']} repeats; "
        f"torch {m['torch']}, {m['cpus']} CPUs, load {m['load_average_before_after'][0]} -> "
        f"{m['load_average_before_after'][1]}",
        "",
        f"{'variant':<28} {'median ms':>9} {'p10':>7} {'p90':>7} {'ratio':>6} {'(q1-q3)':>13} "
        f"{'cpu ms':>7} {'cpu ratio':>9}  goal <= {result['goal_ratio']}",
    ]
    for name, w in result["wall"].items():
        c = result["cpu"][name]
        verdict = "" if name == "baseline" else ("ok" if w["ratio"] <= result["goal_ratio"] else "OVER")
        spread = f"({w['ratio_q1']:.2f}-{w['ratio_q3']:.2f})"
        lines.append(
            f"{name:<28} {w['median_ms']:>9.3f} {w['p10_ms']:>7.2f} {w['p90_ms']:>7.2f} {w['ratio']:>6.3f} "
            f"{spread:>13} {c['median_ms']:>7.3f} {c['ratio']:>9.3f}  {verdict}"
        )
    tails = {n: w["after_loop_ms"] for n, w in result["wall"].items() if "after_loop_ms" in w}
    lines += [
        "",
        "ratio = median over repeats of (variant / baseline, adjacent runs); cpu = rank 0's process CPU time",
        "after the loop (final replica check, not in the step time): "
        + ", ".join(f"{n} {ms:.2f} ms" for n, ms in tails.items()),
        f"max |param difference| baseline vs distshare at the end: {result['max_abs_param_diff_vs_baseline']:.2e}; "
        f"replicas in sync: {result['replicas_in_sync']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2, help="gloo ranks (default 2)")
    parser.add_argument("--steps", type=int, default=100, help="steps per run, warm-up included (default 100)")
    parser.add_argument("--warmup", type=int, default=10, help="first steps of a run not timed (default 10)")
    parser.add_argument("--repeats", type=int, default=20, help="runs of each variant, interleaved (default 20)")
    parser.add_argument("--model", choices=("transformer", "cnn"), default="transformer")
    parser.add_argument("--no-progress", action="store_true", help="distshare without its tqdm bar")
    parser.add_argument("--no-files", action="store_true", help="distshare without a run dir (no metrics.jsonl)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON object to FILE")
    args = parser.parse_args(argv)
    if args.nproc < 2:
        parser.error("--nproc must be at least 2 (the comparison is of data-parallel steps)")
    if args.warmup < 0 or args.steps < args.warmup + 3:
        parser.error("--steps must exceed --warmup (>= 0) by at least 3")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    try:
        cfg = load_config(CONFIGS / f"{args.model}.yaml", [f"steps={args.steps}", f"plan.world_size={args.nproc}"])
    except DistshareError as exc:  # e.g. a global batch that does not split over --nproc ranks
        parser.error(str(exc))
    load_before = os.getloadavg()[0]
    per_rank = run_distributed(
        bench_rank,
        args.nproc,
        cfg,
        args.repeats,
        args.warmup,
        not args.no_progress,
        not args.no_files,
        timeout_s=cfg.timeout_s,
        deadline_s=None,
    )
    result = summarize(per_rank[0], cfg, args, (load_before, os.getloadavg()[0]))
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
