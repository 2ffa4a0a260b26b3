"""Order-independent exact gradient reduction: `--sync exact`.

Every framework says that W ranks x k micro-batches match one big batch only up to
rounding, because floating-point addition is not associative: splitting the batch changes
the order of the sum. Exact mode removes both places where the split enters.

1. **Each sample's contribution is computed alone, always in the same shape.** Per-sample
   gradients (torch's expanded weights, or `torch.func.vmap(grad(...))`) are taken over
   chunks of exactly `CHUNK` samples (the last chunk padded by repeating a sample whose
   result is then dropped). On this CPU a batched forward at batch size 1 differs from the
   same rows at batch size 2+, and vmapped per-sample gradients at 2 or 3 differ from those
   at 4+ (BLAS picks kernels by size). A fixed shape makes a sample's gradient a function of the sample and the
   parameters only: not of the micro-batch size, its position in it, the rank or k.
2. **The contributions are added in integers.** For every gradient element j, the largest
   |contribution| over the whole global batch is found by an all-reduce MAX (max is exact
   and order-free), which fixes a shared exponent e_j. Each contribution is scaled by
   2^(62 - h - e_j) (h = ceil(log2 n) for n samples) and rounded to an int64: n of them
   cannot exceed 2^62, so the local sums and the all-reduce SUM are exact integer
   additions, associative in any order. The integer total is turned back into a float once
   and divided by the global item count once.

So the gradient, and with it the whole training state, is bitwise the same for every
partition of the global batch, every engine, and every order of arrival.

Precision: each contribution keeps 62 - h bits below its element's largest contribution
(57 bits for 32 samples): finer than float64's 53 for the large ones, coarser for those
that are far smaller. A non-zero contribution below half a unit of its element's scale
becomes 0; such underflows are counted, reported and never silent. Overflow of the integer
sum cannot happen by construction; a non-finite gradient or a total that does not fit the
parameter dtype raises `ExactOverflow` naming the parameter.

Cost: one forward and backward per sample (vectorized), a buffer of this rank's per-sample
gradients for one step (samples per rank x parameters), and two collectives instead of one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils._pytree import tree_leaves, tree_map

from distshare.errors import UsageError, VerificationFailed

# Samples per vectorized gradient call, always: the one shape every sample is computed in.
# A call costs about the same for 4 or 32 samples on the demo models (its overhead is per
# operation, not per sample), so one large chunk per step beats several small ones.
CHUNK = 32
INT_BITS = 62  # headroom below int64's 63 bits: n contributions of < 2^(62 - h) sum to < 2^62

LossFn = Callable[[nn.Module, Any], torch.Tensor]  # (model, a batch) -> each sample's summed loss, [n]


class ExactOverflow(VerificationFailed):
    """A gradient that exact mode cannot represent: non-finite, or a sum beyond the dtype's range."""


