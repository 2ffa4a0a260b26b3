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

And the sharded layouts (`parallel: fsdp | hsdp`), where no rank holds a whole replica:

- `ShardedSync`: FSDP2's `fully_shard` over a 1-D mesh of all W ranks (fsdp), or a
  replicate x shard mesh (hsdp: each shard reduce-scattered within its group, then
  all-reduced across the groups). Its gradient divide factor is set to 1 with SUM-only
  collectives, so it adds the ranks like DDP's SUM hook; `set_requires_gradient_sync(False)`
  on all but the last micro-batch is its `no_sync()`.
"""

# No `from __future__ import annotations`: DDP inspects the comm hook's annotations at runtime.

import contextlib
import inspect
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_map

from distshare.numerics.exact_sum import ExactGradSum
from distshare.numerics.per_sample import LossFn, add_per_sample_grads, refuse_split_dependent


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


class PerSampleSync(GradSync):
    """A sync that takes the step's samples instead of its backward (`per_sample`): the
    micro-batches are collected by `accumulate` and computed together in `synchronize`, as
    per-sample gradients (`distshare.numerics.per_sample`). Layers whose output depends on
    which samples share a batch (BatchNorm in training mode, dropout) are refused at
    `prepare`: a sample's row of a batched computation would not be its contribution."""

    per_sample = True

    def __init__(self) -> None:
        self.samples: list[Any] = []
        self.loss_fn: LossFn | None = None
        self.global_samples, self.normalizer = 1, 1.0

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        refuse_split_dependent(model)
        return model, optimizer

    def start_step(self, model: nn.Module, global_items: int, global_samples: int) -> None:
        self.samples, self.global_samples, self.normalizer = [], global_samples, float(global_items)

    def accumulate(self, model: nn.Module, batch: Any, loss_fn: LossFn) -> None:
        """One micro-batch's samples (a pytree, samples along dim 0), for the step's per-sample pass."""
        self.samples.append(batch)
        self.loss_fn = loss_fn

    def take_samples(self) -> Any:
        """The step's samples as one batch (None if there were none), and forget them."""
        samples, self.samples = self.samples, []
        if not samples or self.loss_fn is None:
            return None
        return tree_map(lambda *parts: torch.cat(parts), *samples)


class ExactSync(PerSampleSync):
    """Per-sample gradients summed exactly in integers across micro-batches and ranks.

    The micro-batches of a step are only collected here and computed together in `synchronize`,
    in the fixed-size chunks `distshare.numerics.exact_sum` needs anyway: a sample's result does not
    depend on its micro-batch, so k costs nothing extra. `method` chooses how per-sample
    gradients are computed (`distshare.numerics.per_sample`); `group` is the process group
    the sum runs over (None: the default group).
    """

    name = "exact"

    def __init__(self, world_size: int = 1, group: dist.ProcessGroup | None = None, method: str = "auto") -> None:
        super().__init__()
        self.world_size = world_size
        self.group = group
        self.method = method
        self.step_loss = 0.0  # this rank's summed loss of the last finished step
        self.underflows = 0
        self._sum: ExactGradSum | None = None  # the integer sum, kept from step to step (28 bytes a parameter)

    def synchronize(self, model: nn.Module) -> None:
        acc = self._sum
        if acc is None or [id(p) for _, p in acc.params] != [id(p) for p in model.parameters()]:
            acc = self._sum = ExactGradSum(model, self.global_samples, self.world_size, self.group)
        else:
            acc.reset(self.global_samples)
        batch = self.take_samples()
        self.step_loss = 0.0
        if batch is not None:
            # Each chunk's per-sample gradients go into the integer sum as they are computed.
            losses = add_per_sample_grads(model, batch, self.loss_fn, acc.add, self.method)
            self.step_loss = float(losses.sum())
        acc.write_grads(self.normalizer)
        self.underflows += acc.underflows


