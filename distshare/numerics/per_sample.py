"""Per-sample gradients in one fixed shape: each sample's contribution, whatever the split.

Per-sample gradients (torch's expanded weights, or `torch.func.vmap(grad(...))`) are taken
over chunks of exactly `CHUNK` samples (the last chunk padded by repeating a sample whose
result is then dropped). A batched forward at batch size 1 can differ in its last bits from
the same rows at batch size 2+, and vmapped per-sample gradients at 2 or 3 from those at 4+
(BLAS picks kernels by size). A fixed shape makes a sample's gradient a function of the
sample and the parameters only: not of the micro-batch size, its position in it, the rank
or k. Layers whose result depends on the split by design (BatchNorm in training mode,
dropout) are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils._pytree import tree_leaves, tree_map

from distshare.errors import UsageError

# Samples per vectorized gradient call, always: the one shape every sample is computed in.
# A call costs about the same for 4 or 32 samples on the demo models (its overhead is per
# operation, not per sample), so one large chunk per step beats several small ones.
CHUNK = 32

LossFn = Callable[[nn.Module, Any], torch.Tensor]  # (model, a batch) -> each sample's summed loss, [n]


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
