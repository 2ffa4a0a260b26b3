"""Fault injection: the ways replicas silently part, each runnable, each caught by the checks.

Every fault is a function `fault(world, faulty_rank, inject_at) -> FaultOutcome` meant to run
on every rank of a spawned world (`run_distributed(run_fault, 3, "bit_flip")`). It trains
with the real loop (`distshare.training.train`, replicas checked at every step), injects the
fault on one rank through the loop's `on_step` hook or its `sync`, and returns what the loop
recorded: the first check that failed, its step, and the full `ReplicaReport`.

    bit_flip           one bit of one parameter element flipped on one rank
    skipped_allreduce  one rank keeps its local gradient for one step (it still joins the
                       collective, so no one hangs; it just does not use the sum)
    different_seed     one rank initializes its parameters from another seed (with the
                       explicit all-reduce sync: DDP would broadcast rank 0's parameters at
                       wrap time and heal it)
    unsynced_buffers   BatchNorm under DDP with broadcast_buffers=False: every rank's running
                       statistics follow its own micro-batches
    optimizer_drift    one element of one rank's Adam first moment scaled by 1.001 (a 1-ULP
                       nudge is not enough: the next update's rounding can absorb it)

With 3 ranks a strict majority names the faulty rank alone; the buffers fault has no single
faulty rank (each rank drifts its own way) and is reported on every rank, without majority.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distshare.config import RunConfig, load_config
from distshare.distributed.sync import AllReduceSync, DDPSync, sum_hook
from distshare.distributed.world import World
from distshare.engines.runner import StepMarker
from distshare.integrity.checkpoint import MODEL_FILE
from distshare.integrity.replicas import ReplicaReport
from distshare.training import Component, Loop, Run, train
from distshare.training.checkpointer import Checkpointer

BIT_FLIP_TENSOR = "layers.0.attn.W_Q.weight"
BIT_FLIP_ELEMENT = (3, 5)  # (row, column) of W_Q's weight
BIT_FLIP_BIT = 20  # a float32 mantissa bit: the value moves by about 1e-1 relative, never NaN
DRIFT_TENSOR = "layers.1.ff.0.weight"
DRIFT_ELEMENT = 7  # flat index: row 0, column 7


@dataclass
class FaultOutcome:
    """What the loop saw: where the fault went in, and the first check that failed."""

    fault: str
    faulty_rank: int | None  # None: every rank drifts its own way (unsynced buffers)
    injected_at: int  # the fault is in place from the check after this step on (-1: from the start)
    detected_at: int | None  # step of the first failing check (-1: the one before the first step; None: never)
    checks: int
    report: ReplicaReport | None  # the first failing check's report
    expected_tensor: str  # a tensor the report must name
    expected_index: list[int] | None = None  # the element the report must name, if one
    expected_cause: str = ""  # the diagnosis the report must give (distshare.integrity.diagnosis)


def base_config(world_size: int, steps: int, overrides: list[str] | None = None) -> RunConfig:
    """A tiny transformer run, checked at every step: seconds, not minutes, on 2 cores."""
    return load_config(
        None,
        [
            f"plan.world_size={world_size}",
            f"plan.global_batch={4 * world_size}",
            "plan.accum_steps=2",
            "plan.micro_batch=null",
            "data.num_samples=96",
            f"steps={steps}",
            "check_every=1",
            "optim.name=adam",
            *(overrides or []),
        ],
    )


# The diagnosis each fault must get. The drifted Adam moment is one element of one rank: by
# its evidence it is corruption (a few elements, everything else equal), whatever wrote it.
EXPECTED_CAUSES = {
    "bit_flip": "corruption",
    "skipped_allreduce": "grads_not_synced",
    "different_seed": "init_mismatch",
    "unsynced_buffers": "buffers_only",
    "optimizer_drift": "corruption",
}
BEFORE_FIRST_STEP = -1  # `detected_at` of the check before the first step (divergences.BASELINE too)


def _outcome(
    name: str, result: Any, faulty: int | None, at: int, tensor: str, index: list[int] | None = None
) -> FaultOutcome:
    first = result.first_divergence
    report = ReplicaReport.from_dict(first) if first else None
    detected = None if report is None else BEFORE_FIRST_STEP if report.step is None else report.step
    return FaultOutcome(name, faulty, at, detected, result.checks, report, tensor, index, EXPECTED_CAUSES[name])


def _param(run: Run, name: str) -> nn.Parameter:
    return dict(run.model.named_parameters())[name]


def bit_flip(world: World, faulty_rank: int = 0, inject_at: int = 2, steps: int = 5) -> FaultOutcome:
    """Flip one bit of one element of W_Q on one rank, after step `inject_at`'s check."""

    def hook(run: Run, step: int) -> None:
        if step == inject_at and world.rank == faulty_rank:
            with torch.no_grad():
                words = _param(run, BIT_FLIP_TENSOR).view(torch.int32)
                words[BIT_FLIP_ELEMENT] ^= 1 << BIT_FLIP_BIT

    result = train(base_config(world.world_size, steps), world, progress=False, on_step=hook)
    return _outcome("bit_flip", result, faulty_rank, inject_at, f"param/{BIT_FLIP_TENSOR}", list(BIT_FLIP_ELEMENT))


