"""What a replica check costs while replicas agree, and what the diagnosis costs once they don't.

    python benchmarks/bench_diagnosis_cost.py                 # 2 gloo ranks, the ~12.6M-parameter model
    python benchmarks/bench_diagnosis_cost.py --repeats 40 --json

On the trained state of bench_check_cost.py's model (AdamW transformer, d_model 512, 4 layers,
d_ff 2048: ~12.6M parameters, 3 x that in parameters and moments), inside one
`run_distributed` call, the modes are timed interleaved (one call of each per round, the order
rotated every round), and the total time of all rounds is reported per mode:

    state             compare_replicas(model, optimizer): parameters, buffers, optimizer state
    on_divergence     the same with grads="on_divergence" (what `distshare train` and
                      `distshare.watch` do): gradients digested only once the state differs
    grads             grads=True: the gradients digested at every check
    diverged          grads="on_divergence" with one bit of one element flipped on the last rank:
                      the per-tensor digests, the localization and the diagnosis

Ratios are against `state` in the same run. The claim measured: while replicas agree the
diagnosis adds nothing (on_divergence / state ~ 1, the 16-byte gather the only traffic).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from bench_check_cost import OVERRIDES  # noqa: E402 - the same 12.6M model

from distshare.config import load_config  # noqa: E402
from distshare.distributed.spawn import run_distributed  # noqa: E402
from distshare.distributed.world import World  # noqa: E402
from distshare.integrity.replicas import compare_replicas  # noqa: E402
from distshare.training import build_run, train_step  # noqa: E402

MODES = ("state", "on_divergence", "grads", "diverged")


def _measure(world: World, repeats: int, modes: tuple[str, ...] = MODES) -> dict[str, Any]:
    torch.set_num_threads(1)
    cfg = load_config(None, [*OVERRIDES, f"plan.world_size={world.world_size}", "steps=1"])
    run = build_run(cfg, world)
    train_step(run, 0)  # a trained state: Adam moments exist, .grad holds the step's gradients
    params = sum(p.numel() for p in run.model.parameters())
    weight = next(p for p in run.model.parameters() if p.dim() == 2)
    totals = dict.fromkeys(modes, 0.0)
    causes = set()

    def call(mode: str) -> None:
        flip = mode == "diverged" and world.rank == world.world_size - 1
        if flip:
            with torch.no_grad():
                weight.view(-1).view(torch.int32)[7] ^= 1 << 20
        grads: bool | str = {"state": False, "grads": True}.get(mode, "on_divergence")
        start = time.perf_counter()
        report = compare_replicas(run.wrapped, run.optimizer, grads=grads)
        totals[mode] += time.perf_counter() - start
        if flip:
            with torch.no_grad():
                weight.view(-1).view(torch.int32)[7] ^= 1 << 20
        if mode == "diverged":
            diagnosis = getattr(report, "diagnosis", None)  # None on a distshare without diagnoses
            causes.add(str(diagnosis.cause) if diagnosis else "no diagnosis")
        elif not report.in_sync:
            raise RuntimeError(f"{mode}: replicas should agree: {report.summary()}")

    for i in range(repeats):
        for j in range(len(modes)):
            call(modes[(i + j) % len(modes)])
    return {"parameters": params, "totals_s": totals, "diverged_cause": sorted(causes)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated, of: " + ", ".join(MODES) + " (default: all)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    modes = tuple(m for m in args.modes.split(",") if m)
    if not modes or any(m not in MODES for m in modes) or "state" not in modes:
        parser.error(f"--modes: some of {', '.join(MODES)}, 'state' among them (the ratios' base)")
    out = run_distributed(_measure, args.world_size, args.repeats, modes, timeout_s=300, deadline_s=None)[0]
    base = out["totals_s"]["state"]
    rows = {
        mode: {
            "total_s": round(total, 4),
            "per_check_ms": round(1000 * total / args.repeats, 3),
            "vs_state": round(total / base, 4),
        }
        for mode, total in out["totals_s"].items()
    }
    result = {
        "world_size": args.world_size,
        "repeats": args.repeats,
        "parameters": out["parameters"],
        "modes": rows,
        "diverged_cause": out["diverged_cause"],
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{out['parameters']:,} parameters, {args.world_size} ranks, {args.repeats} checks per mode (interleaved)")
    for mode, row in rows.items():
        print(f"  {mode:<14} {row['per_check_ms']:9.2f} ms per check   {row['vs_state']:.3f} x state")
    print(f"  diverged diagnosis: {', '.join(out['diverged_cause'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
