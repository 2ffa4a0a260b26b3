"""The loop: steps of the one step (`distshare.training.step`), each handed to components.

The loop runs `cfg.steps` steps and keeps the run's account (`TrainResult`: the global loss
of every step, the samples each micro-batch consumed). Everything else — checking replicas,
writing checkpoints and metrics, showing progress, whatever a command or a test adds — is a
`Component` that the loop calls at fixed points and that decides for itself when to act
(torchtitan's trainer does the same with its checkpointer). The loop imports none of them.

Per step, in this order:

    component.before_step(loop, step)
    the step; `on_local_grads` when a component `wants_local_grads(step)` (before the sync)
    component.after_step(loop, step, row)     observe the new state; may add fields to the metrics row
    the row joins the loss log
    component.step_end(loop, step)            act on it: save a checkpoint, inject a fault
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from distshare.distributed.world import World
from distshare.training.step import Run, train_step

C = TypeVar("C", bound="Component")


class Component:
    """Something the loop hands each step to. Every hook is optional (the defaults do nothing).

    Components are plain picklable objects: an engine hands the same list to every rank,
    and each rank's process works on its own copy.
    """

    def begin(self, loop: Loop) -> None:
        """Before the first step. A component that restores a run sets `loop.first_step`."""

    def before_step(self, loop: Loop, step: int) -> None:
        """Before `step` starts."""

    def wants_local_grads(self, step: int) -> bool:
        """Should `on_local_grads` be called at `step`? (It costs a look at every gradient.)"""
        return False

    def on_local_grads(self, loop: Loop, step: int) -> None:
        """`.grad` holds what this rank computed alone: the last point before the sync."""

    def after_step(self, loop: Loop, step: int, row: dict[str, Any]) -> None:
        """`step` is done (synced, optimizer stepped). Look at the state; add fields to `row`."""

    def step_end(self, loop: Loop, step: int) -> None:
        """After every component looked at `step` and its row was logged: act on the state."""

    def on_losses(self, loop: Loop, rows: list[dict[str, Any]]) -> None:
        """Metrics rows whose global loss is now known (`row["loss"]`), in step order."""

    def end(self, loop: Loop) -> None:
        """After the last step (not called when the loop fails)."""

    def close(self, loop: Loop) -> None:
        """Always, last: release files and displays, also when the loop failed."""


@dataclass
class TrainResult:
    """One rank's account of a run; rank 0's is what reports are made of."""

    rank: int
    world_size: int
    steps: int
    losses: list[float] = field(default_factory=list)  # global mean loss per step
    checks: int = 0
    first_divergence: dict[str, Any] | None = None  # the first failing ReplicaReport, as a dict
    final_report: dict[str, Any] | None = None
    final_fingerprint: str = ""
    # lsh128 digest of the final LOGICAL state (whole tensors, whatever the layout): equal for
    # the same training under ddp, fsdp, hsdp and one process (distshare.integrity.logical)
    logical_fingerprint: str = ""
    parallel: str = "ddp"  # the data-parallel layout: ddp | fsdp | hsdp | single process
    mesh: tuple[int, int] | None = None  # sharded layouts: (replicate, shard) sizes of the device mesh
    samples_by_step: list[list[list[int]]] = field(default_factory=list)  # step -> micro -> indices
    state: dict[str, torch.Tensor] | None = None  # the final parameters and buffers, if a component kept them
    seconds: float = 0.0
    dropped_per_epoch: int = 0
    engine: str = "local"  # the --engine that ran it: local, torch, accelerate, ray
    launcher: str | None = None  # who started the processes: spawn, torchrun, accelerate, ray (None: one process)
    sync: str = "local"  # how gradients were synchronized (GradSync.name)
    device: str = "cpu"
    # Exact mode: gradient contributions below its fixed-point resolution, rounded to 0 (all steps, all ranks)
    exact_underflows: int | None = None
    restart: int = 0  # the launcher's restart count of this worker (torchrun, Ray Train); 0: first attempt
    resumed: dict[str, Any] | None = None  # the checkpoint this run continued from
    extras: dict[str, Any] = field(default_factory=dict)  # what components report, by component

    def layout_facts(self) -> dict[str, Any]:
        """The layout this run trained under, and the digest that compares runs across layouts."""
        return {
            "parallel": self.parallel,
            "mesh": list(self.mesh) if self.mesh else None,  # [replicate, shard]; None: ddp or one process
            # the final whole (logical) tensors' lsh128 digests, combined: equal for the same
            # training under any layout (distshare.integrity.logical)
            "logical_fingerprint": self.logical_fingerprint,
        }

    @property
    def replicas_in_sync(self) -> bool:
        return self.first_divergence is None and bool(self.final_report and self.final_report["in_sync"])


class Loop:
    """What components see: the run, its account so far, and each other."""

    def __init__(self, run: Run, result: TrainResult, components: Sequence[Component]) -> None:
        self.run, self.result, self.components = run, result, list(components)
        self.first_step = 0  # a component that restores a checkpoint moves it
        self.failure: BaseException | None = None  # why the loop stopped early, for `close` to record
        self._log = _LossLog(run.world, self)

    @property
    def world(self) -> World:
        return self.run.world

    @property
    def steps(self) -> int:
        return self.run.cfg.steps

    def find(self, kind: type[C]) -> C | None:
        """The first component of this type, if the loop has one."""
        return next((c for c in self.components if isinstance(c, kind)), None)

    def flush_losses(self) -> None:
        """Reduce the pending steps' losses now (a collective): e.g. before a checkpoint stores them."""
        self._log.flush()

    def unreduced_rows(self) -> list[dict[str, Any]]:
        """The rows of steps that ran but whose global loss was not reduced yet (at most a
        window's worth): what a failed loop can still say about them, without a collective."""
        return [dict(row) for row in self._log.rows]


