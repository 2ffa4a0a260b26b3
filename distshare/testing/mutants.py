"""Mutants: faults injected into a real training run, each of which some verdict must catch.

A verdict that passes whatever happens proves nothing. Each mutant here breaks one thing a
correct run does, the way a real bug would, and `distshare selftest` checks that the
verdict meant to see it fails (`distshare.testing.selftest`). They are loop components
(`distshare.training.Component`), so one mutant runs unchanged

- in a launched run: `DISTSHARE_PLUGINS=distshare.testing.mutants DISTSHARE_MUTANT=<name>`
  switches it on in every rank of `distshare verify` / `train` (`mutant_env(name)`);
- in a partition of the equivalence grid: `MutantTask(cfg, name)` runs the grid's step
  with it, on every partition except the reference (W = 1, k = 1).

Data mutants replace what a micro-batch's loss is computed from (the samples the step
loads), not the plan: the plan stays right, so only an accounting that reads what the loss
consumed can see them. Gradient mutants act just before the update, after the sync, on
every rank alike (so the replicas stay bit-identical and only the comparison with one
process can see them), except where a mutant is about one rank.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from distshare.config import RunConfig
from distshare.data.tensors import TensorTable
from distshare.data.types import Batch
from distshare.distributed.world import World
from distshare.equivalence.tasks import ConfigTask, StepFn
from distshare.training import Component, Loop, Run, train_step

PLUGIN = "distshare.testing.mutants"
MUTANT_ENV = "DISTSHARE_MUTANT"
AT = 2  # the step a one-off mutant strikes (later steps than 0 and 1 test the whole loop)


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer that steps (accelerate wraps it)."""
    return getattr(optimizer, "optimizer", optimizer)


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.grad is not None]


def _next_float(t: torch.Tensor) -> None:
    """Move the first element of `t` one float up (1 ULP): the smallest change there is."""
    flat = t.view(-1)
    flat[0] = torch.nextafter(flat[0], torch.tensor(math.inf, dtype=t.dtype, device=t.device))


class Mutant(Component):
    """A fault in the run, injected through the loop's hooks. `step` counts from 0."""

    name = ""
    what = ""

    def __init__(self) -> None:
        self.step = -1

    def before_step(self, loop: Loop, step: int) -> None:
        self.step = step


class _GradientMutant(Mutant):
    """Changes `.grad` after the sync, just before the update (an optimizer pre-step hook)."""

    def begin(self, loop: Loop) -> None:
        self.world = loop.world
        self.handle = _inner(loop.run.optimizer).register_step_pre_hook(
            lambda opt, args, kwargs: self.mutate(loop.run.model)
        )

    def close(self, loop: Loop) -> None:
        self.handle.remove()

    def mutate(self, model: nn.Module) -> None:
        raise NotImplementedError


class NanGradient(_GradientMutant):
    name, what = "nan-gradient", f"one gradient element is NaN at step {AT}, on every rank"

    @torch.no_grad()
    def mutate(self, model: nn.Module) -> None:
        if self.step == AT:
            _params(model)[0].grad.view(-1)[0] = math.nan


class GradientScale(_GradientMutant):
    """Every gradient times (1 + eps) from step 1 on: a normalization off by a hair."""

    def __init__(self, eps: float = 1e-4) -> None:
        super().__init__()
        self.eps = eps
        self.name, self.what = "gradient-scale", f"every gradient x (1 + {eps:g}) from step 1, on every rank"

    @torch.no_grad()
    def mutate(self, model: nn.Module) -> None:
        if self.step >= 1:
            for p in _params(model):
                p.grad.mul_(1 + self.eps)


class GradientUlp(_GradientMutant):
    name, what = "gradient-ulp", f"one gradient element 1 ULP up at step {AT}, on every rank"

    @torch.no_grad()
    def mutate(self, model: nn.Module) -> None:
        if self.step == AT:
            _next_float(_params(model)[0].grad)


class RankGradientUlp(_GradientMutant):
    name, what = "rank-gradient-ulp", "rank 1's synced gradient 1 ULP off at step 0"

    @torch.no_grad()
    def mutate(self, model: nn.Module) -> None:
        if self.step == 0 and self.world.rank == 1:
            _next_float(_params(model)[0].grad)


class LearningRate(Mutant):
    """The learning rate times (1 + eps) from step 1 on, on every rank: a schedule off by a hair."""

    def __init__(self, eps: float = 1e-4) -> None:
        super().__init__()
        self.eps = eps
        self.name, self.what = "learning-rate", f"learning rate x (1 + {eps:g}) from step 1, on every rank"

    def before_step(self, loop: Loop, step: int) -> None:
        super().before_step(loop, step)
        if step == 1:
            for group in loop.run.optimizer.param_groups:
                group["lr"] *= 1 + self.eps


class BitFlip(Mutant):
    name, what = "bit-flip", f"one parameter bit flipped on rank 1 after step {AT}"

    @torch.no_grad()
    def after_step(self, loop: Loop, step: int, row: dict[str, Any]) -> None:
        if step == AT and loop.world.rank == min(1, loop.world.world_size - 1):
            p = next(loop.run.model.parameters())
            bits = p.data.view(-1)[:1].view(torch.int32 if p.dtype == torch.float32 else torch.int64)
            bits ^= 1


