"""What distshare hands a user's training loop on each rank, and what it records of the loop.

`assert_loop_equivalent` runs *the user's own loop* (their forward, loss, normalization,
`no_sync` / `accumulate`, backward and optimizer step) under several splits W x k of the
same global batches. The loop is a module-level function `loop(ctx) -> model`; `ctx` is a
`LoopContext`:

- `ctx.batches()`: the steps; each step is this rank's k micro-batches, collated, cut from
  distshare's global batch plan (the same global batches for every W and k).
- `ctx.dataset`: the data set, for loops that shard it themselves (a `DataLoader` with a
  `DistributedSampler`): every sample it serves is recorded, so the accounting still works.

Nothing in the loop reports to distshare: a global optimizer step hook (`LoopRecorder`)
records, at every optimizer step, the gradient the optimizer is about to use and the
parameters after its update; and the samples the loop drew, step by step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from distshare.config import PlanConfig
from distshare.data.plan import GlobalBatchPlan
from distshare.distributed.world import World
from distshare.errors import UsageError
from distshare.integrity.state import unwrap

Tensors = dict[str, torch.Tensor]
Collate = Callable[[list[Any]], Any]

# The counterfactual orders of the reference: the reference's own global batches with their
# samples in another order, nothing else changed. "plan" is the reference itself.
PLAN_ORDER = "plan"
REVERSED = "reversed"


def permutation_orders(count: int) -> list[str]:
    """The counterfactual orders the bound is measured over: reversed, then seeded permutations."""
    return [REVERSED, *(f"permutation-{i}" for i in range(max(0, count - 1)))]


def reorder(indices: Sequence[int], order: str, seed: int, call: int) -> list[int]:
    """`indices` in the counterfactual `order` (the call number seeds the permutations)."""
    indices = [int(i) for i in indices]
    if order == PLAN_ORDER or len(indices) < 2:
        return indices
    if order == REVERSED:
        return indices[::-1]
    which = int(order.rsplit("-", 1)[1])
    perm = np.random.default_rng([seed, which, call]).permutation(len(indices))
    return [indices[i] for i in perm]


def default_collate(samples: list[Any]) -> Any:
    """torch's `default_collate` (a `TensorDataset` sample, a dict of tensors, numbers...)."""
    return torch.utils.data.default_collate(samples)