class _SkipOnce(AllReduceSync):
    """The explicit all-reduce, except that one rank throws the sum away at one step."""

    def __init__(self, rank: int, faulty_rank: int, skip_step: int):
        self.rank, self.faulty_rank, self.skip_step, self.calls = rank, faulty_rank, skip_step, 0

    def synchronize(self, model: nn.Module) -> None:
        step, self.calls = self.calls, self.calls + 1
        if step != self.skip_step or self.rank != self.faulty_rank:
            super().synchronize(model)
            return
        local = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
        super().synchronize(model)  # still takes part, so the other ranks are not left waiting
        for p, g in zip(model.parameters(), local, strict=True):
            if g is not None:
                p.grad.copy_(g)


def skipped_allreduce(world: World, faulty_rank: int = 0, inject_at: int = 2, steps: int = 5) -> FaultOutcome:
    """One rank updates with its own local gradient at step `inject_at + 1`."""
    cfg = base_config(world.world_size, steps, ["sync=allreduce"])
    sync = _SkipOnce(world.rank, faulty_rank, inject_at + 1)
    result = train(cfg, world, progress=False, sync=sync)
    return _outcome("skipped_allreduce", result, faulty_rank, inject_at, f"param/{BIT_FLIP_TENSOR}")


def different_seed(world: World, faulty_rank: int = 0, inject_at: int = -1, steps: int = 3) -> FaultOutcome:
    """One rank builds its model from seed 1, the others from seed 0 (explicit all-reduce sync)."""
    cfg = base_config(world.world_size, steps, ["sync=allreduce"])
    if world.rank == faulty_rank:
        cfg = dataclasses.replace(cfg, seed=cfg.seed + 1)
    result = train(cfg, world, progress=False)
    return _outcome("different_seed", result, faulty_rank, inject_at, f"param/{BIT_FLIP_TENSOR}")


class _NoBufferBroadcast(DDPSync):
    """DDP as distshare uses it, but with broadcast_buffers=False."""

    def wrap(self, model: nn.Module) -> nn.Module:
        with warnings.catch_warnings():  # newer torch renames the flag; the old one still means "no sync at all"
            warnings.simplefilter("ignore", FutureWarning)
            ddp = DistributedDataParallel(model, broadcast_buffers=False)
        ddp.register_comm_hook(state=None, hook=sum_hook)
        return ddp


def unsynced_buffers(world: World, faulty_rank: int | None = None, inject_at: int = -1, steps: int = 3) -> FaultOutcome:
    """A BatchNorm CNN under DDP without buffer broadcast: running stats are per rank."""
    cfg = base_config(
        world.world_size,
        steps,
        ["model.name=cnn", "model.norm=batch", "data.name=shapes", "optim.name=sgd", "optim.lr=0.05"],
    )
    result = train(cfg, world, progress=False, sync=_NoBufferBroadcast())
    return _outcome("unsynced_buffers", result, None, inject_at, "buffer/features.1.running_mean")


