"""Engines start processes and hand each one the one step; this module picks the engine.

    local        one process, no process group
    torch        spawned gloo ranks (--nproc N), or the ranks torchrun started
    accelerate   the ranks `accelerate launch` started (or one process without it)
    ray          Ray Train workers, on a local Ray or a cluster (--ray-address)
    auto         the launcher's engine when launched, else torch for N > 1, else local

A launcher that does not fit the engine asked for is refused in one line that says what
to run instead: starting processes is the launcher's job, and a mismatch would otherwise
surface as a hang or a world of the wrong size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from distshare.config import RunConfig
from distshare.distributed.launchers import (
    accelerate_command,
    accelerate_started_one_of_several,
    launched,
    launched_by_accelerate,
)
from distshare.engines.runner import RankJob
from distshare.errors import UsageError
from distshare.extras import require
from distshare.training import Component, TrainResult


def resolve_engine(cfg: RunConfig, command: str = "train") -> str:
    """The engine that will run `cfg`, or a UsageError saying what to run instead."""
    engine = _resolve(cfg, command)
    if cfg.parallel != "ddp" and engine == "accelerate":
        raise UsageError(
            f"--parallel {cfg.parallel} does not run under --engine accelerate: accelerate applies its FSDP plugin "
            "only to GPU process groups (on CPU it runs MULTI_CPU, which is DDP) and distshare's accelerate engine "
            f"prepares a DDP model; run it with --engine torch (--nproc N, or under torchrun)"
        )
    # Ray's workers may sit on GPU nodes while the driver has none; every other engine runs here.
    if cfg.device == "cuda" and engine != "ray":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("device cuda: torch sees no CUDA GPU here (torch.cuda.is_available() is False)")
    return engine


def _resolve(cfg: RunConfig, command: str) -> str:
    requested, n = cfg.engine, cfg.plan.world_size
    inside_accelerate = launched_by_accelerate()
    inside_torchrun = launched() and not inside_accelerate
    if requested == "auto":
        if inside_accelerate:
            _refuse_a_lone_accelerate_process(cfg, command)
            return "accelerate"
        return "torch" if inside_torchrun or n > 1 else "local"
    if requested == "local":
        if launched() or n > 1:
            raise UsageError(f"--engine local is one process; for {n} ranks use --engine torch --nproc {n}")
        return "local"
    if requested == "accelerate":
        require("accelerate", "--engine accelerate")
        fix = accelerate_command(command, n, cfg.device)
        if inside_torchrun:
            raise UsageError(f"--engine accelerate runs under accelerate launch, not torchrun: {fix}")
        if not inside_accelerate and n > 1:
            raise UsageError(f"--engine accelerate with {n} processes needs its launcher: {fix}")
        _refuse_a_lone_accelerate_process(cfg, command)
        return "accelerate"
    if requested == "ray":
        require("ray", "--engine ray")
        if launched():
            raise UsageError(
                "--engine ray starts its own workers: run it as a plain command, "
                f"not under a launcher (distshare {command} --engine ray --nproc {n})"
            )
        return "ray"
    return "torch"


def run_engine(
    engine: str,
    cfg: RunConfig,
    out_dir: Path | None,
    progress: bool = True,
    keep_state: bool = False,
    ray_address: str | None = None,
    max_failures: int | None = None,
    components: Sequence[Component] = (),
) -> list[TrainResult] | None:
    """Train with `engine` (from `resolve_engine`); every rank's result on the main process.

    `components` are added to every rank's loop after the standard ones (verify's probe).
    `max_failures` is Ray Train's restart budget; other engines are restarted by their
    launcher (`torchrun --max-restarts N`), so for them it is refused.
    """
    if max_failures is not None and engine != "ray":
        raise UsageError(
            f"--max-failures restarts Ray Train workers (--engine ray); the {engine} engine is restarted "
            "by its launcher: torchrun --max-restarts N ... -m distshare train --checkpoint-dir DIR"
        )
    job = RankJob(cfg, out_dir, progress, keep_state, tuple(components))
    if engine == "accelerate":
        from distshare.engines.accelerate import run_training as accelerate_training

        return accelerate_training(job)
    if engine == "ray":
        from distshare.engines.ray import run_training as ray_training

        return ray_training(job, address=ray_address, max_failures=max_failures or 0)
    from distshare.engines.torch import run_training as torch_training

    return torch_training(job, engine)


def _refuse_a_lone_accelerate_process(cfg: RunConfig, command: str) -> None:
    """`accelerate launch --cpu --num_processes N` starts one process, which would train alone
    and report OK on 1 rank: refuse it, with the launch that starts N. The same for a --nproc
    N > 1 given to that one process (the accelerate engine trains the launcher's world)."""
    n = cfg.plan.world_size
    if not launched() and n > 1:  # --nproc N, and the launcher started this one process alone
        raise UsageError(
            f"--nproc {n} under accelerate launch, which started 1 process: give the count to the launcher, "
            f"without --nproc: {accelerate_command(command, n, cfg.device)}"
        )
    if accelerate_started_one_of_several():
        n = 2  # cpu.yaml's count; the single-process launcher does not pass on the one asked for
        raise UsageError(
            "accelerate launch started 1 process, not the several asked for: with --cpu, or without "
            "--multi_gpu on a machine with no GPU, it runs its single-process launcher (seen as MASTER_ADDR "
            "and MASTER_PORT without RANK; if your shell exported them, unset them). "
            f"For {n} processes (--num_processes N for N): {accelerate_command(command, n, cfg.device)}"
        )
