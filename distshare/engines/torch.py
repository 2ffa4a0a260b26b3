"""The torch engine: the one step on spawned gloo ranks, or on the ranks torchrun started.

    distshare train --nproc 2                                        # spawned CPU ranks
    torchrun --standalone --nproc_per_node 2 -m distshare train      # torchrun's ranks

Either way every rank runs `distshare.train.train`; what differs is who made the process
group. Under torchrun there is no parent to collect results, so the ranks gather their
(small) accounts to rank 0, which writes the report.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch.distributed as dist

from distshare.config import RunConfig
from distshare.dist.spawn import run_distributed
from distshare.dist.world import World, close_world, init_world, launched
from distshare.train import TrainResult, train


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
        world = init_world(timeout_s=cfg.timeout_s)
        cfg = _with_world_size(cfg, world.world_size)
        try:
            result = train(cfg, world, out_dir, progress, keep_state)
            results = _gather_to_main(result, world)
        finally:
            close_world(world)
        return results
    nproc = cfg.plan.world_size
    if nproc == 1:
        return [train(cfg, World(), out_dir, progress, keep_state)]
    return run_distributed(_rank_worker, nproc, cfg, out_dir, progress, keep_state, timeout_s=cfg.timeout_s)


def _rank_worker(world: World, cfg: RunConfig, out_dir: Path | None, progress: bool, keep: bool) -> TrainResult:
    result = train(cfg, world, out_dir, progress, keep_state=keep and world.is_main)
    return result


def _gather_to_main(result: TrainResult, world: World) -> list[TrainResult] | None:
    # Tensors stay home: only the accounts (digests, indices, losses) travel.
    light = dataclasses.replace(result, state=None, first_grads=None)
    gathered: list[TrainResult | None] = [None] * world.world_size
    dist.all_gather_object(gathered, light)
    if not world.is_main:
        return None
    gathered[0] = result
    return [g for g in gathered if g is not None]


def _with_world_size(cfg: RunConfig, world_size: int) -> RunConfig:
    plan = dataclasses.replace(cfg.plan, world_size=world_size)
    plan.resolve()  # refuse an impossible split now, before any rank starts
    return dataclasses.replace(cfg, plan=plan)
