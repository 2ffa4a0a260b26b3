"""What every multi-process engine does after training: bring the ranks' accounts to rank 0."""

from __future__ import annotations

import dataclasses

import torch.distributed as dist

from distshare.config import RunConfig
from distshare.distributed.world import World
from distshare.training import TrainResult


def gather_to_main(result: TrainResult, world: World) -> list[TrainResult] | None:
    """Every rank's result on rank 0 (None elsewhere); a collective.

    Tensors stay home: only the accounts (digests, indices, losses) travel.
    """
    light = dataclasses.replace(result, state=None, first_grads=None)
    gathered: list[TrainResult | None] = [None] * world.world_size
    dist.all_gather_object(gathered, light)
    if not world.is_main:
        return None
    gathered[0] = result
    return [g for g in gathered if g is not None]


def with_world_size(cfg: RunConfig, world_size: int) -> RunConfig:
    """The config with the launcher's world size; an impossible split is refused before training."""
    plan = dataclasses.replace(cfg.plan, world_size=world_size)
    plan.resolve()
    return dataclasses.replace(cfg, plan=plan)
