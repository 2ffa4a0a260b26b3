"""Running one partition (W ranks x k micro-batches) and recording what rank 0 saw.

Every step, just before the update, rank 0 records the synced gradient and, on a bare copy
at the same parameters, the one-big-batch gradient (`distshare.equivalence.reference`); after
the update it records the parameters. Every rank records which samples it used, for the
sample accounting. A spawned world size runs all its (dtype, k) partitions one after another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from distshare.distributed.world import World
from distshare.equivalence.gradient import step_gradient
from distshare.equivalence.tasks import GridTask, Trainee

Tensors = dict[str, torch.Tensor]


@dataclass
class PartitionRun:
    """What rank 0 saw of one partition (rank > 0 keeps only its samples)."""

    world_size: int
    accum_steps: int
    micro_batch: int
    dtype: str  # the precision's label
    u: float  # its unit roundoff
    losses: list[float] = field(default_factory=list)  # global mean loss per step
    grads: list[Tensors] = field(default_factory=list)  # synced gradient of each step
    ref_grads: list[Tensors] = field(default_factory=list)  # one-big-batch gradient at the same parameters
    states: list[Tensors] = field(default_factory=list)  # model state after each step
    global_batches: list[list[int]] = field(default_factory=list)
    samples: list[list[list[int]]] = field(default_factory=list)  # this rank: step -> micro -> indices
    samples_by_rank: list[list[list[list[int]]]] = field(default_factory=list)  # filled by the parent


def grads_of(model: nn.Module) -> Tensors:
    """Every parameter's gradient (zeros where none), copied to the CPU."""
    return {
        n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().cpu().clone()
        for n, p in model.named_parameters()
    }


def state_of(model: nn.Module) -> Tensors:
    """The model's state (parameters and buffers), copied to the CPU."""
    return {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}


def full_batch_grad(t: Trainee, copy: nn.Module, step: int, rng: torch.Tensor) -> Tensors:
    """The reference (W = 1, k = 1) gradient at the trainee's current parameters.

    The one step on the whole global batch as one micro-batch (summed loss divided by the
    global count), stopped before the update, on a copy so the run itself is untouched. The
    CPU RNG is set to `rng`, its state when the step began, so that a model with randomness
    (dropout) draws what the reference step would have drawn; the run's own stream is
    restored afterwards.
    """
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng)
        copy.load_state_dict(t.model.state_dict())
        copy.zero_grad(set_to_none=True)
        if t.exact_grad is not None:
            t.exact_grad(copy, step)
        else:
            indices = t.global_batch(step)
            step_gradient(copy, [indices], t.normalizer(step), len(indices), t.batch_loss)
    return grads_of(copy)


def record_gradients(t: Trainee, rec: PartitionRun, current: list[Any]) -> RemovableHandle:
    """From now on, just before each update: the synced gradient and the big-batch gradient.

    The update has not happened yet, so the parameters are still those the gradient was
    taken at; the big-batch gradient is computed there (`full_batch_grad`). `current` is
    [step, CPU RNG state when the step began], kept up to date by the caller.
    """
    copy = t.fresh_model()

    def observe(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        rec.grads.append(grads_of(t.model))
        rec.ref_grads.append(full_batch_grad(t, copy, current[0], current[1]))

    # accelerate wraps the optimizer; the hook belongs on the torch optimizer that steps.
    return getattr(t.optimizer, "optimizer", t.optimizer).register_step_pre_hook(observe)


def run_partition(
    task: GridTask, world: World, world_size: int, accum_steps: int, dtype: str | None, steps: int
) -> PartitionRun:
    """Train one partition for `steps` steps; rank 0 records gradients and states every step."""
    torch.manual_seed(task.seed)  # any randomness in the model (dropout) starts alike everywhere
    t = task.build(world, world_size, accum_steps, dtype)
    rec = PartitionRun(world_size, accum_steps, t.micro_batch, t.label, t.u)
    current: list[Any] = [0, None]  # the step, and the CPU RNG state when it began
    if world.is_main:
        record_gradients(t, rec, current)
    for s in range(steps):
        current[:] = [s, torch.get_rng_state()]
        loss, indices = t.step(s)
        total = torch.tensor([loss], dtype=torch.float64)
        if world.distributed:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        rec.losses.append(float(total) / t.normalizer(s))
        rec.samples.append(indices)
        rec.global_batches.append(t.global_batch(s))
        if world.is_main:
            rec.states.append(state_of(t.model))
    return rec


def grid_rank(
    world: World, task: GridTask, accum_steps: Sequence[int], dtypes: Sequence[str | None], steps: int
) -> list[PartitionRun]:
    """Every (dtype, k) partition of this world size, one after another, on this rank."""
    return [run_partition(task, world, world.world_size, k, dtype, steps) for dtype in dtypes for k in accum_steps]