def optimizer_drift(world: World, faulty_rank: int = 0, inject_at: int = 2, steps: int = 5) -> FaultOutcome:
    """Scale one element of one rank's Adam first moment by 1.001.

    One ULP would be the smallest drift, but it does not survive: the next step computes
    beta1 * m + (1 - beta1) * g, and that rounding can map both ranks' m to the same value
    (measured: a 1-ULP nudge of this element was gone by the next check).
    """

    def hook(run: Run, step: int) -> None:
        if step == inject_at and world.rank == faulty_rank:
            state = run.optimizer.state[_param(run, DRIFT_TENSOR)]
            with torch.no_grad():
                m = state["exp_avg"].view(-1)
                m[DRIFT_ELEMENT] *= 1.001

    result = train(base_config(world.world_size, steps), world, progress=False, on_step=hook)
    return _outcome("optimizer_drift", result, faulty_rank, inject_at, f"optim/{DRIFT_TENSOR}/exp_avg", [0, 7])


FAULTS: dict[str, Callable[..., FaultOutcome]] = {
    "bit_flip": bit_flip,
    "skipped_allreduce": skipped_allreduce,
    "different_seed": different_seed,
    "unsynced_buffers": unsynced_buffers,
    "optimizer_drift": optimizer_drift,
}


def run_fault(world: World, name: str, faulty_rank: int | None = None) -> FaultOutcome:
    """Run one named fault on this rank (every rank calls it): the entry for `run_distributed`."""
    fn = FAULTS[name]
    if faulty_rank is None and name != "unsynced_buffers":
        faulty_rank = world.world_size - 1
    return fn(world, faulty_rank) if faulty_rank is not None else fn(world)


def run_all_faults(world: World, names: tuple[str, ...] | None = None) -> list[FaultOutcome]:
    """Every fault in turn, on the same ranks (one process group: one start-up paid once)."""
    return [run_fault(world, name) for name in (names or tuple(FAULTS))]


def clean_checks(world: World, steps: int = 70) -> list[tuple[str, int, ReplicaReport | None]]:
    """Fault-free runs checked at every step, one per sync mode and model: (what, checks, first failure)."""
    out = []
    for label, extra in (
        ("transformer ddp", ["sync=ddp"]),
        ("transformer allreduce", ["sync=allreduce"]),
        ("cnn groupnorm ddp", ["model.name=cnn", "model.norm=group", "data.name=shapes", "optim.name=sgd"]),
    ):
        result = train(base_config(world.world_size, steps, extra), world, progress=False)
        first = result.first_divergence
        out.append((label, result.checks, ReplicaReport.from_dict(first) if first else None))
    return out


# ---------------------------------------------------------------- faults switched on from outside
#
# The faults above leave every process alive. These end one, the way a machine or an OOM
# killer does (`os._exit`: no exception, no cleanup, no goodbye to the peers), or make it
# stop taking part. They are switched on by environment variables, so that a real
# launcher's workers (torchrun, accelerate launch, Ray Train) can be told to fail without any
# test code inside them, and only on the first attempt, so that restarted workers get through:
#
#     DISTSHARE_PLUGINS=distshare.testing.faults   load this module as a plugin on every rank
#     DISTSHARE_FAULT_EXIT=1:12           rank 1 exits right after step 12
#     DISTSHARE_FAULT_EXIT_IN_SAVE=2      rank 0 exits halfway through its 2nd checkpoint save
#                                         (model file written, optimizer file not, no manifest)
#     DISTSHARE_FAULT_HANG=1:3            rank 1 goes silent at the start of step 3
#
# The per-rank runner (`distshare.engines.runner`) imports the modules named in
# DISTSHARE_PLUGINS and adds what their `distshare_components` returns; no production
# module imports this one. `fault_env(...)` builds the variables.

PLUGIN = "distshare.testing.faults"
EXIT_AT_STEP = "DISTSHARE_FAULT_EXIT"
EXIT_IN_SAVE = "DISTSHARE_FAULT_EXIT_IN_SAVE"
HANG_ENV = "DISTSHARE_FAULT_HANG"
FAULT_EXIT_CODE = 43  # what a killed worker exits with, so a test can tell it from a crash


