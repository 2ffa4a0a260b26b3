"""Small components for callers of the loop: a function after every step, the final state kept."""

from __future__ import annotations

from collections.abc import Callable

from distshare.integrity.logical import is_dtensor
from distshare.training.loop import Component, Loop
from distshare.training.step import Run


class OnStep(Component):
    """Calls `fn(run, step)` at the end of every step (after checks and checkpoints)."""

    def __init__(self, fn: Callable[[Run, int], None]) -> None:
        self.fn = fn

    def step_end(self, loop: Loop, step: int) -> None:
        self.fn(loop.run, step)


class KeepState(Component):
    """Keeps the final parameters and buffers (`TrainResult.state`), on rank 0 only: they
    are the same bits on every rank when the replicas agree, and they stay home."""

    def end(self, loop: Loop) -> None:
        state = loop.run.model.state_dict()
        if any(is_dtensor(t) for t in state.values()):
            # Sharded (FSDP2 / HSDP): every rank takes part in gathering each whole tensor.
            state = {n: t.full_tensor() if is_dtensor(t) else t for n, t in state.items()}
        if loop.world.is_main:
            loop.result.state = {n: t.detach().cpu().clone() for n, t in state.items()}
