"""One run of a user's training loop on one rank, and what it left (`LoopRun`).

`run_loop` builds the rank's `LoopContext`, seeds torch, records the loop's optimizer steps
(`LoopRecorder`) while it runs, and names what was recorded through the model the loop
returns. A spawned world size runs every k one after another (`loop_rank`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from distshare.distributed.world import World
from distshare.equivalence.loop_context import PLAN_ORDER, Collate, LoopContext, LoopRecorder, Tensors, make_context

Loop = Callable[[LoopContext], Any]  # module-level: loop(ctx) -> the trained model (bare or wrapped)


@dataclass
class LoopRun:
    """What one run of the loop left on one rank (rank > 0 keeps only its samples)."""

    world_size: int
    accum_steps: int
    micro_batch: int
    order: str
    steps_taken: int
    grads: list[Tensors]
    params: list[Tensors]
    samples: list[list[list[int]]]  # this rank: step -> micro-batch -> global indices
    leftover: list[int]  # samples drawn after the last optimizer step
    used_plan: bool  # the loop drew its data from ctx.batches()
    early_sync: str
    error: str
    samples_by_rank: list[list[list[list[int]]]] = field(default_factory=list)  # filled by the parent


def run_loop(
    world: World,
    loop: Loop,
    dataset: Any,
    world_size: int,
    accum_steps: int,
    global_batch: int,
    steps: int,
    seed: int,
    collate_fn: Collate | None,
    order: str = PLAN_ORDER,
) -> LoopRun:
    """One run of the user's loop on this rank, recorded."""
    recorder = LoopRecorder(keep_tensors=world.is_main)
    ctx = make_context(world, dataset, world_size, accum_steps, global_batch, steps, seed, collate_fn, recorder, order)
    # The same seed on every rank and in every split: a model built inside the loop starts
    # from the same bits; the caller's RNG stream is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with recorder:
            model = loop(ctx)
    grads, params = recorder.name_tensors(model)
    taken = recorder.steps
    leftover = [i for step in recorder.samples[taken:] for micro in step for i in micro] if taken else []
    return LoopRun(
        world_size=world_size,
        accum_steps=accum_steps,
        micro_batch=ctx.micro_batch,
        order=order,
        steps_taken=taken,
        grads=grads,
        params=params,
        samples=recorder.samples[:taken],
        leftover=leftover,
        used_plan=ctx.used_plan,
        early_sync=ctx.early_sync,
        error=recorder.error,
    )


def loop_rank(
    world: World,
    loop: Loop,
    dataset: Any,
    accum_steps: Sequence[int],
    global_batch: int,
    steps: int,
    seed: int,
    collate_fn: Collate | None,
) -> list[LoopRun]:
    """Every k of this world size, one after another, on this rank (a spawned world runs them all)."""
    return [
        run_loop(world, loop, dataset, world.world_size, k, global_batch, steps, seed, collate_fn) for k in accum_steps
    ]