def run_loop(run: Run, result: TrainResult, components: Sequence[Component]) -> TrainResult:
    """Train `run` for `cfg.steps` steps, handing every step to `components` (in list order)."""
    loop = Loop(run, result, components)
    start = time.perf_counter()
    try:
        for c in loop.components:
            c.begin(loop)
        for step in range(loop.first_step, loop.steps):
            for c in loop.components:
                c.before_step(loop, step)
            stats = train_step(run, step, _local_grads_call(loop, step))
            result.samples_by_step.append(stats.indices)
            row: dict[str, Any] = {"step": step, "global_items": stats.global_items}
            for c in loop.components:
                c.after_step(loop, step, row)
            row["seconds"] = round(time.perf_counter() - start, 6)
            loop._log.add(row, stats.loss_sum)
            for c in loop.components:
                c.step_end(loop, step)
            loop._log.flush_if_full()
        loop.flush_losses()
        for c in loop.components:
            c.end(loop)
    except BaseException as exc:  # Ctrl-C included: the components' `close` records what ran
        loop.failure = exc
        raise
    finally:
        for c in loop.components:
            c.close(loop)
    result.seconds = time.perf_counter() - start
    result.exact_underflows = run.sync.underflows
    return result


def _local_grads_call(loop: Loop, step: int) -> Callable[[], None] | None:
    """What the step calls when `.grad` holds this rank's own gradient; None if no one wants it."""
    probes = [c for c in loop.components if c.wants_local_grads(step)]
    if not probes:
        return None

    def call() -> None:
        for c in probes:
            c.on_local_grads(loop, step)

    return call


class _LossLog:
    """Global mean losses, one per step, reduced a window of steps at a time.

    The global loss needs the ranks' loss sums added up: one more collective. Once per step
    it would be a second point per step where every rank waits for the slowest; one
    all-reduce of a vector of `window` sums costs that wait once per window. The losses are
    exactly the same.
    """

    def __init__(self, world: World, loop: Loop, window: int = 10):
        self.world, self.loop, self.window = world, loop, window
        self.rows: list[dict[str, Any]] = []
        self.sums: list[float] = []

    def add(self, row: dict[str, Any], loss_sum: float) -> None:
        self.rows.append(row)
        self.sums.append(loss_sum)

    def flush_if_full(self) -> None:
        if len(self.rows) >= self.window:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        totals = torch.tensor(self.sums, dtype=torch.float64, device=self.world.collective_device)
        if self.world.distributed:
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        done = []
        for row, total in zip(self.rows, totals.tolist(), strict=True):
            loss = total / row["global_items"]
            self.loop.result.losses.append(loss)
            done.append({"step": row["step"], "loss": loss, **row})
        self.rows, self.sums = [], []
        for c in self.loop.components:
            c.on_losses(self.loop, done)
