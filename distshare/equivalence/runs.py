"""Running one partition (W ranks x k micro-batches) and recording what rank 0 saw.

Every step, just before the update, rank 0 records the synced gradient and, on a bare copy
at the same parameters, the one-big-batch gradient (`distshare.equivalence.reference`); after
the update it records the parameters, and replays the update (`UpdateReplay`): the
configured optimizer, applied to the run's own gradient from the run's own state, must give
the run's new state bit for bit. Every rank records which samples it used, for the
sample accounting. A spawned world size runs all its (dtype, k) partitions one after another.

A sharded partition (`parallel: fsdp | hsdp`) is observed the same way, on whole tensors: no
rank holds one, so every rank takes part in gathering each one (`DTensor.full_tensor()`, in
the same order everywhere) and rank 0 keeps them. That gathers the model every step: a test
of equivalence, not the cheap check (that is the logical digest, `distshare.integrity.logical`).
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
from distshare.integrity.logical import is_dtensor, is_sharded_model
from distshare.numerics.diff import diff

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
    updates_replayed: int = 0  # steps whose update was replayed on a copy
    update_mismatch: str = ""  # the first step whose update is not the configured one, and where


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded one gathered (a collective: every rank calls it), else itself."""
    return t.full_tensor() if is_dtensor(t) else t  # type: ignore[attr-defined]


def grads_of(model: nn.Module) -> Tensors:
    """Every parameter's gradient (zeros where none), whole, copied to the CPU."""
    return {
        n: (whole(p.grad) if p.grad is not None else torch.zeros(p.shape, dtype=p.dtype)).detach().cpu().clone()
        for n, p in model.named_parameters()
    }


def state_of(model: nn.Module) -> Tensors:
    """The model's state (parameters and buffers), whole, copied to the CPU."""
    return {n: whole(t).detach().cpu().clone() for n, t in model.state_dict().items()}


def full_batch_grad(t: Trainee, copy: nn.Module, step: int, rng: torch.Tensor, state: Tensors | None = None) -> Tensors:
    """The reference (W = 1, k = 1) gradient at the trainee's current parameters.

    The one step on the whole global batch as one micro-batch (summed loss divided by the
    global count), stopped before the update, on a copy so the run itself is untouched. The
    CPU RNG is set to `rng`, its state when the step began, so that a model with randomness
    (dropout) draws what the reference step would have drawn; the run's own stream is
    restored afterwards. `state`: the trainee's whole state, when it was gathered already.
    """
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng)
        copy.load_state_dict(state if state is not None else t.model.state_dict())
        copy.zero_grad(set_to_none=True)
        if t.exact_grad is not None:
            t.exact_grad(copy, step)
        else:
            indices = t.global_batch(step)
            step_gradient(copy, [indices], t.normalizer(step), len(indices), t.batch_loss)
    return grads_of(copy)