class _Table:
    """The data table, with the step's micro-batches replaced by what the mutant loads instead.

    Only the step's first k loads (the micro-batches, built at the start of `train_step`)
    are replaced; later loads (a reference gradient's, a stand-in's) pass through.
    """

    def __init__(self, table: TensorTable, mutant: _DataMutant) -> None:
        self._table, self._mutant = table, mutant

    def select(self, indices: Any) -> Batch:
        m = self._mutant
        i, m.loads = m.loads, m.loads + 1
        if i < m.k:
            indices = m.load(i, np.asarray(indices, dtype=np.int64).reshape(-1).tolist())
        return self._table.select(indices)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._table, name)


class _DataMutant(Mutant):
    def begin(self, loop: Loop) -> None:
        self.run = loop.run
        self.k = loop.run.plan.plan.accum_steps
        self.loads = self.k  # nothing replaced before the first step
        loop.run.table = _Table(loop.run.table, self)  # type: ignore[assignment]

    def before_step(self, loop: Loop, step: int) -> None:
        super().before_step(loop, step)
        self.loads = 0

    def here(self) -> bool:
        return self.step == AT and self.run.world.rank == self.run.world.world_size - 1

    def load(self, micro: int, planned: list[int]) -> list[int]:
        raise NotImplementedError


class SkipMicroBatch(_DataMutant):
    name, what = "skip-micro-batch", f"the last rank's last micro-batch of step {AT} is never loaded"

    def load(self, micro: int, planned: list[int]) -> list[int]:
        return [] if self.here() and micro == self.k - 1 else planned


class RepeatMicroBatch(_DataMutant):
    name, what = "repeat-micro-batch", f"the last rank loads its first micro-batch twice at step {AT}"

    def load(self, micro: int, planned: list[int]) -> list[int]:
        if self.here() and micro == self.k - 1:
            return [int(i) for i in self.run.plan.rank_micro_batches(self.step, self.run.world.rank)[0]]
        return planned


class RepeatSample(_DataMutant):
    name, what = "repeat-sample", f"one sample of the last rank's micro-batch replaced by its neighbour at step {AT}"

    def load(self, micro: int, planned: list[int]) -> list[int]:
        if self.here() and micro == 0 and len(planned) > 1:
            return [planned[0], *planned[:-1]]
        return planned


class SameData(_DataMutant):
    name, what = "same-data", "every rank loads rank 0's micro-batches (each worker the same data)"

    def load(self, micro: int, planned: list[int]) -> list[int]:
        return [int(i) for i in self.run.plan.rank_micro_batches(self.step, 0)[micro]]


MUTANTS: dict[str, Callable[[], Mutant]] = {
    "nan-gradient": NanGradient,
    "gradient-scale": GradientScale,
    "gradient-ulp": GradientUlp,
    "rank-gradient-ulp": RankGradientUlp,
    "learning-rate": LearningRate,
    "bit-flip": BitFlip,
    "skip-micro-batch": SkipMicroBatch,
    "repeat-micro-batch": RepeatMicroBatch,
    "repeat-sample": RepeatSample,
    "same-data": SameData,
}


def make(name: str, eps: float | None = None) -> Mutant:
    """The mutant called `name`; `eps` sets the size of a scale mutant."""
    if name not in MUTANTS:
        raise KeyError(f"unknown mutant {name!r}; expected one of: {', '.join(MUTANTS)}")
    factory = MUTANTS[name]
    return factory(eps) if eps is not None else factory()  # type: ignore[call-arg]


def mutant_env(name: str, eps: float | None = None) -> dict[str, str]:
    """The environment that switches mutant `name` on in every rank of a launched run."""
    value = name if eps is None else f"{name}:{eps!r}"
    return {"DISTSHARE_PLUGINS": PLUGIN, MUTANT_ENV: value}


def distshare_components(cfg: RunConfig, world: World, attempt: int) -> list[Component]:
    """The plugin entry (`DISTSHARE_PLUGINS`): the mutant `DISTSHARE_MUTANT` names."""
    name, _, eps = os.environ.get(MUTANT_ENV, "").partition(":")
    return [make(name.strip(), float(eps) if eps else None)] if name.strip() else []


@dataclass
class MutantTask(ConfigTask):
    """distshare's own training for the grid, with `mutant` in every partition but the reference."""

    mutant: str = ""
    eps: float | None = None

    def make_step(self, run: Run) -> StepFn:
        plan = run.plan.plan
        if (plan.world_size, plan.accum_steps) == (1, 1):
            return super().make_step(run)  # the reference stays what it is
        return stepping(run, make(self.mutant, self.eps))


def stepping(run: Run, mutant: Mutant) -> StepFn:
    """The one `train_step` on `run`, with `mutant`'s hooks called as the loop would call them."""
    loop = SimpleNamespace(run=run, world=run.world)
    mutant.begin(loop)  # type: ignore[arg-type]

    def step(s: int) -> tuple[float, list[list[int]]]:
        mutant.before_step(loop, s)  # type: ignore[arg-type]
        local = (lambda: mutant.on_local_grads(loop, s)) if mutant.wants_local_grads(s) else None  # type: ignore[arg-type]
        stats = train_step(run, s, local)
        mutant.after_step(loop, s, {})  # type: ignore[arg-type]
        return stats.loss_sum, stats.indices

    return step