def fault_env(
    exit_at: str | None = None, exit_in_save: int | None = None, hang_at: str | None = None
) -> dict[str, str]:
    """The environment that switches faults on for every rank of a launched run.

    `exit_at` / `hang_at` are "RANK:STEP"; `exit_in_save` the number of the save to interrupt.
    """
    env = {"DISTSHARE_PLUGINS": PLUGIN}
    if exit_at is not None:
        env[EXIT_AT_STEP] = exit_at
    if exit_in_save is not None:
        env[EXIT_IN_SAVE] = str(exit_in_save)
    if hang_at is not None:
        env[HANG_ENV] = hang_at
    return env


def distshare_components(cfg: RunConfig, world: World, attempt: int) -> list[Component]:
    """The plugin entry: the faults this environment asks for, on the first attempt only."""
    if attempt != 0:
        return []
    out: list[Component] = []
    point = _rank_step(EXIT_AT_STEP)
    if point is not None:
        out.append(ExitAfterStep(*point))
    if os.environ.get(EXIT_IN_SAVE, "").strip().isdigit() and world.is_main:
        out.append(ExitInSave(int(os.environ[EXIT_IN_SAVE])))
    point = hang_point()
    if point is not None:
        out.append(GoSilent(*point))
    return out


def _rank_step(var: str) -> tuple[int, int] | None:
    """(rank, step) from `VAR=RANK:STEP`, or None when unset or malformed."""
    rank, sep, step = os.environ.get(var, "").partition(":")
    if not sep or not rank.strip().isdigit() or not step.strip().isdigit():
        return None
    return int(rank), int(step)


def _die(message: str) -> None:
    print(message, file=sys.stderr)
    sys.stderr.flush()
    os._exit(FAULT_EXIT_CODE)


class ExitAfterStep(Component):
    """Rank `rank` ends its process right after step `at` (after that step's checkpoint, if any)."""

    def __init__(self, rank: int, at: int) -> None:
        self.rank, self.at = rank, at

    def step_end(self, loop: Loop, step: int) -> None:
        if step == self.at and loop.world.rank == self.rank:
            _die(f"[rank {self.rank}] fault injected: exiting after step {step} ({EXIT_AT_STEP})")


class ExitInSave(Component):
    """This rank ends its process between the files of its `nth` checkpoint save."""

    def __init__(self, nth: int) -> None:
        self.nth, self.saves = nth, 0

    def begin(self, loop: Loop) -> None:
        checkpointer = loop.find(Checkpointer)
        if checkpointer is not None:
            checkpointer.after_file = self._after_file

    def _after_file(self, path: str) -> None:
        if path.endswith(MODEL_FILE):
            self.saves += 1
            if self.saves == self.nth:
                _die(f"fault injected: exiting in the middle of checkpoint save {self.nth} ({EXIT_IN_SAVE})")


class GoSilent(Component):
    """Rank `rank` stops taking part at the start of step `at`: it sleeps, holding no lock,
    until the survivors' timeout and the parent (or the launcher) end it."""

    def __init__(self, rank: int, at: int) -> None:
        self.rank, self.at = rank, at

    def before_step(self, loop: Loop, step: int) -> None:
        if step == self.at and loop.world.rank == self.rank:
            while True:
                time.sleep(3600)


def hang_point() -> tuple[int, int] | None:
    """(rank, step) from `DISTSHARE_FAULT_HANG=RANK:STEP`, or None when unset or malformed."""
    return _rank_step(HANG_ENV)


def hang(world: World, faulty_rank: int = 1, inject_at: int = 3, steps: int = 6, timeout_s: float = 3.0) -> Any:
    """Train with rank `faulty_rank` going silent at step `inject_at`; every rank calls it.

    Never returns normally on a healthy run: the survivors raise `RankSilent` naming the
    faulty rank, which `run_distributed` re-raises in the caller.
    """
    cfg = base_config(world.world_size, steps, [f"timeout_s={timeout_s}", "check_every=0"])
    return train(cfg, world, progress=False, components=[StepMarker(), GoSilent(faulty_rank, inject_at)])


__all__ = [
    "EXIT_AT_STEP",
    "EXIT_IN_SAVE",
    "FAULTS",
    "FAULT_EXIT_CODE",
    "HANG_ENV",
    "PLUGIN",
    "ExitAfterStep",
    "ExitInSave",
    "FaultOutcome",
    "GoSilent",
    "clean_checks",
    "distshare_components",
    "fault_env",
    "hang",
    "hang_point",
    "run_all_faults",
    "run_fault",
]