def _stepping(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer that steps (accelerate wraps it)."""
    return getattr(optimizer, "optimizer", optimizer)


def _clone(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return whole(state).detach().clone()
    if isinstance(state, dict):
        return {k: _clone(v) for k, v in state.items()}
    return state


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> Tensors:
    """The optimizer's state as named tensors ("3/exp_avg": parameter 3's first moment), on the CPU."""
    out: Tensors = {}
    for index, entry in optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                out[f"{index}/{key}"] = whole(value).detach().cpu()
    return out


class UpdateReplay:
    """Each step's update replayed on a copy: is it the configured update of the run's gradient?

    Just before the update it keeps the run's parameters, synced gradient and optimizer
    state; just after, a fresh optimizer built from the configuration (its learning rate,
    weight decay, momenta) applies that gradient to those parameters from that state. The
    same arithmetic on the same bits: the run's new parameters and optimizer state must be
    equal to the replay's bit for bit. The gradient check cannot see an update that is wrong
    on every rank alike (a learning rate, weight decay or Adam state not the configured
    ones); this does, whatever its size. By induction from step 0 (empty state) every
    step's update is the configured one.
    """

    def __init__(self, t: Trainee, rec: PartitionRun, keep: bool = True) -> None:
        self.t, self.rec = t, rec
        self.keep = keep  # False: a sharded run's other ranks, which only help gather
        self.copy = t.fresh_model()
        self.optimizer = t.fresh_optimizer(self.copy)
        self.groups = _clone(self.optimizer.state_dict()["param_groups"])  # the configured hyper-parameters

    def before_update(self) -> None:
        model = self.t.model
        self.params = {n: whole(p).detach().clone() for n, p in model.named_parameters()}
        self.grads = {
            n: None if p.grad is None else whole(p.grad).detach().clone() for n, p in model.named_parameters()
        }
        self.state = _clone(_stepping(self.t.optimizer).state_dict()["state"])

    @torch.no_grad()
    def after_update(self, step: int) -> None:
        # Gathered first, on every rank alike (collectives when sharded), whatever comes next.
        mine_params = {n: whole(p).detach().cpu() for n, p in self.t.model.named_parameters()}
        mine_state = _optimizer_tensors(_stepping(self.t.optimizer))
        if not self.keep:
            return
        for n, p in self.copy.named_parameters():
            p.copy_(self.params[n])
            p.grad = self.grads[n]
        self.optimizer.load_state_dict({"state": self.state, "param_groups": _clone(self.groups)})
        self.optimizer.step()
        self.rec.updates_replayed += 1
        if self.rec.update_mismatch:
            return
        for what, mine, replayed in (
            ("parameters", mine_params, dict(self.copy.named_parameters())),
            ("optimizer state", mine_state, _optimizer_tensors(self.optimizer)),
        ):
            d = diff({n: v.detach().cpu() for n, v in mine.items()}, {n: v.detach().cpu() for n, v in replayed.items()})
            if not d.bitwise_equal:
                self.rec.update_mismatch = (
                    f"step {step}: {what} are not the configured update of the run's own gradient "
                    f"({d.describe()}, worst {d.worst_tensor})"
                )
                return


def record_gradients(
    t: Trainee, rec: PartitionRun, current: list[Any], keep: bool = True
) -> tuple[RemovableHandle, UpdateReplay]:
    """From now on, just before each update: the synced gradient and the big-batch gradient.

    The update has not happened yet, so the parameters are still those the gradient was
    taken at; the big-batch gradient is computed there (`full_batch_grad`). `current` is
    [step, CPU RNG state when the step began], kept up to date by the caller, who also calls
    the returned replay's `after_update(step)` once the update is done. `keep=False`: a
    sharded run's other ranks, which take part in every gather and keep nothing.
    """
    copy = t.fresh_model()
    replay = UpdateReplay(t, rec, keep)

    def observe(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = grads_of(t.model)
        state = state_of(t.model) if is_sharded_model(t.model) else None
        replay.before_update()
        if keep:
            rec.grads.append(grads)
            rec.ref_grads.append(full_batch_grad(t, copy, current[0], current[1], state))

    return _stepping(t.optimizer).register_step_pre_hook(observe), replay


def run_partition(
    task: GridTask, world: World, world_size: int, accum_steps: int, dtype: str | None, steps: int
) -> PartitionRun:
    """Train one partition for `steps` steps; rank 0 records gradients and states every step."""
    torch.manual_seed(task.seed)  # any randomness in the model (dropout) starts alike everywhere
    t = task.build(world, world_size, accum_steps, dtype)
    rec = PartitionRun(world_size, accum_steps, t.micro_batch, t.label, t.u)
    current: list[Any] = [0, None]  # the step, and the CPU RNG state when it began
    # Sharded: every rank helps gather whole tensors; rank 0 keeps them.
    observed = world.is_main or is_sharded_model(t.model)
    replay = record_gradients(t, rec, current, keep=world.is_main)[1] if observed else None
    for s in range(steps):
        current[:] = [s, torch.get_rng_state()]
        loss, indices = t.step(s)
        total = torch.tensor([loss], dtype=torch.float64)
        if world.distributed:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        rec.losses.append(float(total) / t.normalizer(s))
        rec.samples.append(indices)
        rec.global_batches.append(t.global_batch(s))
        if replay is not None:
            replay.after_update(s)
            state = state_of(t.model)
            if world.is_main:
                rec.states.append(state)
    return rec


def grid_rank(
    world: World, task: GridTask, accum_steps: Sequence[int], dtypes: Sequence[str | None], steps: int
) -> list[PartitionRun]:
    """Every (dtype, k) partition of this world size, one after another, on this rank."""
    return [run_partition(task, world, world.world_size, k, dtype, steps) for dtype in dtypes for k in accum_steps]
