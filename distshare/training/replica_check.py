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

`mode="rolling"` (config `check_mode: rolling`) makes the checks in between cheap enough for
every step: each digests one slice of the state (`distshare.integrity.rolling`: all of it
within `slices` checks) and compares the rolling digest of all slices, as last taken, by an
all_gather that runs in the background, on a group of its own, while the next step trains; it
is judged at the next check (a bounded wait). A difference makes that next check a full one
(every byte, localized and diagnosed, as above), its report saying in which step's state and
which slice the rolling check first saw it (`ReplicaReport.coverage`). So a corruption present
after step t is in a digested slice by step t + slices x every and reported by the check after
that; the check before the first step and the one after the last are always full. The metrics
row of a rolling check's verdict names the step whose state it covered (`checked_step`). It
covers host (CPU) replicas; a sharded or device-resident state keeps the full checks
(`result.extras["replica_check"]` says which mode ran, and why). Buffers checked apart
(`check_buffers: separate`) are left to the full checks at both ends.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from distshare.distributed.sync import is_sharded
from distshare.integrity.fingerprint import state_digest
from distshare.integrity.logical import LOGICAL_ALGORITHM
from distshare.integrity.replicas import compare_replicas, vote
from distshare.integrity.rolling import Coverage, RollingDigest, supported
from distshare.training.loop import Component, Loop

MODES = ("full", "rolling")


@dataclass
class _Pending:
    """A rolling check in flight: what it covered, and the gather of every rank's rolling digest."""

    coverage: Coverage
    work: Any  # the all_gather's Work (None in one process)
    gathered: list[torch.Tensor]


class ReplicaChecker(Component):
    """Compare replicas every `every` steps (0: only after the last step); `mode`: full | rolling."""

    def __init__(
        self, every: int, buffers: str = "compare", mode: str = "full", slices: int = 0, timeout_s: float = 120.0
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
        self.every, self.buffers = every, buffers  # buffers: compare | separate | ignore (config check_buffers)
        self.mode, self.slices, self.timeout_s = mode, slices, timeout_s
        self.rolling: RollingDigest | None = None
        self.group: Any = None
        self.pending: _Pending | None = None
        self.rolling_checks = 0

    def due(self, step: int, steps: int) -> bool:
        return step == steps - 1 or bool(self.every and (step + 1) % self.every == 0)

    def after_step(self, loop: Loop, step: int, row: dict[str, Any]) -> None:
        if not self.due(step, loop.steps):
            return
        last = step == loop.steps - 1
        if self.rolling is None:
            row["replicas_in_sync"] = self._check(loop, step, last=last)
            return
        covered = self.pending.coverage.state_step if self.pending is not None else None
        verdict = self._settle(loop, step)
        if last:  # the last check is a full one: the run's fingerprint is the state's
            row["replicas_in_sync"] = self._check(loop, step, last=True) and verdict is not False
            return
        self._launch(loop, self.rolling.advance(step))
        if verdict is not None:
            row["replicas_in_sync"], row["checked_step"] = verdict, covered

    def begin(self, loop: Loop) -> None:
        # After the checkpointer's begin (it comes first): a resumed run starts from what it restored.
        report = compare_replicas(loop.run.wrapped, loop.run.optimizer, buffers=self.buffers)
        if not report.in_sync and loop.result.first_divergence is None:
            loop.result.first_divergence = report.to_dict()
        if self.mode == "rolling":
            self._start_rolling(loop)

    def end(self, loop: Loop) -> None:
        if loop.first_step == loop.steps and loop.result.final_report is None:
            # Resumed after the last step: nothing trained here, but the state still gets checked.
            self._check(loop, loop.steps - 1, last=True)
        if self.rolling is not None:
            loop.result.extras["replica_check"] = self._account()

    def close(self, loop: Loop) -> None:
        # After a failure a gather may be in flight: it is dropped, never waited for (a peer may
        # be gone); the group goes with the process.
        if self.group is not None and self.pending is None:
            with contextlib.suppress(Exception):  # nothing left to release is no failure
                dist.destroy_process_group(self.group)
            self.group = None

    # ------------------------------------------------------------------------------ full

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

    # ------------------------------------------------------------------------------ rolling

    def _start_rolling(self, loop: Loop) -> None:
        run = loop.run
        # The same answer on every rank (layout and devices are), so all or none make the group.
        why = "sharded layout: compared by logical digests" if is_sharded(run.sync) else None
        why = why or supported(run.model, run.optimizer)
        if why is not None:
            loop.result.extras["replica_check"] = {"mode": "full", "rolling_not_used": why}
            return
        self.rolling = RollingDigest(run.model, run.optimizer, self.slices, buffers=self.buffers == "compare")
        if loop.world.distributed:
            # A group of its own: the background gather never queues behind (or ahead of) DDP's
            # all-reduces, and its timeout bounds every wait.
            self.group = dist.new_group(timeout=timedelta(seconds=self.timeout_s))

    def _launch(self, loop: Loop, coverage: Coverage) -> None:
        """Start gathering every rank's rolling digest; judged at the next check (`_settle`)."""
        mine = torch.frombuffer(bytearray(self.rolling.value), dtype=torch.uint8)
        if self.group is None:
            self.pending = _Pending(coverage, None, [mine])
            return
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(self.group))]
        work = dist.all_gather(gathered, mine, group=self.group, async_op=True)
        self.pending = _Pending(coverage, work, gathered)

    def _settle(self, loop: Loop, step: int) -> bool | None:
        """Judge the rolling check in flight (None: none was); on a difference, a full check now."""
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        if pending.work is not None:
            pending.work.wait(timedelta(seconds=self.timeout_s))  # the group's timeout bounds it too
        digests = [bytes(t.tolist()).hex() for t in pending.gathered]
        self.rolling_checks += 1
        loop.result.checks += 1
        self.last_coverage = pending.coverage
        if len(set(digests)) == 1:
            return True
        result = loop.result
        if result.first_divergence is not None:
            return False  # already found, localized and recorded: no second full check per step
        # Every rank saw the same digests, so every rank joins this full check: where, and why.
        run = loop.run
        report = compare_replicas(run.wrapped, run.optimizer, grads="on_divergence", step=step, buffers=self.buffers)
        report.coverage = pending.coverage.to_dict()
        if report.in_sync:
            # The slice differed at that step and nothing differs now (overwritten since, on
            # every rank): still a divergence, named by the slice, without elements.
            odd, _, strict = vote([f"xxh3_128:{d}" for d in digests])
            report.differing = {f"extra/rolling/slice{pending.coverage.slice}": odd}
            report.majority = {f"extra/rolling/slice{pending.coverage.slice}": strict}
        result.first_divergence = report.to_dict()
        return False

    def _account(self) -> dict[str, Any]:
        """What the rolling checks covered: the run's record (`result.extras["replica_check"]`)."""
        r = self.rolling
        last = getattr(self, "last_coverage", None)
        return {
            "mode": "rolling",
            "slices": r.slices,
            "state_bytes": r.state_bytes,
            "every": self.every,
            # a difference present after step t is in a digested slice by step t + this, and
            # reported by the check after that one
            "bound_steps": r.slices * max(self.every, 1),
            "rolling_checks": self.rolling_checks,
            "plan_rebuilds": r.rebuilds,
            "last_rolling": last.to_dict() if last is not None else None,
        }
