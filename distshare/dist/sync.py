"""Gradient synchronization: how W ranks' local gradients become one shared gradient.

Every mode *sums* the ranks' gradients. The step already divided each rank's summed loss
by the item count of the whole global batch, so the sum over ranks is exactly the
large-batch gradient; averaging (DDP's default) would divide by W a second time.

- `ddp`: torch's DistributedDataParallel, with `no_sync()` on all but the last micro-batch
  and a comm hook that all-reduces with SUM instead of the default average.
- `allreduce`: no wrapper at all, an explicit `all_reduce(SUM)` of every `.grad` after the
  last micro-batch: the most transparent form of "all-reduce gradients into one replicated
  parameter set".
- single process (W = 1): nothing to synchronize.
"""

# No `from __future__ import annotations`: DDP inspects the comm hook's annotations at runtime.

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class GradSync:
    """Single process: gradients are already the global ones."""

    name = "local"
    # True when the last micro-batch's backward already all-reduces (DDP): a rank's own
    # gradient is then visible only before that backward.
    reduces_in_backward = False

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

    def finish(self, model: nn.Module) -> None:
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

    def finish(self, model: nn.Module) -> None:
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


def sum_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    fut = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def make_sync(mode: str, world_size: int) -> GradSync:
    """The sync for `mode` ("ddp" | "allreduce"); single process always gets the no-op."""
    if world_size == 1:
        return GradSync()
    return {"ddp": DDPSync, "allreduce": AllReduceSync}[mode]()