def refuse_split_dependent(model: nn.Module) -> None:
    """Refuse layers whose output depends on which samples share a batch (exit 2, one line).

    BatchNorm in training mode normalizes by its micro-batch's statistics, and dropout draws
    one random mask per batch: with either, the split of the global batch changes the
    result by design, so no exact arithmetic can make partitions agree.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise UsageError(
                f"sync=exact: layer '{name}' is BatchNorm in training mode, whose output depends on the "
                "micro-batch it sees; use model.norm=group (or none), or sync=ddp"
            )
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0 and module.training:
            raise UsageError(
                f"sync=exact: layer '{name}' is dropout (p={module.p}), whose random mask depends on how "
                "the batch is split; set p=0 or use sync=ddp"
            )


# Layers whose per-sample gradients torch computes in one batched backward (expanded weights).
_EXPANDABLE = (
    nn.Linear,
    nn.Embedding,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.conv._ConvNd,
    nn.modules.instancenorm._InstanceNorm,
)


def per_sample_grads(model: nn.Module, batch: Any, losses_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gradients as one [n, P] matrix (parameters flattened in order), and the n losses.

    `batch` is a pytree (dict / tuple) of tensors with the samples along dim 0;
    `losses_fn(model, batch)` returns each sample's summed loss, [n]. Every gradient call sees
    exactly `CHUNK` samples, whatever n is: the last chunk is padded by repeating its last
    sample, whose rows are dropped.

    Two ways to compute them, chosen by the model (so one model always takes the same one):
    torch's expanded weights (one batched forward and backward, about 1.5x faster) when every
    layer holding parameters is one it supports, else `torch.func.vmap` of `grad`.
    """
    leaves = _leaves(batch)
    n = int(leaves[0].shape[0]) if leaves else 0
    params = [p for _, p in model.named_parameters()]
    if n == 0:
        size = sum(p.numel() for p in params)
        return params[0].new_zeros(0, size), torch.zeros(0, dtype=torch.float64)
    chunk_grads = _expanded_grads if _expandable(model) else _vmap_grads(model, losses_fn)
    rows, losses = [], []
    for start in range(0, n, CHUNK):
        take = min(CHUNK, n - start)
        index = torch.arange(start, start + CHUNK, device=leaves[0].device).clamp(max=start + take - 1)
        chunk = tree_map(lambda t, index=index: t.index_select(0, index), batch)
        g, loss = chunk_grads(model, chunk, losses_fn)
        rows.append(g[:take])
        losses.append(loss[:take].detach().to(torch.float64).cpu())
    return (rows[0] if len(rows) == 1 else torch.cat(rows)), torch.cat(losses)


def _expandable(model: nn.Module) -> bool:
    return all(
        isinstance(m, _EXPANDABLE) for m in model.modules() if next(m.parameters(recurse=False), None) is not None
    )


