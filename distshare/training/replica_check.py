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
within `slices` checks) and keeps its 16-byte rolling digest (of all slices, as last taken);
every `batch` checks (config `check_batch`) one all_gather compares the digests of those
checks, in the background, on a group of its own, while the next step trains; it is judged at
the next check (a bounded wait). A difference makes that check a full one (every byte,
localized and diagnosed, as above), its report saying in which step's state and which slice
the rolling check first saw it (`ReplicaReport.coverage`: the first differing digest of the
batch, not the last). So a corruption present after step t is in a digested slice by step
t + slices x every and reported by step t + (slices + batch) x every (`rolling.bound`). The
check before the first step and the one after the last are always full, and the last one
first compares the digests still held (a partial batch). The metrics row of a step that
judged a batch lists the steps whose states it covered (`checked_steps`) and, when they
differed, the first that did (`first_differing_step`). It covers host (CPU) replicas; a
sharded or device-resident state keeps the full checks (`result.extras["replica_check"]`
says which mode ran, and why). Buffers checked apart (`check_buffers: separate`) are left to
the full checks at both ends.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from distshare.distributed.sync import is_sharded
from distshare.integrity.fingerprint import state_digest
from distshare.integrity.logical import LOGICAL_ALGORITHM
from distshare.integrity.replicas import compare_replicas
from distshare.integrity.rolling import BATCH, Exchange, RollingDigest, Verdict, bound, mark_unlocalized, supported
from distshare.training.loop import Component, Loop

MODES = ("full", "rolling")


class ReplicaChecker(Component):
    """Compare replicas every `every` steps (0: only after the last step); `mode`: full | rolling.

    `batch`: rolling checks whose digests one gather compares (config `check_batch`).
    """

    def __init__(
        self,
        every: int,
        buffers: str = "compare",
        mode: str = "full",
        slices: int = 0,
        timeout_s: float = 120.0,
        batch: int = BATCH,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
        if batch < 1:
            raise ValueError(f"batch={batch}: expected a positive number of checks per gather")
        self.every, self.buffers = every, buffers  # buffers: compare | separate | ignore (config check_buffers)
        self.mode, self.slices, self.timeout_s, self.batch = mode, slices, timeout_s, batch
        self.rolling: RollingDigest | None = None
        self.exchange: Exchange | None = None
        self.group: Any = None

    def due(self, step: int, steps: int) -> bool:
        return step == steps - 1 or bool(self.every and (step + 1) % self.every == 0)

    def after_step(self, loop: Loop, step: int, row: dict[str, Any]) -> None:
        if not self.due(step, loop.steps):
            return
        last = step == loop.steps - 1
        if self.rolling is None:
            row["replicas_in_sync"] = self._check(loop, step, last=last)
            return
        verdicts = [self._settle(loop, step)]
        if last:
            # The digests still held (a partial batch) are compared now, then the last state in full:
            # the run's fingerprint is the state's.
            self.exchange.flush()
            verdicts.append(self._settle(loop, step))
            full = self._check(loop, step, last=True)
            row["replicas_in_sync"] = full and all(v.agreed for v in verdicts if v is not None)
            _name_steps(row, verdicts, own=(step, full))
            return
        coverage = self.rolling.advance(step)
        self.exchange.add(coverage, self.rolling.value)  # a gather starts when `batch` are held
        if verdicts[0] is not None:
            row["replicas_in_sync"] = verdicts[0].agreed
            _name_steps(row, verdicts)

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
        if self.group is not None and (self.exchange is None or self.exchange.in_flight is None):
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
        self.exchange = Exchange(self.group, self.batch, self.timeout_s)

    def _settle(self, loop: Loop, step: int) -> Verdict | None:
        """Judge the gather in flight (None: none was); on a difference, a full check now."""
        verdict = self.exchange.settle()
        if verdict is None:
            return None
        loop.result.checks += len(verdict.compared)  # each compared digest: one step's state checked
        self.last_coverage = verdict.compared[-1]
        result = loop.result
        if verdict.agreed or result.first_divergence is not None:
            return verdict  # a difference already found, localized and recorded: no second full check
        # Every rank saw the same digests, so every rank joins this full check: where, and why.
        run = loop.run
        report = compare_replicas(run.wrapped, run.optimizer, grads="on_divergence", step=step, buffers=self.buffers)
        report.coverage = verdict.coverage()
        if report.in_sync:
            mark_unlocalized(report, verdict)
        result.first_divergence = report.to_dict()
        return verdict

    def _account(self) -> dict[str, Any]:
        """What the rolling checks covered: the run's record (`result.extras["replica_check"]`)."""
        r = self.rolling
        last = getattr(self, "last_coverage", None)
        return {
            "mode": "rolling",
            "slices": r.slices,
            "state_bytes": r.state_bytes,
            "every": self.every,
            "batch": self.batch,
            # a difference present after step t is in a digested slice by step t + digested_within_steps
            # and reported (localized, diagnosed) by step t + reported_within_steps
            **bound(r.slices, self.batch, self.every),
            "rolling_checks": self.exchange.compared,
            "gathers": self.exchange.gathers,
            "plan_rebuilds": r.rebuilds,
            "last_rolling": last.to_dict() if last is not None else None,
        }


def _name_steps(row: dict[str, Any], verdicts: list[Verdict | None], own: tuple[int, bool] | None = None) -> None:
    """The metrics row of a step that judged rolling digests: the steps whose states they covered
    (`checked_steps`; with `own`, the row's step and its full check's verdict, last) and, when
    any differed, the first that did (`first_differing_step`); the steps before it agreed."""
    judged = [v for v in verdicts if v is not None]
    row["checked_steps"] = [s for v in judged for s in v.steps] + ([own[0]] if own is not None else [])
    first = next((v.differing.state_step for v in judged if not v.agreed), None)
    if first is None and own is not None and not own[1]:
        first = own[0]
    if first is not None:
        row["first_differing_step"] = first
