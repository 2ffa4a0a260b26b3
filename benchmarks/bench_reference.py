"""What the rounding bound's per-sample magnitudes cost: one batched pass against one sample at a time.

    python benchmarks/bench_reference.py                  # verify's default run, then the ~12.6M model
    python benchmarks/bench_reference.py --steps 10 --json

`distshare verify` and the grid measure, at every step of the reference (one process, the whole
global batch), sum over samples of |that sample's gradient| (`distshare.equivalence.reference`).
Both ways are timed here on the same trajectory in one process, interleaved (the order
alternates every step), and reported as totals over all steps:

    batched        per-sample gradients in fixed chunks of 32 (`SampleMagnitudes`, the step's
                   per-sample path, as exact mode takes it)
    one at a time  one forward and backward per sample (what a model that mixes samples takes)

with the largest difference between the two, relative to each tensor's largest element (the
sums are the same quantity; only rounding may differ). Models: verify's default (tiny
transformer, G = 48) and bench_check_cost.py's ~12.6M-parameter one (G = 32).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from bench_check_cost import OVERRIDES  # noqa: E402 - the same 12.6M model

from distshare.commands.verify import DEFAULTS  # noqa: E402
from distshare.config import load_config  # noqa: E402
from distshare.distributed.world import World  # noqa: E402
from distshare.equivalence.reference import _abs_sum  # noqa: E402
from distshare.equivalence.tasks import ConfigTask  # noqa: E402

MODELS = {"verify default": DEFAULTS, "12.6M": OVERRIDES}


def measure(overrides: list[str], steps: int) -> dict[str, Any]:
    task = ConfigTask(load_config(None, [*overrides, f"steps={steps}"]))
    torch.manual_seed(task.seed)
    batched = task.build(World(), 1, 1, None)
    one_at_a_time = dataclasses.replace(batched, sample_batch=None)  # same model, data and steps
    copy = batched.fresh_model()
    totals = {"batched": 0.0, "one at a time": 0.0}
    worst = 0.0
    for step in range(steps):
        rng = torch.get_rng_state()
        sums: dict[str, Any] = {}
        order = list(totals) if step % 2 == 0 else list(reversed(totals))
        for mode in order:
            trainee = batched if mode == "batched" else one_at_a_time
            start = time.perf_counter()
            sums[mode], note = _abs_sum(trainee, copy, step, {}, rng)
            totals[mode] += time.perf_counter() - start
            if note:
                raise RuntimeError(f"{mode}: fell back to |gradient|: {note}")
        for name, expected in sums["one at a time"].items():
            scale = float(expected.abs().max())
            if scale > 0:
                worst = max(worst, float((sums["batched"][name] - expected).abs().max()) / scale)
        batched.step(step)  # on along the reference's own trajectory
    return {
        "parameters": sum(p.numel() for p in copy.parameters()),
        "global_batch": task.global_batch,
        "steps": steps,
        "totals_s": {mode: round(total, 3) for mode, total in totals.items()},
        "one_at_a_time_over_batched": round(totals["one at a time"] / totals["batched"], 2),
        "worst_relative_difference": worst,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, of: " + ", ".join(MODELS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    if not names or any(m not in MODELS for m in names):
        parser.error(f"--models: some of {', '.join(MODELS)}")
    if args.steps < 1:
        parser.error("--steps: at least 1")
    torch.set_num_threads(1)
    results = {}
    for name in names:
        results[name] = row = measure(MODELS[name], args.steps)
        if not args.json:
            print(
                f"{name}: {row['parameters']:,} parameters, G={row['global_batch']}, {row['steps']} steps: "
                f"batched {row['totals_s']['batched']:.2f} s, one at a time {row['totals_s']['one at a time']:.2f} s "
                f"({row['one_at_a_time_over_batched']:.2f} x); largest difference "
                f"{row['worst_relative_difference']:.1e} of a tensor's largest element",
                flush=True,
            )
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
