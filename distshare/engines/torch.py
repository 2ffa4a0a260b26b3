"""The torch engine: the one step on spawned gloo ranks, or on the ranks torchrun started.

    distshare train --nproc 2                                        # spawned CPU ranks
    torchrun --standalone --nproc_per_node 2 -m distshare train      # torchrun's ranks

Either way every rank runs the one per-rank runner (`distshare.engines.runner`); what differs
is who made the process group. Under torchrun there is no parent to collect results, so the
ranks gather their (small) accounts to rank 0, which writes the report; spawned ranks do the
same and hand rank 0's list to the parent.

    torchrun --standalone --nproc_per_node 2 --max-restarts 1 -m distshare train --checkpoint-dir ckpt

A worker that dies takes its peers down (their next collective fails); torchrun then starts
them all again with a restart count, and they resume from the newest verified checkpoint in
ckpt (`distshare.training.checkpointer`).
"""

from __future__ import annotations

import torch

from distshare.distributed import launchers
from distshare.distributed.spawn import run_distributed
from distshare.distributed.world import World, close_world, init_world
from distshare.engines.runner import RankJob, run_rank
from distshare.errors import UsageError
from distshare.training import TrainResult


def run_training(job: RankJob, engine: str = "torch") -> list[TrainResult] | None:
    """Train on `cfg.plan.world_size` ranks; every rank's result, or None off rank 0.

    Inside torchrun the launcher's world wins over the configured world size.
    """
    cfg = job.cfg
    if launchers.launched():
        world = init_world(timeout_s=cfg.timeout_s, device=torch.device(cfg.device))
        try:
            job = job.with_world_size(world.world_size)
            return run_rank(job, world, engine, "torchrun", restart=launchers.restart_count())
        finally:
            close_world(world)
    nproc = cfg.plan.world_size
    if nproc == 1:
        return run_rank(job, World(device=torch.device(cfg.device)), engine, None)
    if cfg.device != "cpu":
        raise UsageError(
            f"spawned ranks run on the CPU; for {nproc} GPU ranks run "
            f"torchrun --standalone --nproc_per_node {nproc} -m distshare train --set device=cuda ..."
        )
    return run_distributed(_spawned_rank, nproc, job, engine, timeout_s=cfg.timeout_s, deadline_s=None)[0]


def _spawned_rank(world: World, job: RankJob, engine: str) -> list[TrainResult] | None:
    return run_rank(job, world, engine, "spawn")