class ShardedSync(GradSync):
    """FSDP2 (`fully_shard`): each parameter, its gradient and optimizer state sharded.

    `replicas` x `shards` is the device mesh (1 x W: fsdp; R x W/R: hsdp). The model is
    sharded in place, so the bare model and the wrapped one are the same module: its
    parameters are `DTensor`s whose local piece is this rank's shard. Every tensor is built
    whole on every rank first (`build_model` under the shared seed) and then cut, so the
    initial logical tensors do not depend on the layout.
    """

    reduces_in_backward = True
    sharded = True

    def __init__(self, world_size: int, replicas: int = 1, device_type: str = "cpu", divide: bool = False) -> None:
        if replicas < 1 or world_size % replicas:
            raise ValueError(f"a mesh of {replicas} replicas cannot hold {world_size} ranks")
        self.world_size, self.replicas, self.shards = world_size, replicas, world_size // replicas
        self.device_type = device_type
        # True only for the averaging mutant: FSDP2's default divides the summed gradient by W,
        # which the step's global-count normalization has already done.
        self.divide = divide
        self.name = "fsdp" if replicas == 1 else f"hsdp {replicas}x{self.shards}"
        self.mesh: Any = None

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        # fully_shard replaces every parameter by a DTensor one: the optimizer is rebuilt over
        # the new parameters, group by group, with the same settings (it has no state yet).
        if optimizer.state:
            raise ValueError("shard the model before the optimizer takes a step: its state would be left behind")
        place = {id(p): i for i, p in enumerate(model.parameters())}
        groups = [
            ({k: v for k, v in g.items() if k != "params"}, [place[id(p)] for p in g["params"]])
            for g in optimizer.param_groups
        ]
        wrapped = self.wrap(model)
        params = list(model.parameters())
        kind = type(optimizer)
        accepted = inspect.signature(kind.__init__).parameters  # defaults also hold derived keys
        rebuilt = kind(
            [{**settings, "params": [params[i] for i in where]} for settings, where in groups],
            **{k: v for k, v in optimizer.defaults.items() if k in accepted},
        )
        return wrapped, rebuilt

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if self.replicas == 1:
            self.mesh = init_device_mesh(self.device_type, (self.shards,), mesh_dim_names=("shard",))
        else:
            self.mesh = init_device_mesh(
                self.device_type, (self.replicas, self.shards), mesh_dim_names=("replicate", "shard")
            )
        # One FSDP unit per block of a ModuleList (the transformer's layers), then the root for
        # the rest: the usual granularity, and a real multi-unit case for the reductions.
        for child in list(model.modules()):
            if isinstance(child, nn.ModuleList):
                for block in child:
                    fully_shard(block, mesh=self.mesh)
        fully_shard(model, mesh=self.mesh)
        # distshare's own models return logits that nothing modifies in place (the step only
        # reads them into the loss), so FSDP2's warning about a returned view says nothing here;
        # a user's model keeps it.
        warnings.filterwarnings(
            "ignore", message=r"FSDP2-wrapped module \(FSDP(TinyTransformer|SmallCNN)\) returned a view tensor"
        )
        for unit in model.modules():
            if isinstance(unit, FSDPModule) and not self.divide:
                # Add the ranks, never average: the loss is already divided by the global
                # item count. Divide factor 1 with SUM-only collectives (gloo has no AVG) is a
                # plain SUM reduce-scatter (and, under hsdp, a SUM all-reduce across groups).
                unit.set_gradient_divide_factor(1.0)
                unit.set_force_sum_reduction_for_comms(True)
        return model

    @contextlib.contextmanager
    def micro_step(self, wrapped: nn.Module, last: bool) -> Iterator[None]:
        # FSDP2's no_sync(): gradients accumulate unsharded on each rank, and the last
        # micro-batch's backward reduce-scatters the accumulated sum once.
        wrapped.set_requires_gradient_sync(last)  # type: ignore[operator]
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)  # type: ignore[operator]


def is_sharded(sync: GradSync) -> bool:
    """Does this sync hold the model as shards (FSDP2 / HSDP) rather than replicas?"""
    return bool(getattr(sync, "sharded", False))


def sum_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    fut = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def make_sync(
    mode: str, world_size: int, parallel: str = "ddp", replicas: int = 1, device_type: str = "cpu"
) -> GradSync:
    """The sync for `mode` ("ddp" | "allreduce" | "exact") and layout `parallel` ("ddp" |
    "fsdp" | "hsdp", with `replicas` groups); single process gets the no-op, except in exact
    mode, whose arithmetic is the point even on one process."""
    if parallel != "ddp" and world_size > 1:
        return ShardedSync(world_size, replicas if parallel == "hsdp" else 1, device_type)
    if mode == "exact":
        return ExactSync(world_size)
    if world_size == 1:
        return GradSync()
    return {"ddp": DDPSync, "allreduce": AllReduceSync}[mode]()
