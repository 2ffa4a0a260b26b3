"""`distshare.watch`: the right replica checks at the right points of a user's own loop.

    watcher = distshare.watch(ddp_model, optimizer, every=10)   # a collective: every rank, same point
    for batch in loader:
        optimizer.zero_grad()
        loss_fn(ddp_model(batch)).backward()
        optimizer.step()          # every 10th step: compare replicas, gradients included
    watcher.close()               # a last check, hooks removed

    with distshare.watch(ddp_model, optimizer) as watcher:    # the same, as a context manager
        train(...)

Where the checks go, and why there:

- **when created**: the starting point, before the first update. A difference here is the
  initial weights (`init_mismatch`); later diagnoses build on this check having agreed.
- **right after `optimizer.step()`** (an optimizer step hook), every `every`-th step: the
  gradients the optimizer just used are still in `.grad`, so a gradient DDP never reduced is
  seen as such, not later as drifted optimizer state. By default they are digested only when
  the state differs (`grads="on_divergence"`: free while replicas agree); `grads=True`
  compares them at every check.
- **over the whole step, with `data_parallel=True`**: is the step really data-parallel? Did
  the ranks see different inputs, do their local gradients differ before the sync, is the
  synced gradient their mean (`distshare.integrity.data_parallel`)? Hooks armed after the
  step before each checked one, judged right after its `optimizer.step()`; a run where every
  rank trains alone on all the data raises `NotDataParallelError` naming the likely cause.
  Off by default: it costs one all-reduce of the gradients per check.
- **as each training forward begins** (a forward pre-hook on the module, which runs after
  DDP's buffer broadcast) the buffers are digested, not compared: that is how the report
  tells DDP's normal per-forward broadcast from buffers that are never synced.

On an FSDP2 / HSDP model (`fully_shard`) nothing changes for the user: the checks read the
mesh from the model's DTensors and compare each shard with the same shard in the other
replica groups (HSDP); under pure FSDP, where no shard has a copy, the reports say so
(`ReplicaReport.layout`) and only the replicated tensors are compared.

`mode="rolling"` makes the checks between the first and the last cheap enough for every step
(`distshare.integrity.rolling`): each digests one slice of the state (all of it within
`slices` checks) and keeps its 16-byte rolling digest; every `batch` checks one all_gather
compares those digests in the background while training goes on, judged at the next check (a
bounded wait). A difference makes that check a full one (localized, diagnosed, raised), its
report naming the step and slice whose digest first differed (`ReplicaReport.coverage`). A
flipped bit present after step t is so reported by step t + (slices + batch) x every. The
first check and `close()`'s are full, and `close()` first compares the digests still held; host
(CPU), unsharded replicas only (else every check stays full: `watcher.mode` says which ran).

Its checks run on a process group of their own, with a timeout, so they never interleave
with DDP's all-reduces. A rank that calls `optimizer.step()` twice without a forward in
between is counted (`optim/steps_taken` is compared like any state) but not checked a second
time, so every rank's checks stay at the same points; a rank that skips a step leaves its peers
waiting at the check, which then fails after `timeout_s` naming what to look for.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distshare.errors import VerificationFailed
from distshare.integrity.data_parallel import DataParallelCheck, DataParallelReport, NotDataParallelError
from distshare.integrity.fingerprint import fingerprint_many
from distshare.integrity.logical import is_dtensor
from distshare.integrity.replicas import (
    Extra,
    ReplicaDivergenceError,
    ReplicaReport,
    check_modes,
    compare_snapshot,
    take_snapshot,
)
from distshare.integrity.rolling import BATCH, Exchange, RollingDigest, Verdict, mark_unlocalized, supported
from distshare.integrity.state import innermost_optimizer, unwrap


class ReplicaCheckTimeout(VerificationFailed):
    """The ranks did not all reach a replica check within the timeout."""


class Watch:
    """Replica checks placed by hooks: a baseline now, then after every `every`-th optimizer step."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        every: int = 1,
        grads: bool | str = "on_divergence",
        buffers: str = "compare",
        extra: Extra = None,
        raise_on_divergence: bool = True,
        locate: bool | int = 16,
        timeout_s: float = 300.0,
        keep: int = 100,
        data_parallel: bool | Mapping[str, Any] = False,
        mode: str = "full",
        slices: int = 0,
        batch: int = BATCH,
    ) -> None:
        if every < 1:
            raise ValueError(f"every={every}: expected a positive number of optimizer steps")
        if mode not in ("full", "rolling"):
            raise ValueError(f"mode={mode!r}: expected 'full' or 'rolling'")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch={batch!r}: expected a positive number of checks per gather")
        check_modes(grads, buffers)  # before any hook is registered
        optimizer = innermost_optimizer(optimizer)  # accelerate's wrapper has no hook tables: hook the one inside
        self.model, self.optimizer = model, optimizer
        self.every, self.grads, self.buffers, self.extra = every, grads, buffers, extra
        self.raise_on_divergence, self.locate, self.timeout_s = raise_on_divergence, locate, timeout_s
        self.steps = 0  # optimizer.step() calls seen on this rank
        self.iterations = 0  # of them, the steps with a training forward before them: what `every` counts
        self.checks = 0
        self.reports: deque[ReplicaReport] = deque(maxlen=keep)  # the latest checks' reports
        self.first_divergence: ReplicaReport | None = None
        self._checked_at = -1  # self.steps at the last check
        self._forwards = 0
        self._forward_since_step = False
        self._entry_buffers: dict[str, str] | None = None
        self._group = None
        if dist.is_available() and dist.is_initialized():
            # A group of its own (a collective: every rank creates the watch at the same point).
            self._group = dist.new_group(timeout=timedelta(seconds=timeout_s))
        # The data-parallel check (options: a mapping of DataParallelCheck's), on this group.
        self.data_parallel: DataParallelCheck | None = None
        self.data_parallel_report: DataParallelReport | None = None  # the latest
        self.first_not_parallel: DataParallelReport | None = None
        if data_parallel:
            dp_options = dict(data_parallel) if isinstance(data_parallel, Mapping) else {}
            self.data_parallel = DataParallelCheck(model, timeout_s=timeout_s, group=self._group, **dp_options)
        # Rolling checks (mode="rolling"): the same answer on every rank, so all or none make the group.
        self.mode, self.rolling, self.exchange = "full", None, None
        self._rolling_group = None
        self._rolling_verdict: Verdict | None = None  # set while the full check after a rolling difference runs
        self.rolling_not_used: str | None = None
        if mode == "rolling":
            why = supported(model, optimizer) if extra is None else "extra state is digested by full checks"
            if why is None and any(is_dtensor(p) for p in unwrap(model).parameters()):
                why = "sharded model: compared by logical digests"
            self.rolling_not_used = why
            if why is None:
                self.mode = "rolling"
                self.rolling = RollingDigest(model, optimizer, slices, buffers=buffers == "compare")
                if self._group is not None:  # its own: a gather in flight never meets another check's
                    self._rolling_group = dist.new_group(timeout=timedelta(seconds=timeout_s))
                self.exchange = Exchange(self._rolling_group, batch, timeout_s)
        inner = unwrap(model)
        self._watch_buffers = buffers != "ignore" and any(True for _ in inner.buffers())
        self._handles = [
            optimizer.register_step_post_hook(self._after_step),
            inner.register_forward_pre_hook(self._before_forward),
        ]
        try:
            self.check()  # the starting point
        except BaseException:
            self.remove()  # a watch that failed to start leaves no hook behind
            raise
        self._arm_data_parallel()

    # ------------------------------------------------------------------------------ the hooks

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation (possibly on one rank only) is not a training step
        self._forwards += 1
        first_since_step = not self._forward_since_step
        self._forward_since_step = True
        # The buffers as this forward receives them, after DDP's broadcast; from the second
        # forward on, when an earlier forward has changed them (at the first, every rank
        # still holds its initial buffers, synced or not).
        if self._watch_buffers and first_since_step and self._forwards >= 2:
            self._entry_buffers = fingerprint_many({f"buffer/{n}": b for n, b in module.named_buffers()})

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.steps += 1
        if self._forwards and not self._forward_since_step:
            return  # a second step without a forward between: counted, not checked (see the module doc)
        self._forward_since_step = False
        self.iterations += 1
        if self.iterations % self.every == 0:
            if self.rolling is None:
                self.check(step=self.iterations - 1)
            else:
                self._rolling_check(step=self.iterations - 1)
            self.check_data_parallel(step=self.iterations - 1)
        self._arm_data_parallel()

    def _arm_data_parallel(self) -> None:
        # The hooks watch only the step before a check: armed once the step before it is over.
        if self.data_parallel is not None and (self.iterations + 1) % self.every == 0:
            self.data_parallel.arm()

    # ------------------------------------------------------------------------------ the checks

    def check(self, step: int | None = None) -> ReplicaReport:
        """Collective: compare the replicas now (every rank must call it at the same point)."""
        snapshot = take_snapshot(
            self.model, self.optimizer, self.grads, self.buffers, self.extra, steps_taken=self.steps
        )
        snapshot.forward_buffers = self._entry_buffers
        try:
            report = compare_snapshot(self.model, snapshot, step, self._group, self.locate, self.buffers)
        except RuntimeError as exc:
            if "timeout" not in str(exc).lower() and "timed out" not in str(exc).lower():
                raise
            at = f"step {step}" if step is not None else "the start"
            raise ReplicaCheckTimeout(
                f"distshare.watch: the replica check at {at} timed out after {self.timeout_s:g} s: some rank "
                "did not reach it (it skipped an optimizer.step(), stepped inside a rank-dependent branch, or stopped)"
            ) from None
        self.checks += 1
        self._checked_at = self.steps
        verdict = self._rolling_verdict
        if verdict is not None:  # the full check after rolling digests differed
            report.coverage = verdict.coverage()
            if report.in_sync:
                mark_unlocalized(report, verdict)
        self.reports.append(report)
        if not report.in_sync and self.first_divergence is None:
            self.first_divergence = report
        if not report.in_sync and self.raise_on_divergence:
            raise ReplicaDivergenceError(report)
        return report

    def _rolling_check(self, step: int) -> None:
        """Judge the gather in flight (a full check if it differed), then digest this step's slice."""
        self._settle(step)
        coverage = self.rolling.advance(step)
        self.exchange.add(coverage, self.rolling.value)  # a gather starts when `batch` are held
        self._checked_at = self.steps

    def _settle(self, step: int | None) -> None:
        try:
            verdict = self.exchange.settle()
        except RuntimeError as exc:
            steps = [c.state_step for c in self.exchange.waited_for]
            raise ReplicaCheckTimeout(
                f"distshare.watch: the rolling check of steps {steps[0]}-{steps[-1]} timed out after "
                f"{self.timeout_s:g} s: some rank did not reach it ({exc})"
            ) from None
        if verdict is None:
            return
        self.checks += len(verdict.compared)
        if verdict.agreed or self.first_divergence is not None:
            return
        # Every rank saw the same digests: every rank joins this full check (localize, diagnose, raise).
        self._rolling_verdict = verdict
        try:
            self.check(step)
        finally:
            self._rolling_verdict = None

    @property
    def rolling_checks(self) -> int:
        """Rolling digests compared so far (each: one checked step's state)."""
        return self.exchange.compared if self.exchange is not None else 0

    def check_data_parallel(self, step: int | None = None) -> DataParallelReport | None:
        """Collective: judge the step the data-parallel check watched (None: off, or not armed)."""
        if self.data_parallel is None or not self.data_parallel.armed:
            return None
        report = self.data_parallel.verify(step)
        self.data_parallel_report = report
        if not report.ok and self.first_not_parallel is None:
            self.first_not_parallel = report
        if not report.ok and self.raise_on_divergence:
            raise NotDataParallelError(report)
        return report

    def close(self) -> ReplicaReport | None:
        """A last check if steps were taken since the last one; then the hooks are removed."""
        report = None
        try:
            if self.exchange is not None:
                self._settle(self.iterations - 1)  # may raise: the last rolling checks differed
                self.exchange.flush()  # the digests still held (a partial batch), compared now
                self._settle(self.iterations - 1)
            if self._handles and (self.steps != self._checked_at or self.rolling is not None):
                report = self.check(step=self.iterations - 1)  # the last check is a full one
        finally:
            self.remove()
        return report

    def remove(self) -> None:
        """Remove the hooks without a last check."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.data_parallel is not None:
            self.data_parallel.remove()

    @property
    def in_sync(self) -> bool:
        return self.first_divergence is None

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if kind is None:
            self.close()
        else:
            self.remove()  # an error is on its way: no collective that peers may never join


def watch(model: nn.Module, optimizer: torch.optim.Optimizer, every: int = 1, **options: Any) -> Watch:
    """Watch a training loop's replicas: a check now, then after every `every`-th `optimizer.step()`.

    A collective at creation (every rank creates it at the same point). Pass the DDP-wrapped
    model where there is one: what it wrapped is evidence. Raises `ReplicaDivergenceError`
    from `optimizer.step()` on every rank when replicas differ (or records it in
    `first_divergence`, with `raise_on_divergence=False`). Use it as a context manager, or call
    `close()` after the loop for the last check. `options`: those of `Watch` (grads, buffers,
    extra, raise_on_divergence, locate, timeout_s, keep, data_parallel, mode, slices, batch).
    `mode="rolling"`: cheap checks at every step, one slice of the state each, their digests
    compared `batch` checks at a time in the background (see the module doc); `data_parallel=True`
    also checks each checked step is data-parallel (`NotDataParallelError`; a mapping passes
    options such as `replicated_inputs=True` or `reduction="sum"`).
    """
    return Watch(model, optimizer, every, **options)