class _Forward:
    """Stands in for the model inside `losses_fn`: calling it runs the expanded-weights forward."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)


def _expanded_grads(model: nn.Module, chunk: Any, losses_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

    params = [p for _, p in model.named_parameters()]
    forward = call_for_per_sample_grads(model, batch_size=CHUNK, loss_reduction="sum")
    losses = losses_fn(_Forward(forward), chunk)  # type: ignore[arg-type]
    losses.sum().backward()
    rows = torch.cat([p.grad_sample.reshape(CHUNK, -1) for p in params], dim=1)  # type: ignore[attr-defined]
    for p in params:
        p.grad_sample = None  # type: ignore[attr-defined]
        p.grad = None
    return rows, losses


def _vmap_grads(model: nn.Module, losses_fn: LossFn) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    params = {f"m.{k}": v.detach() for k, v in model.named_parameters()}
    buffers = {f"m.{k}": v for k, v in model.named_buffers()}

    def one(p: dict[str, torch.Tensor], sample: Any) -> torch.Tensor:
        one_batch = tree_map(lambda t: t.unsqueeze(0), sample)
        return functional_call(_WithLoss(model, losses_fn), (p, buffers), (one_batch,))

    grads_of = vmap(grad_and_value(one), in_dims=(None, 0))

    def chunk_grads(model: nn.Module, chunk: Any, losses_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor]:
        g, loss = grads_of(params, chunk)
        return torch.cat([g[k].reshape(CHUNK, -1) for k in params], dim=1), loss

    return chunk_grads


class _WithLoss(nn.Module):
    """The model and its loss as one module, so `functional_call` can swap in the parameters."""

    def __init__(self, model: nn.Module, losses_fn: LossFn) -> None:
        super().__init__()
        self.m = model
        self.losses_fn = losses_fn

    def forward(self, sample: Any) -> torch.Tensor:
        return self.losses_fn(self.m, sample)[0]  # a batch of one: its one loss


def _leaves(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


class ExactGradSum:
    """One step's exact sum of per-sample gradient contributions, over micro-batches and ranks."""

    def __init__(self, model: nn.Module, global_samples: int, world_size: int = 1) -> None:
        self.params = list(model.named_parameters())  # the order `per_sample_grads` flattens in
        self.size = sum(p.numel() for _, p in self.params)
        first = self.params[0][1]
        self.dtype, self.device = first.dtype, first.device
        self.n = max(1, global_samples)
        self.world_size = world_size
        self.rows: list[torch.Tensor] = []
        self.underflows = 0  # contributions of this step that rounded to 0 (all ranks)

    def add(self, rows: torch.Tensor) -> None:
        """This rank's per-sample gradients of one micro-batch, [n_i, P]."""
        if rows.shape[0]:
            self.rows.append(rows)

    def total(self) -> torch.Tensor:
        """The exact sum over every rank's contributions, rounded once to float64; collective."""
        if not self.rows:
            local = torch.zeros(0, self.size, dtype=self.dtype, device=self.device)
        else:
            local = self.rows[0] if len(self.rows) == 1 else torch.cat(self.rows)
        top = local.abs().amax(dim=0) if local.shape[0] else local.new_zeros(self.size)
        top = torch.where(torch.isnan(top), torch.full_like(top, math.inf), top)
        if self._distributed:
            dist.all_reduce(top, op=dist.ReduceOp.MAX)
        bad = ~torch.isfinite(top)
        if bool(bad.any()):
            raise ExactOverflow(f"sync=exact: the gradient of {self._name_at(int(bad.nonzero()[0]))} is not finite")
        headroom = INT_BITS - math.ceil(math.log2(self.n))
        _, exponent = torch.frexp(top.to(torch.float64))  # top < 2^exponent (0 where top == 0)
        shift = headroom - exponent.to(torch.int64)
        ints = _to_fixed(local, shift)
        # Rounding never turns 0 into non-zero: the non-zeros that vanished are the underflows.
        lost = torch.count_nonzero(local) - torch.count_nonzero(ints)
        summed = torch.cat([ints.sum(dim=0), lost.reshape(1)])
        if self._distributed:
            dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        self.underflows = int(summed[-1])
        return _ldexp(summed[:-1].to(torch.float64), -shift)

    def write_grads(self, normalizer: float) -> None:
        """Set every parameter's .grad to total / normalizer in its own dtype; collective."""
        flat = self.total() / normalizer
        rounded = flat.to(self.dtype)
        over = torch.isinf(rounded) & torch.isfinite(flat)
        if bool(over.any()):
            i = int(over.nonzero()[0])
            raise ExactOverflow(
                f"sync=exact: the gradient of {self._name_at(i)} is {float(flat[i]):.3g}, "
                f"beyond the range of {str(self.dtype).removeprefix('torch.')}"
            )
        offset = 0
        for _, p in self.params:  # views of one buffer, as DDP's gradient buckets are
            p.grad = rounded[offset : offset + p.numel()].view_as(p)
            offset += p.numel()

    @property
    def _distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def _name_at(self, flat_index: int) -> str:
        offset = 0
        for name, p in self.params:
            if flat_index < offset + p.numel():
                return f"'{name}' (element {flat_index - offset})"
            offset += p.numel()
        return f"element {flat_index}"


def _to_fixed(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """round(x * 2^shift) as int64, column j scaled by 2^shift[j].

    In x's own dtype when every 2^shift[j] is a float of that dtype: multiplying by a power
    of two is then exact (the results are below 2^62, and one that falls below the normal
    range is below 0.5 and rounds to 0 either way), so the integers are the float64 route's,
    without a float64 copy of every contribution. Else through float64.
    """
    info = torch.finfo(x.dtype)
    highest = math.frexp(info.max)[1] - 1  # 2^highest is the largest power of two of the dtype
    lowest = math.frexp(info.smallest_normal)[1] - 1 + math.frexp(info.eps)[1] - 1  # the smallest subnormal
    if int(shift.max()) <= highest and int(shift.min()) >= lowest:
        return (x * torch.exp2(shift.to(x.dtype))).round_().to(torch.int64)
    return _ldexp(x.to(torch.float64), shift).round_().to(torch.int64)


def _ldexp(x: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """x * 2^exponent elementwise, exact wherever the result is a normal float64.

    In two factors: one power of two of the whole range (up to about 2^1130 here) does not
    fit a float64, each half does.
    """
    if int(exponent.max()) <= 1000 and int(exponent.min()) >= -1000:  # the usual case: one factor
        return x * torch.exp2(exponent.to(torch.float64))
    half = torch.div(exponent, 2, rounding_mode="floor")
    return x * torch.exp2(half.to(torch.float64)) * torch.exp2((exponent - half).to(torch.float64))
