"""The torch engine: the one step on spawned gloo ranks, or on the ranks torchrun started.

    distshare train --nproc 2                                        # spawned CPU ranks
    torchrun --standalone --nproc_per_node 2 -m distshare train      # torchrun's ranks

Either way every rank runs `distshare.training.train`; what differs is who made the process
group. Under torchrun there is no parent to collect results, so the ranks gather their
(small) accounts to rank 0, which writes the report.

    torchrun --standalone --nproc_per_node 2 --max-restarts 1 -m distshare train --checkpoint-dir ckpt

A worker that dies takes its peers down (their next collective fails); torchrun then starts
them all again with TORCHELASTIC_RESTART_COUNT=1, and `train` resumes from the newest
verified checkpoint in ckpt (distshare/resume.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from distshare.config import RunConfig
from distshare.distributed.spawn import run_distributed
from distshare.distributed.world import World, close_world, init_world, launched
from distshare.engines.gather import gather_to_main, with_world_size
from distshare.errors import UsageError
from distshare.integrity.resume import restart_count
from distshare.testing.faults import worker_exit_hook
from distshare.training import TrainResult, train


def run_training(
    cfg: RunConfig,
    out_dir: Path | None = None,
    progress: bool = True,
    keep_state: bool = False,
) -> list[TrainResult] | None:
    """Train on `cfg.plan.world_size` ranks; every rank's result, or None off rank 0.

    Inside torchrun the launcher's world wins over the configured world size.
    """
    if launched():
        world = init_world(timeout_s=cfg.timeout_s, device=torch.device(cfg.device))
        cfg = with_world_size(cfg, world.world_size)
        attempt = restart_count()
        try:
            hook = worker_exit_hook(world, attempt)
            result = train(cfg, world, out_dir, progress, keep_state, on_step=hook, restart=attempt)
            result.engine = "torchrun"
            results = gather_to_main(result, world)
        finally:
            close_world(world)
        return results
    nproc = cfg.plan.world_size
    if nproc == 1:
        world = World(device=torch.device(cfg.device))
        return [train(cfg, world, out_dir, progress, keep_state, on_step=worker_exit_hook(world, 0), restart=0)]
    if cfg.device != "cpu":
        raise UsageError(
            f"spawned ranks run on the CPU; for {nproc} GPU ranks run "
            f"torchrun --standalone --nproc_per_node {nproc} -m distshare train --set device=cuda ..."
        )
    return run_distributed(_rank_worker, nproc, cfg, out_dir, progress, keep_state, timeout_s=cfg.timeout_s)


def _rank_worker(world: World, cfg: RunConfig, out_dir: Path | None, progress: bool, keep: bool) -> TrainResult:
    hook = worker_exit_hook(world, 0)
    result = train(cfg, world, out_dir, progress, keep_state=keep and world.is_main, on_step=hook, restart=0)
    result.engine = "spawn"
    return result
