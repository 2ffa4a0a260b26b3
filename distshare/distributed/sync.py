"""Gradient synchronization: how W ranks' local gradients become one shared gradient.

Every mode *sums* the ranks' gradients. The step already divided each rank's summed loss
by the item count of the whole global batch, so the sum over ranks is exactly the
large-batch gradient; averaging (DDP's default) would divide by W a second time.

- `ddp`: torch's DistributedDataParallel, with `no_sync()` on all but the last micro-batch
  and a comm hook that all-reduces with SUM instead of the default average.
- `allreduce`: no wrapper at all, an explicit `all_reduce(SUM)` of every `.grad` after the
  last micro-batch: the most transparent form of "all-reduce gradients into one replicated
  parameter set".
- `exact`: per-sample gradients added in integers (`distshare.numerics.exact_sum`): bitwise the same
  gradient for every split of the global batch, W = 1 included.
- single process (W = 1): nothing to synchronize.
"""

# No `from __future__ import annotations`: DDP inspects the comm hook's annotations at runtime.

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_map

from distshare.numerics.exact_sum import ExactGradSum
from distshare.numerics.per_sample import LossFn, per_sample_grads, refuse_split_dependent


class GradSync:
    """Single process: gradients are already the global ones."""

    name = "local"
    # True when the last micro-batch's backward already all-reduces (DDP): a rank's own
    # gradient is then visible only before that backward.
    reduces_in_backward = False
    # True when the step hands over each micro-batch's samples (`accumulate`) instead of
    # calling backward on their summed loss (exact mode).
    per_sample = False
    step_loss = 0.0  # per-sample syncs: this rank's summed loss of the last step (computed in synchronize)
    underflows: int | None = None  # exact mode: contributions rounded to 0, summed over the run's steps

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the step calls forward on."""
        return model

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The module forward is called on, and the optimizer the step calls (an engine may wrap both)."""
        return self.wrap(model), optimizer

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss, already divided by the global batch's item count."""
        loss.backward()

    @contextlib.contextmanager
    def micro_step(self, wrapped: nn.Module, last: bool) -> Iterator[None]:
        """Context for one micro-batch's forward and backward."""
        yield

    def start_step(self, model: nn.Module, global_items: int, global_samples: int) -> None:
        """Called before a step's first micro-batch with the global batch's item and sample counts."""

    def synchronize(self, model: nn.Module) -> None:
        """Called once after the last micro-batch's backward, before the optimizer step."""


class DDPSync(GradSync):
    """DistributedDataParallel; gradients reduce during the last micro-batch's backward."""

    name = "ddp"
    reduces_in_backward = True

    def wrap(self, model: nn.Module) -> nn.Module:
        ddp = DistributedDataParallel(model)
        ddp.register_comm_hook(state=None, hook=sum_hook)
        return ddp

    @contextlib.contextmanager
    def micro_step(self, wrapped: nn.Module, last: bool) -> Iterator[None]:
        # no_sync() skips the all-reduce but keeps accumulating into .grad; the last
        # micro-batch's backward then reduces the accumulated sum once.
        if last:
            yield
        else:
            with wrapped.no_sync():
                yield


class AllReduceSync(GradSync):
    """Explicit SUM all-reduce of every gradient, flattened into one buffer."""

    name = "allreduce"

    def synchronize(self, model: nn.Module) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                # A parameter unused this step still takes part, so every rank's buffer
                # has the same layout.
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        # One buffer, one collective: elementwise sums, so flattening changes no result.
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(synced)


class ExactSync(GradSync):
    """Per-sample gradients summed exactly in integers across micro-batches and ranks.

    The micro-batches of a step are only collected here and computed together in `synchronize`,
    in the fixed-size chunks `distshare.numerics.exact_sum` needs anyway: a sample's result does not
    depend on its micro-batch, so k costs nothing extra. `method` chooses how per-sample
    gradients are computed (`distshare.numerics.per_sample`); `group` is the process group
    the sum runs over (None: the default group).
    """

    name = "exact"
    per_sample = True

    def __init__(self, world_size: int = 1, group: dist.ProcessGroup | None = None, method: str = "auto") -> None:
        self.world_size = world_size
        self.group = group
        self.method = method
        self.samples: list[Any] = []
        self.loss_fn: LossFn | None = None
        self.global_samples, self.normalizer = 1, 1.0
        self.step_loss = 0.0  # this rank's summed loss of the last finished step
        self.underflows = 0

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        refuse_split_dependent(model)
        return model, optimizer

    def start_step(self, model: nn.Module, global_items: int, global_samples: int) -> None:
        self.samples, self.global_samples, self.normalizer = [], global_samples, float(global_items)

    def accumulate(self, model: nn.Module, batch: Any, loss_fn: LossFn) -> None:
        """One micro-batch's samples (a pytree, samples along dim 0), for the step's exact sum."""
        self.samples.append(batch)
        self.loss_fn = loss_fn

    def synchronize(self, model: nn.Module) -> None:
        acc = ExactGradSum(model, self.global_samples, self.world_size, self.group)
        if self.samples and self.loss_fn is not None:
            batch = tree_map(lambda *parts: torch.cat(parts), *self.samples)
            rows, losses = per_sample_grads(model, batch, self.loss_fn, self.method)
            acc.add(rows)
            self.step_loss = float(losses.sum())
        else:
            self.step_loss = 0.0
        self.samples = []
        acc.write_grads(self.normalizer)
        self.underflows += acc.underflows


def sum_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    fut = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def make_sync(mode: str, world_size: int) -> GradSync:
    """The sync for `mode` ("ddp" | "allreduce" | "exact"); single process gets the no-op,
    except in exact mode, whose arithmetic is the point even on one process."""
    if mode == "exact":
        return ExactSync(world_size)
    if world_size == 1:
        return GradSync()
    return {"ddp": DDPSync, "allreduce": AllReduceSync}[mode]()
