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
  does), at every step with the rolling check (`check_every=1, check_mode=rolling`: one slice of
  the state digested per step, the digests of `check_batch` steps compared by one gather in the
  background, judged at the next step; `distshare.integrity.rolling`), the same with one gather
  per step (`check_batch=1`: what the rolling check did before its digests were batched), or
  only at the last step (`check_every=0`).

Each rank stamps the start of the loop and the end of every step (for distshare through a
loop component, after the step's replica check; a loss all-reduce after a step falls into
the next one). A run's time per step is its loop time over the timed steps divided by their
number: from the end of the last `--warmup` step to the end of the last step. Setup (data,
model, DDP wrapper) is never counted; everything the loop does one step in ten (the replica
check at `check_every=10`, the windowed loss all-reduce) and the final replica check (inside
the last step) are. A median of per-step gaps would hide all of them; it is still reported,
as `median_gap_ratio`, to show how much. What `train` does after its last step (the last
window's loss all-reduce, closing the metrics file and the progress bar) is `after_loop_ms`.

What a check at every step costs is the every-step variants against `distshare_check_at_end`
(the same loop without the checks in between): `check_ratios`, paired the same way, with the
goal `CHECK_GOAL` (issue 19: <= 1.02).

The variants are interleaved inside the ranks, in a rotated order each repeat, so drift of
the machine hits all of them. The ratio is the median over repeats of (variant's time per
step / baseline's time per step) of adjacent runs, on rank 0's clock; the same is reported
for rank 0's CPU time, which other processes on a shared machine disturb less. Every
distshare run with files must leave a readable metrics.jsonl (one JSON row per step, each
with its loss): the benchmark checks it after the run, outside the timing. See
benchmarks/README.md for the measured numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
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
from distshare.training.loop import Component, Loop
from distshare.training.metrics import METRICS_FILE
from distshare.training.replica_check import ReplicaChecker

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "train"
VARIANTS = (
    "baseline",
    "distshare_as_configured",
    "distshare_check_every_step",
    "distshare_rolling_every_step",
    "distshare_rolling_unbatched_every_step",
    "distshare_check_at_end",
)
# Each distshare variant's replica checks: (check_every, check_mode, check_batch); None: as configured.
CHECKS: dict[str, tuple[int | None, str, int | None]] = {
    "distshare_as_configured": (None, "full", None),
    "distshare_check_every_step": (1, "full", None),
    "distshare_rolling_every_step": (1, "rolling", None),  # check_batch as configured (default 16)
    "distshare_rolling_unbatched_every_step": (1, "rolling", 1),  # one gather per step
    "distshare_check_at_end": (0, "full", None),
}
GOAL = 1.05  # distshare's step may cost at most 5% more than the hand-written loop
CHECK_GOAL = 1.02  # a check at every step may cost at most 2% over the same loop checked at the end
EVERY_STEP = ("distshare_check_every_step", "distshare_rolling_every_step", "distshare_rolling_unbatched_every_step")
Stamp = tuple[float, float]  # (wall clock, this process's CPU time, all threads), s
# A run's stamps: [start of the loop, end of step 0, end of step 1, ...]; steps + 1 of them.


# ---------------------------------------------------------------------------------------
# The hand-written baseline: what a user would write without distshare.


def baseline_loop(cfg: RunConfig, world: World, steps: int) -> tuple[list[Stamp], dict[str, torch.Tensor]]:
    """The textbook DDP loop; returns its stamps (start, end of every step) and the final parameters."""
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
    stamps: list[Stamp] = [(time.perf_counter(), time.process_time())]
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


class Stamps(Component):
    """Stamps the start of the loop and the end of every step (after every other component's
    work for it: the replica check, the metrics row); keeps the last step's parameters."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.stamps: list[Stamp] = []
        self.params: dict[str, torch.Tensor] = {}

    def begin(self, loop: Loop) -> None:
        self.stamps.append((time.perf_counter(), time.process_time()))

    def step_end(self, loop: Loop, step: int) -> None:
        self.stamps.append((time.perf_counter(), time.process_time()))
        if step == self.steps - 1:
            self.params = {name: p.detach().clone() for name, p in loop.run.model.named_parameters()}


class CheckTimer:
    """The time the replica checker spends after each step (wall, and this thread's CPU): the
    check's own cost, measured inside the loop, less disturbed by other processes than a
    difference of two loop times. (A gather running in the background is not in it; the
    process CPU time of the loop is.)"""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0
        self.steady_cpu: list[float] = []  # per step but the first and the last (their checks are full)
        self._inner = ReplicaChecker.after_step

    def __enter__(self) -> CheckTimer:
        inner, timer = self._inner, self

        def after_step(checker: ReplicaChecker, loop: Loop, step: int, row: dict[str, Any]) -> None:
            w, c = time.perf_counter(), time.thread_time()
            inner(checker, loop, step, row)
            timer.wall += time.perf_counter() - w
            cpu = time.thread_time() - c
            timer.cpu += cpu
            if 0 < step < loop.steps - 1:
                timer.steady_cpu.append(cpu)

        ReplicaChecker.after_step = after_step  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        ReplicaChecker.after_step = self._inner  # type: ignore[method-assign]


def distshare_loop(
    cfg: RunConfig, world: World, variant: str, progress: bool, out_dir: Path | None
) -> tuple[list[Stamp], float, dict[str, torch.Tensor], bool]:
    """`distshare.training.train` with `variant`'s checks (`CHECKS`); returns its stamps, the end
    of train(), the parameters, in-sync."""
    clock = Stamps(cfg.steps)
    every, mode, batch = CHECKS[variant]
    run_cfg = dataclasses.replace(
        cfg,
        check_every=cfg.check_every if every is None else every,
        check_mode=mode,
        check_batch=cfg.check_batch if batch is None else batch,
    )
    result = train(run_cfg, world, out_dir=out_dir, progress=progress, components=[clock])
    return clock.stamps, time.perf_counter(), clock.params, result.replicas_in_sync


def metrics_readable(path: Path, steps: int) -> bool:
    """metrics.jsonl holds one JSON row per step, in order, each with its global loss."""
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
    except (OSError, ValueError):
        return False
    return [r.get("step") for r in rows] == list(range(steps)) and all(isinstance(r.get("loss"), float) for r in rows)


# ---------------------------------------------------------------------------------------
# On every rank: all variants, interleaved.


def bench_rank(world: World, cfg: RunConfig, repeats: int, warmup: int, progress: bool, files: bool) -> dict:
    """Every variant `repeats` times, in a rotated order; per run its time per step, in ms."""
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    diffs: list[float] = []
    in_sync = files_ok = True
    with tempfile.TemporaryDirectory(prefix="distshare-bench-") as tmp:
        for r in range(repeats):
            # Rotate the order (A B C D, B C D A, C D A B, ...) so no variant always runs first or
            # right after another one.
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            final: dict[str, dict[str, torch.Tensor]] = {}
            for variant in order:
                dist.barrier()
                tail = math.nan
                timer = CheckTimer()  # entered only around distshare's loop: zero for the baseline
                if variant == "baseline":
                    stamps, final[variant] = baseline_loop(cfg, world, cfg.steps)
                else:
                    out = Path(tmp, f"{variant}-{r}") if files else None
                    with timer:
                        stamps, end, final[variant], ok = distshare_loop(cfg, world, variant, progress, out)
                    in_sync = in_sync and ok
                    tail = (end - stamps[-1][0]) * 1e3
                    if out is not None and world.is_main:  # outside the timing
                        files_ok = files_ok and metrics_readable(out / METRICS_FILE, cfg.steps)
                runs[variant].append(
                    {
                        "wall_ms": _per_step_ms(stamps, warmup, 0),
                        "cpu_ms": _per_step_ms(stamps, warmup, 1),
                        "wall_gap_ms": _median_gap_ms(stamps, warmup, 0),
                        "cpu_gap_ms": _median_gap_ms(stamps, warmup, 1),
                        "after_loop_ms": tail,
                        # the checker's own time per step, all steps (0 for the baseline)
                        "check_wall_ms": timer.wall * 1e3 / cfg.steps if variant != "baseline" else 0.0,
                        "check_cpu_ms": timer.cpu * 1e3 / cfg.steps if variant != "baseline" else 0.0,
                        # between the first and the last step: the mean (a gather every K steps
                        # included) and the median (a step without one) of the checker's CPU time
                        "check_steady_cpu_ms": statistics.fmean(timer.steady_cpu or [0.0]) * 1e3,
                        "check_steady_median_cpu_ms": statistics.median(timer.steady_cpu or [0.0]) * 1e3,
                    }
                )
            # Same plan, same sample order, same init: both sides must end in the same place.
            base = final["baseline"]
            for variant in VARIANTS[1:]:
                diffs.append(max(float((base[n] - p).abs().max()) for n, p in final[variant].items()))
    return {
        "runs": runs,
        "max_abs_param_diff": max(diffs),
        "replicas_in_sync": in_sync,
        "metrics_files_readable": files_ok if files else None,
    }


def _per_step_ms(stamps: list[Stamp], warmup: int, clock: int) -> float:
    """Total time of the timed steps over their number, in ms: periodic work included.

    `stamps[warmup]` is the end of the last untimed step (the loop's start when warmup = 0).
    """
    return (stamps[-1][clock] - stamps[warmup][clock]) * 1e3 / (len(stamps) - 1 - warmup)


def _median_gap_ms(stamps: list[Stamp], warmup: int, clock: int) -> float:
    """The old statistic, for comparison: the median gap between end-of-step stamps after the
    warm-up. Work done one step in ten falls in one gap of ten and vanishes from the median."""
    ends = stamps[warmup + 1 :]
    return statistics.median((b[clock] - a[clock]) * 1e3 for a, b in zip(ends, ends[1:], strict=False))


# ---------------------------------------------------------------------------------------
# The caller: spawn the ranks, summarize, print.


def _sig(x: float, digits: int = 4) -> float:
    """A number rounded to `digits` significant digits: what the JSON file shows."""
    return float(f"{x:.{digits}g}")


def _ratio_stats(values: list[float], base: list[float]) -> dict[str, float]:
    """Median over repeats of variant / baseline of the same repeat, and its quartiles."""
    # Repeat r of a variant ran right next to repeat r of the baseline: their ratio cancels
    # slow drift of the machine (other processes), so its median is the headline ratio.
    paired = [v / b for v, b in zip(values, base, strict=True)]
    q1, _, q3 = statistics.quantiles(paired, n=4) if len(paired) > 1 else (paired[0], 0, paired[0])
    return {"ratio": _sig(statistics.median(paired)), "ratio_q1": _sig(q1), "ratio_q3": _sig(q3)}


def _stats(runs: list[dict[str, float]], base_runs: list[dict[str, float]], clock: str) -> dict[str, Any]:
    """Time per step of one variant on one clock ("wall" or "cpu"): its median over repeats, the
    per-repeat values, the paired ratio to the baseline, and the old median-gap ratio beside it."""
    per_step = [run[f"{clock}_ms"] for run in runs]
    base = [run[f"{clock}_ms"] for run in base_runs]
    gaps = [run[f"{clock}_gap_ms"] for run in runs]
    base_gaps = [run[f"{clock}_gap_ms"] for run in base_runs]
    return {
        "ms_per_step": _sig(statistics.median(per_step)),
        "min_ms_per_step": _sig(min(per_step)),
        "max_ms_per_step": _sig(max(per_step)),
        "repeat_ms_per_step": [_sig(v) for v in per_step],
        **_ratio_stats(per_step, base),
        "median_gap_ms": _sig(statistics.median(gaps)),
        "median_gap_ratio": _ratio_stats(gaps, base_gaps)["ratio"],
    }


def summarize(rank0: dict, cfg: RunConfig, args: argparse.Namespace, load: tuple[float, float]) -> dict[str, Any]:
    plan = cfg.plan.resolve(args.nproc)
    runs, base = rank0["runs"], rank0["runs"]["baseline"]
    wall = {name: _stats(r, base, "wall") for name, r in runs.items()}
    cpu = {name: _stats(r, base, "cpu") for name, r in runs.items()}
    for name, r in runs.items():
        if name != "baseline":
            wall[name]["after_loop_ms"] = _sig(statistics.median(run["after_loop_ms"] for run in r))
    ratios = {name: v["ratio"] for name, v in wall.items() if name != "baseline"}
    at_end = runs["distshare_check_at_end"]
    check = {name: _stats(runs[name], at_end, "wall") for name in EVERY_STEP}
    check_cpu = {name: _stats(runs[name], at_end, "cpu") for name in EVERY_STEP}
    return {
        "benchmark": "step_time",
        "command": "python benchmarks/bench_step.py " + " ".join(sys.argv[1:]),
        "statistic": "time per step = loop time of the timed steps / their number; ratio = median over repeats "
        "of variant / baseline (adjacent runs); median_gap_ratio = the same with the median per-step gap, "
        "which hides work done one step in ten",
        "model": args.model,
        "nproc": args.nproc,
        "steps": args.steps,
        "warmup": args.warmup,
        "steps_timed_per_run": args.steps - args.warmup,
        "repeats": args.repeats,
        "progress_bar": not args.no_progress,
        "metrics_file": not args.no_files,
        "metrics_files_readable": rank0["metrics_files_readable"],
        "plan": {"global_batch": plan.global_batch, "accum_steps": plan.accum_steps, "micro_batch": plan.micro_batch},
        "check_every_as_configured": cfg.check_every,
        "check_batch_as_configured": cfg.check_batch,
        "ratios": ratios,
        "cpu_ratios": {name: v["ratio"] for name, v in cpu.items() if name != "baseline"},
        "median_gap_ratios": {name: v["median_gap_ratio"] for name, v in wall.items() if name != "baseline"},
        "goal_ratio": GOAL,
        "meets_goal": {name: r <= GOAL for name, r in ratios.items()},
        # what the checks at every step cost: against the same loop checked only at the end
        "check_ratios": {name: v["ratio"] for name, v in check.items()},
        "check_ratio_quartiles": {name: [v["ratio_q1"], v["ratio_q3"]] for name, v in check.items()},
        "check_cpu_ratios": {name: v["ratio"] for name, v in check_cpu.items()},
        "check_goal_ratio": CHECK_GOAL,
        # the checker's own time per step (inside the loop), and as a fraction of the step
        "check_ms_per_step": {
            name: {
                "wall": _sig(statistics.median(run["check_wall_ms"] for run in runs[name])),
                "cpu": _sig(statistics.median(run["check_cpu_ms"] for run in runs[name])),
                "steady_cpu_mean": _sig(statistics.median(run["check_steady_cpu_ms"] for run in runs[name])),
                "steady_cpu_median": _sig(statistics.median(run["check_steady_median_cpu_ms"] for run in runs[name])),
                "fraction_of_step": _sig(
                    statistics.median(run["check_wall_ms"] / run["wall_ms"] for run in runs[name])
                ),
            }
            for name in runs
            if name != "baseline"
        },
        "meets_check_goal": {name: v["ratio"] <= CHECK_GOAL for name, v in check.items()},
        "wall": wall,
        "cpu": cpu,
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
    lines = [
        f"step time: {result['model']}, {result['nproc']} gloo ranks, G={p['global_batch']} "
        f"(k={p['accum_steps']} x b={p['micro_batch']} per rank); {result['steps_timed_per_run']} timed steps x "
        f"{result['repeats']} repeats; torch {m['torch']}, {m['cpus']} CPUs, load "
        f"{m['load_average_before_after'][0]} -> {m['load_average_before_after'][1]}",
        "",
        f"{'variant':<38} {'ms/step':>8} {'min-max':>13} {'ratio':>6} {'(q1-q3)':>13} "
        f"{'cpu ms':>7} {'cpu ratio':>9}  goal <= {result['goal_ratio']}",
    ]
    for name, w in result["wall"].items():
        c = result["cpu"][name]
        verdict = "" if name == "baseline" else ("ok" if w["ratio"] <= result["goal_ratio"] else "OVER")
        spread = f"({w['ratio_q1']:.2f}-{w['ratio_q3']:.2f})"
        span = f"{w['min_ms_per_step']:.2f}-{w['max_ms_per_step']:.2f}"
        lines.append(
            f"{name:<38} {w['ms_per_step']:>8.3f} {span:>13} {w['ratio']:>6.3f} {spread:>13} "
            f"{c['ms_per_step']:>7.3f} {c['ratio']:>9.3f}  {verdict}"
        )
    goal = result["check_goal_ratio"]
    lines += ["", f"what checking at every step costs (against distshare_check_at_end; goal <= {goal}):"]
    for name, r in result["check_ratios"].items():
        q1, q3 = result["check_ratio_quartiles"][name]
        verdict = "ok" if result["meets_check_goal"][name] else "OVER"
        own = result["check_ms_per_step"][name]
        lines.append(
            f"  {name:<38} {r:>6.3f} ({q1:.3f}-{q3:.3f})  cpu {result['check_cpu_ratios'][name]:.3f}  {verdict}; "
            f"the checker itself {own['wall']:.3f} ms/step ({100 * own['fraction_of_step']:.2f}% of the step), "
            f"{own['cpu']:.3f} ms CPU; between first and last step {own['steady_cpu_mean']:.3f} ms CPU "
            f"(median {own['steady_cpu_median']:.3f})"
        )
    tails = {n: w["after_loop_ms"] for n, w in result["wall"].items() if "after_loop_ms" in w}
    gap = result["median_gap_ratios"]
    files = result["metrics_files_readable"]
    lines += [
        "",
        "ms/step = loop time of the timed steps / their number (replica checks, the windowed loss all-reduce and "
        "the final check included);",
        "ratio = median over repeats of (variant / baseline, adjacent runs); cpu = rank 0's process CPU time",
        "median-gap ratio (the old statistic, blind to work done one step in ten): "
        + ", ".join(f"{n} {r:.3f}" for n, r in gap.items()),
        "after the last step (last loss all-reduce, files and progress bar closed; not in ms/step): "
        + ", ".join(f"{n} {ms:.2f} ms" for n, ms in tails.items()),
        f"max |param difference| baseline vs distshare at the end: {result['max_abs_param_diff_vs_baseline']:.2e}; "
        f"replicas in sync: {result['replicas_in_sync']}"
        + ("" if files is None else f"; metrics.jsonl readable (one row per step): {files}"),
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
    if args.warmup < 0 or args.steps < args.warmup + 2:
        parser.error("--steps must exceed --warmup (>= 0) by at least 2")
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
