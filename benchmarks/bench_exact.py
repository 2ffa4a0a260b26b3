"""Exact mode against normal mode: step time side by side, and distance from a float64 reference.

    python benchmarks/bench_exact.py                       # both demo models, 2 ranks, about 1 minute
    python benchmarks/bench_exact.py --nproc 1 --json --out bench-exact.json

Time. Both modes run on the same spawned gloo ranks (one `run_distributed` call: one process
group, one thread setting), on the shipped configs (`configs/train/<model>.yaml`, G = 32,
k = 2), interleaved in a rotated order every repeat so that drift of the machine hits both.
A step's time is the gap between consecutive `on_step` timestamps on rank 0 (setup is never
counted; the first `--warmup` steps are dropped). The ratio is the median over repeats of
median(exact step) / median(normal step); normal mode is `sync=ddp`, the shipped default.

Precision. One process, float32, at the same parameters: the step-0 gradient of normal mode
(one forward and backward over the global batch) and of exact mode, each against the
float64 gradient; then the parameters after `--precision-steps` steps of each against a
float64 training of the same global batches.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from distshare.config import RunConfig, load_config
from distshare.distributed.spawn import run_distributed
from distshare.distributed.world import World
from distshare.numerics.diff import diff
from distshare.training import build_run, train, train_step

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "train"
MODES = ("ddp", "exact")
GOAL = 3.0  # the goal: exact mode's step at most 3x normal mode's


def _config(model: str, *overrides: str) -> RunConfig:
    return load_config(CONFIGS / f"{model}.yaml", list(overrides))


def _time_rank(world: World, cfg: RunConfig, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Median step time of each mode per repeat, in a rotated order; rank 0's clock."""
    medians: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(repeats):
        for mode in MODES[r % 2 :] + MODES[: r % 2]:
            stamps: list[float] = []
            run_cfg = dataclasses.replace(
                cfg, sync=mode, plan=dataclasses.replace(cfg.plan, world_size=world.world_size)
            )
            train(
                run_cfg,
                world,
                None,
                progress=False,
                on_step=lambda run, step, stamps=stamps: stamps.append(time.perf_counter()),
            )
            gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][warmup:]
            medians[mode].append(statistics.median(gaps))
    return medians


def timing(model: str, nproc: int, steps: int, repeats: int, warmup: int) -> dict[str, Any]:
    cfg = _config(model, f"steps={steps}")
    if nproc == 1:
        per_rank = [_time_rank(World(), cfg, repeats, warmup)]
    else:
        per_rank = run_distributed(_time_rank, nproc, cfg, repeats, warmup, timeout_s=600, deadline_s=None)
    med = per_rank[0]
    ratios = [e / n for e, n in zip(med["exact"], med["ddp"], strict=True)]
    plan = cfg.plan.resolve(nproc)
    return {
        "model": model,
        "world_size": nproc,
        "plan": dataclasses.asdict(plan),
        "parameters": None,
        "normal_step_ms": 1e3 * statistics.median(med["ddp"]),
        "exact_step_ms": 1e3 * statistics.median(med["exact"]),
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "goal": GOAL,
    }


def precision(model: str, steps: int) -> dict[str, Any]:
    """float32 normal and exact against float64, at the same parameters and after training."""
    base = _config(model, f"steps={steps}", "check_every=0", "plan.accum_steps=1", "plan.micro_batch=null")
    runs = {}
    for name, dtype, sync in (
        ("float64", "float64", "ddp"),
        ("normal", "float32", "ddp"),
        ("exact", "float32", "exact"),
    ):
        cfg = dataclasses.replace(base, sync=sync, model=dataclasses.replace(base.model, dtype=dtype))
        runs[name] = cfg
    # Step-0 gradients at the same (float32-representable) parameters.
    built = {n: build_run(c, World()) for n, c in runs.items()}
    ref32 = {k: v.to(torch.float64) for k, v in built["normal"].model.state_dict().items()}
    built["float64"].model.load_state_dict(ref32)
    grads = {}
    for name, run in built.items():
        train_step(run, 0)
        grads[name] = {n: p.grad.detach().to(torch.float64).clone() for n, p in run.model.named_parameters()}
    out: dict[str, Any] = {
        "model": model,
        "steps": steps,
        "parameters": sum(g.numel() for g in grads["float64"].values()),
    }
    for name in ("normal", "exact"):
        out[f"grad_{name}_vs_float64"] = _brief(diff(grads[name], grads["float64"]))
    finals = {}
    for name, cfg in runs.items():
        res = train(cfg, World(), None, progress=False, keep_state=True)
        finals[name] = {k: v.to(torch.float64) for k, v in (res.state or {}).items()}
    for name in ("normal", "exact"):
        out[f"params_{name}_vs_float64"] = _brief(diff(finals[name], finals["float64"]))
    return out


def _brief(d: Any) -> dict[str, float]:
    return {"max_abs": d.max_abs_diff, "norm_rel": d.norm_rel_diff}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="transformer,cnn")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--precision-steps", type=int, default=30)
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", help="write the results as JSON to this file")
    args = p.parse_args(argv)
    if args.nproc < 1 or args.steps <= args.warmup + 2 or args.repeats < 1:
        print("bench_exact: need --nproc >= 1, --steps > --warmup + 2, --repeats >= 1", file=sys.stderr)
        return 2
    models = [m for m in args.models.split(",") if m]
    results: dict[str, Any] = {"timing": [], "precision": [], "torch": torch.__version__}
    for m in models:
        t = timing(m, args.nproc, args.steps, args.repeats, args.warmup)
        results["timing"].append(t)
        if not args.json:
            print(
                f"{m:12s} W={t['world_size']}  normal {t['normal_step_ms']:7.2f} ms  exact {t['exact_step_ms']:7.2f} ms"
                f"  ratio {t['ratio']:.2f} (goal <= {GOAL:g}; per repeat {', '.join(f'{r:.2f}' for r in t['ratios'])})"
            )
    for m in models:
        pr = precision(m, args.precision_steps)
        results["precision"].append(pr)
        if not args.json:
            for what in ("grad", "params"):
                row = "  ".join(
                    f"{name} {pr[f'{what}_{name}_vs_float64']['norm_rel']:.2e} "
                    f"(max abs {pr[f'{what}_{name}_vs_float64']['max_abs']:.1e})"
                    for name in ("normal", "exact")
                )
                label = "step-0 gradient" if what == "grad" else f"params after {pr['steps']} steps"
                print(f"{m:12s} float32 vs float64, {label:22s} norm rel: {row}")
    if args.json:
        print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
