"""The replica checker: are the ranks' training states still bit-identical?

With `check_buffers: separate` (config) buffers are compared and reported but a difference in
them alone fails nothing (BatchNorm under DDP: each rank's forward updates its own running
statistics after rank 0's are broadcast); `ignore` leaves them out.

Once before the first step (the starting point: a difference there is the initial weights),
then every `every` steps and after the last, it compares every rank's state by digest
(`distshare.integrity.replicas.compare_replicas`, a collective: 16 bytes per rank while all
agree); when they differ, the gradients too: right after the step `.grad` still holds what the
optimizer used, so a gradient that was never reduced is diagnosed as such. It records the first divergence
(with its diagnosis) and the final report in the run's account. The last check's combined
digest is the run's fingerprint; the final state's logical digest (`lsh128` of whole tensors,
computed from shards under FSDP / HSDP) is recorded beside it, so runs at different layouts
can be compared. The check before the first step is not counted in `checks`.
The gradients are digested only when the rest differs (`grads="on_divergence"`): a check that
agrees costs what it did before, and the run's fingerprint stays the state's.
"""

from __future__ import annotations

from typing import Any

from distshare.distributed.sync import is_sharded
from distshare.integrity.fingerprint import state_digest
from distshare.integrity.logical import LOGICAL_ALGORITHM
from distshare.integrity.replicas import compare_replicas
from distshare.training.loop import Component, Loop


class ReplicaChecker(Component):
    """Compare replicas every `every` steps (0: only after the last step)."""

    def __init__(self, every: int, buffers: str = "compare") -> None:
        self.every, self.buffers = every, buffers  # buffers: compare | separate | ignore (config check_buffers)

    def due(self, step: int, steps: int) -> bool:
        return step == steps - 1 or bool(self.every and (step + 1) % self.every == 0)

    def after_step(self, loop: Loop, step: int, row: dict[str, Any]) -> None:
        if not self.due(step, loop.steps):
            return
        in_sync = self._check(loop, step, last=step == loop.steps - 1)
        row["replicas_in_sync"] = in_sync

    def begin(self, loop: Loop) -> None:
        # After the checkpointer's begin (it comes first): a resumed run starts from what it restored.
        report = compare_replicas(loop.run.wrapped, loop.run.optimizer, buffers=self.buffers)
        if not report.in_sync and loop.result.first_divergence is None:
            loop.result.first_divergence = report.to_dict()

    def end(self, loop: Loop) -> None:
        if loop.first_step == loop.steps and loop.result.final_report is None:
            # Resumed after the last step: nothing trained here, but the state still gets checked.
            self._check(loop, loop.steps - 1, last=True)

    def _check(self, loop: Loop, step: int, last: bool) -> bool:
        run, result = loop.run, loop.result
        # The DDP wrapper, where there is one: its buffer sync setting is evidence for a diagnosis.
        report = compare_replicas(run.wrapped, run.optimizer, grads="on_divergence", step=step, buffers=self.buffers)
        result.checks += 1
        if not report.in_sync and result.first_divergence is None:
            result.first_divergence = report.to_dict()
        if last:  # the state every rank ends with; its digest is the run's fingerprint
            result.final_report = report.to_dict()
            result.final_fingerprint = report.combined[loop.world.rank]
            # The whole logical tensors' digest, the same for any layout of the same training (a
            # collective on a sharded model: every rank computes it, in the same order).
            result.logical_fingerprint = state_digest(run.model, run.optimizer, algorithm=LOGICAL_ALGORITHM)
            if is_sharded(run.sync):
                # No rank holds a replica, so a rank's own digest (of its shards) is no run
                # fingerprint: the logical state is, the same on every rank that holds one set
                # (under hsdp each replica group computes its own).
                result.final_fingerprint = result.logical_fingerprint
        return report.in_sync