@dataclass
class LoopRecorder:
    """Records every optimizer step of this process: gradients before, parameters after.

    Global hooks (`register_optimizer_step_pre_hook`): the user's loop needs no change, and
    a wrapped optimizer (accelerate's) is seen where the torch optimizer inside it steps.
    Tensors are kept by position in the optimizer (group, index) and named at the end
    through the model the loop returns (`name_tensors`).
    """

    keep_tensors: bool  # rank 0 keeps gradients and parameters; every rank keeps samples
    grads: list[dict[tuple[int, int], torch.Tensor]] = field(default_factory=list)
    params: list[dict[tuple[int, int], torch.Tensor]] = field(default_factory=list)
    samples: list[list[list[int]]] = field(default_factory=lambda: [[]])  # step -> micro -> indices
    optimizer: torch.optim.Optimizer | None = None
    error: str = ""

    def __enter__(self) -> LoopRecorder:
        self._handles = [
            register_optimizer_step_pre_hook(self._before),
            register_optimizer_step_post_hook(self._after),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()

    @property
    def steps(self) -> int:
        return len(self.params)

    def consumed(self, indices: Sequence[int]) -> None:
        """Samples the loop drew, counted in the step now running (the next optimizer step)."""
        self.samples[-1].append([int(i) for i in indices])

    def _follows(self, optimizer: torch.optim.Optimizer) -> bool:
        inner = getattr(optimizer, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            return False  # a wrapper (accelerate's): the optimizer inside it is the one recorded
        if self.optimizer is None:
            self.optimizer = optimizer
        elif optimizer is not self.optimizer and not self.error:
            self.error = "the loop stepped two optimizers; assert_loop_equivalent follows one optimizer per loop"
        return optimizer is self.optimizer

    def _positions(self) -> Iterator[tuple[tuple[int, int], torch.Tensor]]:
        assert self.optimizer is not None
        for i, group in enumerate(self.optimizer.param_groups):
            for j, p in enumerate(group["params"]):
                yield (i, j), p

    def _before(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._follows(optimizer) or not self.keep_tensors:
            return
        self.grads.append(
            {
                pos: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().cpu().clone()
                for pos, p in self._positions()
            }
        )

    def _after(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._follows(optimizer):
            return
        if self.keep_tensors:
            self.params.append({pos: p.detach().cpu().clone() for pos, p in self._positions()})
        else:
            self.params.append({})  # the count of steps is all other ranks need
        self.samples.append([])

    def name_tensors(self, model: Any) -> tuple[list[Tensors], list[Tensors]]:
        """(gradients, parameters) of every step, named as the bare model names its parameters."""
        names: dict[int, str] = {}
        if isinstance(model, nn.Module):
            names = {id(p): n for n, p in unwrap(model).named_parameters()}
        label: dict[tuple[int, int], str] = {}
        if self.optimizer is not None:
            # Named by the model; a tensor the model does not hold is named by its optimizer slot.
            label = {pos: names.get(id(p), f"group{pos[0]}[{pos[1]}]") for pos, p in self._positions()}

        def named(step: dict[tuple[int, int], torch.Tensor]) -> Tensors:
            return {label[pos]: t for pos, t in step.items()}

        return [named(g) for g in self.grads], [named(p) for p in self.params]


class RecordingDataset(torch.utils.data.Dataset):
    """The user's data set, recording every index served (for loops that shard it themselves).

    A `DataLoader` fetches a batch through `__getitems__` when the data set has one: that is
    where a counterfactual order of the reference reorders a batch's samples, and where the
    batch is recorded as one micro-batch.
    """

    def __init__(self, dataset: Any, recorder: LoopRecorder, order: str, seed: int) -> None:
        self.dataset, self.recorder, self.order, self.seed = dataset, recorder, order, seed
        self.calls = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        self.recorder.consumed([index])
        return self.dataset[int(index)]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        self.calls += 1
        indices = reorder(indices, self.order, self.seed, self.calls)
        self.recorder.consumed(indices)
        return [self.dataset[i] for i in indices]


class StepBatches:
    """One step's micro-batches on this rank: `len()` is k; iterate (as often as you like) to get them.

    Each micro-batch is collated and recorded once, the first time it is drawn. On every
    pass, each micro-batch after the first checks with the other ranks whether the
    gradients accumulated so far are already identical everywhere: a sync before the last
    micro-batch (a forward or backward outside `no_sync`). A first pass that only counts
    (before any backward) finds no gradient and passes; iterate the step itself, not a
    list copied from it, for the check to see the backward passes.
    """

    def __init__(self, ctx: LoopContext, step: int) -> None:
        self.ctx, self.step = ctx, step
        self.indices = [m.tolist() for m in ctx.plan.rank_micro_batches(step, ctx.rank)]
        self._collated: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[Any]:
        for m, indices in enumerate(self.indices):
            if m:
                self.ctx._check_no_early_sync(self.step, m)
            if m not in self._collated:
                indices = reorder(indices, self.ctx.order, self.ctx.seed, self.step)
                self.ctx.recorder.consumed(indices)
                self._collated[m] = self.ctx.collate(indices)
            yield self._collated[m]


@dataclass
class LoopContext:
    """What the user's loop gets on each rank: where it stands in the split, and its data.

    distshare seeds torch (`seed`, the same on every rank and split) just before calling the
    loop, so a model built inside it starts from the same bits everywhere. The process
    group is already initialized on W > 1: wrap the model in DDP directly.
    """

    rank: int
    world_size: int  # W
    accum_steps: int  # k: micro-batches per rank per optimizer step
    micro_batch: int  # b
    global_batch: int  # G = W x k x b
    steps: int  # optimizer steps the loop should take
    seed: int
    world: World
    plan: GlobalBatchPlan
    raw_dataset: Any
    collate_fn: Collate
    recorder: LoopRecorder
    order: str = PLAN_ORDER  # a counterfactual order of the reference (W = k = 1 only)
    early_sync: str = ""  # the first sync before a step's last micro-batch, if one was seen
    used_plan: bool = False  # the loop drew its data from batches()
    _dataset: RecordingDataset | None = None

    @property
    def dataset(self) -> RecordingDataset:
        """The data set, recording what is served: shard it yourself (DistributedSampler, ...)."""
        if self._dataset is None:
            self._dataset = RecordingDataset(self.raw_dataset, self.recorder, self.order, self.seed)
        return self._dataset

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def batches(self) -> Iterator[StepBatches]:
        """The `steps` steps: this rank's k micro-batches of each, from the global batch plan."""
        self.used_plan = True
        for s in range(self.steps):
            yield StepBatches(self, s)

    def collate(self, indices: Sequence[int]) -> Any:
        """The samples `indices` as one batch (the `collate_fn` given to the helper)."""
        return self.collate_fn([self.raw_dataset[int(i)] for i in indices])

    def global_indices(self, step: int) -> list[int]:
        """The global sample indices of `step` (all ranks, all micro-batches), in plan order."""
        return [int(i) for i in self.plan.global_batch(step)]

    def global_count(self, step: int, count_items: Callable[[Any], int]) -> int:
        """`count_items` summed over the whole global batch of `step` (e.g. its label tokens).

        Read from the plan on this rank, no collective: a convenience. A loop that counts
        its own micro-batches and all-reduces the count must arrive at the same number.
        """
        return int(sum(int(count_items(self.collate([i]))) for i in self.global_indices(step)))

    def _check_no_early_sync(self, step: int, micro: int) -> None:
        # Ranks hold different samples, so before the last micro-batch their accumulated
        # gradients differ unless something already all-reduced them. One digest per rank.
        opt = self.recorder.optimizer
        if self.world_size < 2 or self.early_sync or opt is None:
            return  # the optimizer is known from its first step on: steps 1.. are checked
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        h = hashlib.blake2b(digest_size=8)
        nonzero = False
        for g in grads:
            t = g.detach().cpu().contiguous()
            nonzero |= bool(t.any())
            h.update(t.view(torch.uint8).numpy().tobytes())
        mine = torch.tensor([int.from_bytes(h.digest(), "little", signed=True), int(nonzero)], dtype=torch.int64)
        everyone = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(everyone, mine)
        if all(bool(e[1]) for e in everyone) and all(int(e[0]) == int(everyone[0][0]) for e in everyone):
            self.early_sync = (
                f"step {step}: the gradients were already identical on every rank before micro-batch {micro} of "
                f"{self.accum_steps} (a sync before the last micro-batch: run every forward and backward but the "
                "last inside model.no_sync(), or use accelerator.accumulate)"
            )


def make_context(
    world: World,
    dataset: Any,
    world_size: int,
    accum_steps: int,
    global_batch: int,
    steps: int,
    seed: int,
    collate_fn: Collate | None,
    recorder: LoopRecorder,
    order: str = PLAN_ORDER,
) -> LoopContext:
    """The context of one run of the loop on this rank (W, k, and for the reference an order)."""
    resolved = PlanConfig(world_size, global_batch, accum_steps, None).resolve()
    plan = GlobalBatchPlan(len(dataset), resolved, seed=seed)
    if steps > plan.steps_per_epoch:
        raise UsageError(
            f"{steps} steps of {global_batch} samples need {steps * global_batch} samples, the data set has "
            f"{len(dataset)}: lower steps or global_batch, or pass more data"
        )
    return LoopContext(
        rank=world.rank,
        world_size=world_size,
        accum_steps=accum_steps,
        micro_batch=resolved.micro_batch,
        global_batch=global_batch,
        steps=steps,
        seed=seed,
        world=world,
        plan=plan,
        raw_dataset=dataset,
        collate_fn=collate_fn or default_collate,
        recorder=recorder,
        order=order,
    )
