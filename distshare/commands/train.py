"""`distshare train`: the one step, on one process, spawned CPU ranks, or torchrun's ranks.

distshare train --config configs/train/transformer.yaml                 # one process
distshare train --config configs/train/transformer.yaml --nproc 2       # 2 gloo ranks
torchrun --standalone --nproc_per_node 2 -m distshare train --config configs/train/cnn.yaml
accelerate launch --config_file configs/accelerate/cpu.yaml -m distshare train --engine accelerate
distshare train --engine ray --nproc 2                                   # Ray Train, local Ray
distshare train --engine torchrun --nproc 2                              # = the torchrun line above
distshare train --nproc 2 --parallel fsdp                                # FSDP2: each tensor sharded over 2 ranks
distshare train --nproc 4 --parallel hsdp --set hsdp_replicas=2          # HSDP: mesh 2 replicas x 2 shards

Checkpoints, resume and restarts (distshare/training/checkpointer.py):

distshare train --nproc 2 --steps 10 --checkpoint-dir ckpt --checkpoint-every 5   # ckpt/step-000005, -000010
distshare train --nproc 2 --steps 20 --checkpoint-dir ckpt --resume ckpt          # continues with step 10
distshare train --nproc 2 --steps 20 --checkpoint-dir ckpt --resume auto          # resume if ckpt holds one
torchrun --standalone --nproc_per_node 2 --max-restarts 1 -m distshare train --checkpoint-dir ckpt
distshare train --engine ray --nproc 2 --max-failures 1 --checkpoint-dir ckpt
distshare train --nproc 2 --checkpoint-dir ckpt --save-every-rank   # + ckpt/rank0/step-..., ckpt/rank1/step-...
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from pathlib import Path

from safetensors.torch import save_file

from distshare.commands.common import (
    RunInterrupted,
    config_from_args,
    exact_line,
    finish,
    is_main_process,
    non_negative_int,
    output_file,
    positive_int,
    preflight,
    record_failure,
    register,
    run_under_torchrun,
    training_summary,
    under_torchrun,
    warn_if_oversubscribed,
)
from distshare.config import RunConfig
from distshare.distributed.launchers import launched, restart_count
from distshare.engines import resolve_engine, run_engine
from distshare.engines.torchrun import command_flags
from distshare.errors import UsageError
from distshare.integrity.diagnosis import Diagnosis
from distshare.integrity.resume import find_resume, list_checkpoints, with_absolute_paths
from distshare.report import (
    markdown_table,
    plot_losses,
    remember_run_dir,
    run_dir,
    run_dir_to_continue,
    usable_dir,
)
from distshare.training import TrainResult
from distshare.training.checkpointer import ReplicaCheckpoints


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
    ck = parser.add_argument_group("checkpoints, resume and restarts")
    ck.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="write verified checkpoints to DIR/step-NNNNNN (the state after NNNNNN steps); "
        "a worker its launcher restarted resumes from DIR by itself (overrides config 'checkpoint.dir')",
    )
    ck.add_argument(
        "--checkpoint-every",
        type=non_negative_int,
        metavar="N",
        help="checkpoint every N steps and after the last; 0 = only after the last (default 10)",
    )
    ck.add_argument(
        "--keep-checkpoints",
        type=positive_int,
        metavar="K",
        help="keep the newest K checkpoints, delete older ones (default 3)",
    )
    ck.add_argument(
        "--resume",
        metavar="DIR|auto",
        help="continue from the newest checkpoint in DIR that verifies (a damaged newer one is skipped, "
        "and said so); auto: from --checkpoint-dir if it holds one, else start at step 0",
    )
    ck.add_argument(
        "--save-every-rank",
        action="store_true",
        help="every rank also writes the replica it holds to DIR/rank{r}/step-NNNNNN when a checkpoint is due, "
        "so `distshare compare DIR/rank0/step-NNNNNN DIR/rank1/step-NNNNNN` compares two ranks' states",
    )
    ck.add_argument(
        "--max-failures",
        type=non_negative_int,
        metavar="N",
        help="--engine ray: restart the workers up to N times after one dies (Ray Train's "
        "FailureConfig); under torchrun use torchrun --max-restarts N",
    )
    return parser


def with_checkpoint_args(cfg: RunConfig, args: argparse.Namespace) -> RunConfig:
    """The config with the checkpoint flags applied (set directly, not through --set's YAML
    reading, so a directory named `123` or `null` stays a directory name)."""
    ck = cfg.checkpoint
    changes = {
        "dir": getattr(args, "checkpoint_dir", None),
        "every": getattr(args, "checkpoint_every", None),
        "keep": getattr(args, "keep_checkpoints", None),
        "resume": getattr(args, "resume", None),
    }
    ck = dataclasses.replace(ck, **{k: v for k, v in changes.items() if v is not None})
    if ck.dir is None:
        for flag, key in (("--checkpoint-every", "every"), ("--keep-checkpoints", "keep")):
            if changes[key] is not None:
                raise UsageError(f"{flag} needs --checkpoint-dir DIR (where the checkpoints go)")
    cfg = with_absolute_paths(dataclasses.replace(cfg, checkpoint=ck).validate())
    if cfg.checkpoint.dir is not None:
        usable_dir(Path(cfg.checkpoint.dir), "--checkpoint-dir")
    return cfg


def train_command(args: argparse.Namespace) -> int:
    cfg = with_checkpoint_args(config_from_args(args), args)
    engine = resolve_engine(cfg, "train")
    plan, info = preflight(cfg)
    # Refuse a resume that cannot continue this run before any rank starts (the ranks
    # decide again, with the model's tensors at hand: rank 0 for all of them).
    find_resume(cfg, cfg.plan.world_size, restart_count())
    if args.save_every_rank and cfg.checkpoint.dir is None:
        raise UsageError("--save-every-rank writes into the checkpoint directory: give --checkpoint-dir DIR too")
    if args.save_params is not None:  # written after training: a path that cannot be written is refused before it
        output_file(args.save_params, "--save-params")
    if under_torchrun(args):
        return run_under_torchrun(args, cfg)
    main = is_main_process()
    out = _run_dir(args, cfg) if main else None
    warn_if_oversubscribed(engine, cfg, args)  # after --out is accepted: a refusal stays one line
    keep = bool(args.save_params)
    try:
        results = run_engine(
            engine,
            cfg,
            out,
            not args.no_progress,
            keep_state=keep,
            ray_address=args.ray_address,
            max_failures=args.max_failures,
            components=[ReplicaCheckpoints()] if args.save_every_rank else [],
        )
    except KeyboardInterrupt as exc:
        interrupted = RunInterrupted(f"interrupted: {_resume_hint(args, cfg)}")
        record_failure(out, interrupted)
        raise interrupted from exc
    except BaseException as exc:
        record_failure(out, exc)
        raise
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
        "restarts": results[0].restart,
        "resume": results[0].resumed,
        **results[0].layout_facts(),
    }
    diagnosis = summary["replicas_diagnosis"]
    table = [
        (
            "replicas",
            "ok" if summary["replicas_in_sync"] else "FAIL",
            summary["replicas_where"] or summary["replicas_summary"],
        ),
        *([("why", "", Diagnosis.from_dict(diagnosis).describe())] if diagnosis else []),
        ("accounting", "ok" if summary["accounting"]["ok"] else "FAIL", summary["accounting"]["summary"]),
        ("loss", "", f"{summary['losses'][0]:.4f} -> {summary['final_loss']:.4f}"),
    ]
    if results[0].parallel != "ddp":
        table.append(("layout", "", layout_line(results[0])))
    if results[0].restart or results[0].resumed:
        table.append(("resume", "", _resume_line(results[0].restart, results[0].resumed)))
    if "exact_underflows" in summary:  # exact mode never drops a contribution silently
        table.append(("exact sum", "", exact_line(summary["exact_underflows"])))
    assert out is not None
    plot_losses(out / "loss.png", {f"W={summary['world_size']}": summary["losses"]}, "distshare train")
    p = summary["plan"]
    verdict = (
        f"{summary['steps']} steps on {summary['world_size']} rank(s), G={p['global_batch']} "
        f"(W={p['world_size']} x k={p['accum_steps']} x b={p['micro_batch']}), "
        f"replicas {'in sync' if summary['replicas_in_sync'] else 'DIVERGED'}"
    )
    return finish("train", cfg, result, table, verdict, args.json, out, _report)


def layout_line(main: TrainResult) -> str:
    """One line for the table: how the parameters were laid out, and the logical digest."""
    r, s = main.mesh or (1, main.world_size)
    how = f"each tensor sharded over {s} ranks" if r == 1 else f"mesh {r} replicas x {s} shards"
    return f"{main.parallel}: {how}; final logical state {main.logical_fingerprint}"


def _run_dir(args: argparse.Namespace, cfg: RunConfig) -> Path:
    """Rank 0's run directory. A worker its launcher restarted continues the run directory of
    the attempt before it (its checkpoint directory remembers which), so a restart leaves one
    directory with the whole run, not a second one and an orphan that looks like a failure."""
    restart = restart_count()
    ck = cfg.checkpoint.dir
    out = args.out
    if out is None and restart > 0 and ck is not None:
        out = run_dir_to_continue(Path(ck))
    path = run_dir(out, "train", attempt=f"restart {restart} of the launcher, continuing this run" if restart else "")
    if ck is not None:
        remember_run_dir(Path(ck), path)
    return path


def _resume_hint(args: argparse.Namespace, cfg: RunConfig) -> str:
    """The command that continues an interrupted run, exactly (or why there is none)."""
    ck = cfg.checkpoint.dir
    if ck is None:
        return "no checkpoint was written (no --checkpoint-dir): give --checkpoint-dir DIR to make a run resumable"
    done = list_checkpoints(ck)
    if not done:
        return f"no checkpoint in {ck} yet: run the same command again"
    flags = command_flags(args.command_parser, args, leave_out=("resume",))
    command = shlex.join(["distshare", "train", *flags, f"--resume={ck}"])
    if launched():  # the launcher's own command line is not ours to rebuild
        return f"resume from {done[0][1].name} with your launch command and --resume={ck} added ({command})"
    return f"resume from {done[0][1].name} with: {command}"


def _resume_line(restart: int, resumed: dict | None) -> str:
    """One line for the table and report: did the run restart, and from which step it went on."""
    who = f"restart {restart} (the launcher restarted the workers)" if restart else "resumed on request"
    if resumed is None:
        return f"{who}: no checkpoint yet, started again at step 0"
    skipped = (
        f"; skipped {len(resumed['skipped'])} damaged newer one(s): {resumed['skipped'][0]}"
        if resumed["skipped"]
        else ""
    )
    return f"{who}: continued from step {resumed['from_step']} ({resumed['path']}){skipped}"


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
