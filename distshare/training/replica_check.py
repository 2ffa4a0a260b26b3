"""The replica checker: are the ranks' training states still bit-identical?

Every `every` steps and after the last it compares every rank's state by digest
(`distshare.integrity.replicas.compare_replicas`, a collective: 16 bytes per rank while all
agree) and records the first divergence and the final report in the run's account. The last
check's combined digest is the run's fingerprint.
"""

from __future__ import annotations

from typing import Any

from distshare.integrity.replicas import compare_replicas
from distshare.training.loop import Component, Loop


class ReplicaChecker(Component):
    """Compare replicas every `every` steps (0: only after the last step)."""

    def __init__(self, every: int) -> None:
        self.every = every

    def due(self, step: int, steps: int) -> bool:
        return step == steps - 1 or bool(self.every and (step + 1) % self.every == 0)

    def after_step(self, loop: Loop, step: int, row: dict[str, Any]) -> None:
        if not self.due(step, loop.steps):
            return
        in_sync = self._check(loop, step, last=step == loop.steps - 1)
        row["replicas_in_sync"] = in_sync

    def end(self, loop: Loop) -> None:
        if loop.first_step == loop.steps and loop.result.final_report is None:
            # Resumed after the last step: nothing trained here, but the state still gets checked.
            self._check(loop, loop.steps - 1, last=True)

    def _check(self, loop: Loop, step: int, last: bool) -> bool:
        run, result = loop.run, loop.result
        report = compare_replicas(run.model, run.optimizer, step=step)
        result.checks += 1
        if not report.in_sync and result.first_divergence is None:
            result.first_divergence = report.to_dict()
        if last:  # the state every rank ends with; its digest is the run's fingerprint
            result.final_report = report.to_dict()
            result.final_fingerprint = report.combined[loop.world.rank]
        return report.in_sync
