"""`distshare train`: the one step, on one process, spawned CPU ranks, or torchrun's ranks.

distshare train --config configs/train/transformer.yaml                 # one process
distshare train --config configs/train/transformer.yaml --nproc 2       # 2 gloo ranks
torchrun --standalone --nproc_per_node 2 -m distshare train --config configs/train/cnn.yaml
accelerate launch --config_file configs/accelerate/cpu.yaml -m distshare train --engine accelerate
distshare train --engine ray --nproc 2                                   # Ray Train, local Ray
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import save_file

from distshare.commands.common import (
    config_from_args,
    finish,
    is_main_process,
    preflight,
    register,
    training_summary,
)
from distshare.engines import resolve_engine, run_engine
from distshare.report import markdown_table, plot_losses, run_dir


def train_command_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = register(
        subparsers,
        "train",
        "train with data parallelism and check replicas",
        __doc__,
        train_command,
        default_world="the config's plan.world_size, 1 in the shipped configs",
    )
    parser.add_argument(
        "--save-params",
        metavar="FILE",
        help="write the final parameters and buffers (safetensors), e.g. to compare runs or engines",
    )
    return parser


def train_command(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    engine = resolve_engine(cfg, "train")
    plan, info = preflight(cfg)
    main = is_main_process()
    out = run_dir(args.out, "train") if main else None
    keep = bool(args.save_params)
    results = run_engine(engine, cfg, out, not args.no_progress, keep_state=keep, ray_address=args.ray_address)
    if results is None:  # a non-zero rank under a launcher: rank 0 reports
        return 0
    if keep and results[0].state is not None:
        path = Path(args.save_params)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in results[0].state.items()}, str(path))
    summary = training_summary(cfg, results, plan)
    ok = summary["replicas_in_sync"] and summary["accounting"]["ok"]
    result = {
        "ok": ok,
        "command": "train",
        **summary,
        "max_abs_diff_vs_single_process": None,
        "bitwise_equal_to_single_process": None,
    }
    table = [
        (
            "replicas",
            "ok" if summary["replicas_in_sync"] else "FAIL",
            summary["replicas_summary"],
        ),
        ("accounting", "ok" if summary["accounting"]["ok"] else "FAIL", summary["accounting"]["summary"]),
        ("loss", "", f"{summary['losses'][0]:.4f} -> {summary['final_loss']:.4f}"),
    ]
    assert out is not None
    plot_losses(out / "loss.png", {f"W={summary['world_size']}": summary["losses"]}, "distshare train")
    p = summary["plan"]
    verdict = (
        f"{summary['steps']} steps on {summary['world_size']} rank(s), G={p['global_batch']} "
        f"(W={p['world_size']} x k={p['accum_steps']} x b={p['micro_batch']}), "
        f"replicas {'in sync' if summary['replicas_in_sync'] else 'DIVERGED'}"
    )
    return finish("train", cfg, result, table, verdict, args.json, out, _report)


def _report(result: dict, table: list[tuple[str, str, str]]) -> str:
    p = result["plan"]
    return "\n".join(
        [
            "# distshare train",
            "",
            f"{result['steps']} steps, {result['world_size']} rank(s) ({result['engine']}), sync {result['sync']}, "
            f"{result['dtype']}; global batch G={p['global_batch']} = W {p['world_size']} x k {p['accum_steps']} "
            f"x b {p['micro_batch']}.",
            "",
            markdown_table(table, ("check", "status", "detail")),
            "",
            "![loss](loss.png)",
            "",
            f"Verdict: **{'OK' if result['ok'] else 'FAILED'}**",
            "",
        ]
    )
