"""A real training run, observed as the grid observes a partition: what `distshare verify` judges.

`PartitionProbe` is a loop component. On rank 0, at every step, it records the synced
gradient and, on a bare copy at the same parameters, the one-big-batch gradient (just
before the update, `distshare.equivalence.runs.record_gradients`), and the state after the
update. The run is then a `PartitionRun`, and `distshare.equivalence.grid.compare` judges
it against the reference exactly as it judges a partition of the grid: every step's
gradient elementwise against its rounding bound, every update replayed bit for bit, the
parameters against the envelope, any NaN or infinity a failure.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from distshare.equivalence.runs import PartitionRun, record_gradients, state_of
from distshare.equivalence.tasks import trainee_of
from distshare.integrity.logical import is_sharded_model
from distshare.training import Component, Loop, TrainResult


class PartitionProbe(Component):
    """Rank 0's record of every step: synced gradient, big-batch gradient, state after."""

    KEY = "partition"

    def __init__(self) -> None:
        self.current: list[Any] = [0, None]  # the step, and the CPU RNG state when it began
        self.handle: RemovableHandle | None = None
        self.rec: PartitionRun | None = None

    def begin(self, loop: Loop) -> None:
        main = loop.world.is_main
        if not main and not is_sharded_model(loop.run.model):
            return
        # Sharded (FSDP2 / HSDP): every rank takes part in gathering whole tensors; rank 0 keeps them.
        run = loop.run
        t = trainee_of(run)
        plan = run.plan.plan
        self.rec = PartitionRun(loop.world.world_size, plan.accum_steps, plan.micro_batch, t.label, t.u)
        self.trainee, self.main = t, main
        self.handle, self.replay = record_gradients(t, self.rec, self.current, keep=main)
        if main:
            loop.result.extras[self.KEY] = self.rec

    def before_step(self, loop: Loop, step: int) -> None:
        self.current[:] = [step, torch.get_rng_state()]

    def after_step(self, loop: Loop, step: int, row: dict[str, Any]) -> None:
        if self.rec is not None:
            self.replay.after_update(step)
            state = state_of(loop.run.model)
            if self.main:
                self.rec.states.append(state)
                self.rec.global_batches.append(self.trainee.global_batch(step))

    def end(self, loop: Loop) -> None:
        if self.rec is not None:
            self.rec.losses = list(loop.result.losses)  # global mean losses, reduced by now

    def close(self, loop: Loop) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    @classmethod
    def of(cls, results: list[TrainResult]) -> PartitionRun:
        """Rank 0's record, with every rank's samples for the accounting."""
        rec = results[0].extras[cls.KEY]
        rec.samples_by_rank = [r.samples_by_step for r in results]
        return rec
