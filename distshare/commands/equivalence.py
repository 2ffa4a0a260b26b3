"""`distshare equivalence`: does every split of a global batch train like one big batch?

    distshare equivalence                                     # W in 1,2,4 x k in 1,2,4,8, float64 and float32
    distshare equivalence --world-sizes 1,2 --accum-steps 1,2,4 --dtype float64 --steps 3
    distshare equivalence --pitfalls                          # and the 8 ways to get it wrong
    distshare equivalence --dtype bf16                        # float32 weights, bfloat16 autocast
    distshare equivalence --json                              # {"ok": ..., "partitions": [...], ...}
    distshare equivalence --parallel fsdp --world-sizes 1,2 --accum-steps 1,2 --dtype float32 --steps 3
    distshare equivalence --parallel hsdp --world-sizes 4 --accum-steps 1,2  # mesh 2 x 2 (hsdp_replicas=2)

Every partition W x k x b of the same global batch G trains the same model (same init, same
global batches) for N steps and is compared after every step with one process on the whole
batch: bitwise, max abs / rel / ULP, normwise, and against a predicted rounding bound. The
default task (per-token roles on sentences of 3 to 5 words) is the one where a wrong
normalization shows. Writes heatmap.png, loss.png, report.md and result.json; exit code 1
if a partition (or, with --pitfalls, the detection of a pitfall) fails, 2 for bad input.

`--parallel fsdp | hsdp` trains every W > 1 partition sharded (FSDP2 `fully_shard`; hsdp on a
mesh hsdp_replicas x W / hsdp_replicas) and compares it with the same one process: the whole
gradient and parameters are gathered every step (`DTensor.full_tensor()`) to be compared.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from distshare.commands.common import (
    add_command,
    add_config_arguments,
    finish,
    positive_float,
    positive_int,
    warn_oversubscribed,
)
from distshare.config import PARALLEL, SYNC_MODES, hsdp_mesh, load_config, nearest_global_batch
from distshare.equivalence import AUTOCAST, ConfigTask, check_partitions, run_grid
from distshare.equivalence.report import pitfall_rows, plot_heatmap, plot_loss_curves, render, table_rows
from distshare.errors import UsageError
from distshare.report import run_dir

# The embedded default: G = 32 so that W in 1,2,4 x k in 1,2,4,8 all divide it (b down to 1);
# per-token labels on variable-length sentences, so token normalization matters.
DEFAULTS = [
    "plan.world_size=1",
    "plan.global_batch=32",
    "plan.accum_steps=1",
    "plan.micro_batch=null",
    "data.num_samples=256",
    "data.task=roles",
    "data.variable_length=true",
    "steps=5",
]


DTYPE_CHOICES = {
    "both": ["float64", "float32"],
    "float64": ["float64"],
    "float32": ["float32"],
    "bf16": [AUTOCAST],
    "all": ["float64", "float32", AUTOCAST],
}


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return sorted(set(values))


def equivalence_command_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = add_command(
        subparsers,
        "equivalence",
        "gradient accumulation and W ranks vs one big batch: the partition grid, the pitfalls",
        __doc__,
        equivalence_command,
    )
    add_config_arguments(parser)
    parser.add_argument("--world-sizes", type=int_list, default=[1, 2, 4], metavar="W,..", help="default 1,2,4")
    parser.add_argument("--accum-steps", type=int_list, default=[1, 2, 4, 8], metavar="K,..", help="default 1,2,4,8")
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPE_CHOICES),
        default="both",
        help="both = float64 and float32 (default); bf16 = float32 weights, bfloat16 autocast; all = the three",
    )
    parser.add_argument("--steps", type=positive_int, help="optimizer steps per partition (default 5)")
    parser.add_argument("--sync", choices=SYNC_MODES, help="gradient sync mode of W > 1 (default: the config's)")
    parser.add_argument(
        "--parallel",
        choices=PARALLEL,
        help="layout of the W > 1 partitions: ddp (replicas) | fsdp | hsdp (--set hsdp_replicas=R, default 2) "
        "(default: the config's)",
    )
    parser.add_argument("--seed", type=int, help="parameter init seed")
    parser.add_argument("--timeout", type=positive_float, metavar="SECONDS", help="bound on every collective")
    parser.add_argument("--pitfalls", action="store_true", help="also run the 8 pitfalls, each beside its fix")
    parser.add_argument("--out", metavar="DIR", help="run directory (default runs/equivalence-<time>)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def equivalence_command(args: argparse.Namespace) -> int:
    overrides = list(DEFAULTS) + list(args.overrides)
    for flag, key in (
        ("steps", "steps"),
        ("sync", "sync"),
        ("parallel", "parallel"),
        ("seed", "seed"),
        ("timeout", "timeout_s"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(args.config, overrides)
    if cfg.device != "cpu":
        raise UsageError("distshare equivalence runs its ranks on the CPU (spawned gloo ranks); set device=cpu")
    task = ConfigTask(cfg)
    _check_grid(task.global_batch, args.world_sizes, args.accum_steps)
    check_partitions(task.global_batch, args.world_sizes, args.accum_steps)  # before anything starts
    meshes = {w: hsdp_mesh(cfg, w) for w in args.world_sizes if w > 1}  # refuses a world an hsdp mesh cannot fill
    dtypes = DTYPE_CHOICES[args.dtype]
    out = run_dir(args.out, "equivalence")  # may refuse --out: a warning before it would make two lines
    warn_oversubscribed(max(args.world_sizes), "--world-sizes")
    progress = not args.no_progress
    grid = run_grid(task, args.world_sizes, args.accum_steps, dtypes, cfg.steps, progress, cfg.timeout_s)
    # `ok` and `partitions` at the top level: the contract of --json.
    result: dict[str, Any] = {
        **grid.to_dict(),
        "command": "equivalence",
        "sync": cfg.sync,
        "parallel": cfg.parallel,
        # W -> [replicate, shard] sizes of each sharded partition's device mesh
        "meshes": {str(w): list(m) for w, m in meshes.items()} if cfg.parallel != "ddp" else {},
    }
    table = table_rows(result["partitions"])
    ok = grid.ok
    if cfg.sync == "exact":  # exact mode promises bits: a partition merely within rounding fails it
        ok = ok and all(p.bitwise_equal and p.grad_bitwise_equal for p in grid.partitions)
    if args.pitfalls:
        from distshare.equivalence.pitfalls import run_pitfalls

        pitfalls = [p.to_dict() for p in run_pitfalls(progress, cfg.timeout_s)]
        result["pitfalls"] = pitfalls
        table += pitfall_rows(pitfalls)
        ok = ok and all(p["detected"] for p in pitfalls)
    result["ok"] = ok
    parts = result["partitions"]
    plot_heatmap(out / "heatmap.png", parts, sync=cfg.sync)
    plot_loss_curves(out / "loss.png", parts, grid.reference_losses, sync=cfg.sync)
    n_ok = sum(p["within_rounding"] for p in parts)
    n_bit = sum(p["bitwise_equal"] for p in parts)
    verdict = (
        f"{n_bit}/{len(parts)} partitions bitwise equal to one big batch (sync=exact), "
        if cfg.sync == "exact"
        else f"{n_ok}/{len(parts)} partitions within rounding of one big batch ({n_bit} bitwise), "
    ) + f"G={grid.global_batch}, {grid.steps} steps"
    if cfg.parallel != "ddp":
        verdict += f", W > 1 under {cfg.parallel}" + (
            f" (meshes {', '.join(f'{r}x{sh}' for r, sh in meshes.values())})" if cfg.parallel == "hsdp" else ""
        )
    if args.pitfalls:
        caught = sum(p["detected"] for p in result["pitfalls"])
        verdict += f"; {caught}/{len(result['pitfalls'])} pitfalls caught"
    return finish("equivalence", cfg, _strict_json(result), table, verdict, args.json, out, render)


def _check_grid(global_batch: int, world_sizes: list[int], accum_steps: list[int]) -> None:
    """Refuse a G that some W x k of the grid does not divide, naming the G that every one
    divides (a multiple of their lcm: W in 1,2,3,4 x k in 1,2,4,8 needs 96, not 32)."""
    splits = [(w, k) for w in world_sizes for k in accum_steps]
    bad = next(((w, k) for w, k in splits if global_batch % (w * k)), None)
    if bad is None:
        return
    w, k = bad
    fix = nearest_global_batch(global_batch, [w * k for w, k in splits])
    step = math.lcm(*(w * k for w, k in splits))
    raise UsageError(
        f"global batch {global_batch} is not divisible by W x k = {w} x {k} = {w * k}; every partition of "
        f"this grid divides a multiple of {step} (the lcm of every W x k): --set plan.global_batch={fix}"
    )


def _strict_json(value: Any) -> Any:
    """The result with every non-finite float as the string "inf"/"-inf"/"nan".

    An excess over the bound is infinite where the bound is exactly zero (an element that
    must agree exactly, does not); JSON has no infinity, and `Infinity` would break strict
    readers (jq, browsers) of result.json and --json.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json(v) for v in value]
    return value
