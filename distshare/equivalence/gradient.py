"""The one step's gradient without its update: what a partition is compared against.

The reference gradient of a global batch, the per-sample magnitudes of the rounding bound
and the pitfalls' measurements are all "what the step computes from these micro-batches at
these parameters". They come from the one step (`distshare.training.optimizer_step`) with
an optimizer that does not move the parameters, so that no gradient here is computed by a
hand-written copy of the step. The per-sample magnitudes take the step's per-sample path
(the one exact mode takes) with a sync that sums |each sample's gradient| instead
(`SampleMagnitudes`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from distshare.distributed.sync import GradSync
from distshare.numerics.per_sample import add_per_sample_grads, refuse_split_dependent
from distshare.training import optimizer_step

LossFn = Callable[[nn.Module, Any], torch.Tensor]  # (module, micro-batch) -> its summed loss


class HoldParameters(torch.optim.Optimizer):
    """An optimizer whose step leaves every parameter as it is: the step stops at the gradient."""

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        super().__init__(params, {})

    def step(self, closure: Any = None) -> None:
        return None


def step_gradient(
    model: nn.Module,
    micro_batches: Sequence[Any],
    normalizer: float,
    global_samples: int,
    loss_fn: LossFn,
    sync: GradSync | None = None,
    sample_loss_fn: LossFn | None = None,
) -> float:
    """Set `model`'s `.grad` to what the one step computes from `micro_batches`; no update.

    `sync` defaults to a single process's (nothing to synchronize); it wraps `model` as it
    would for training (DDP, with its hook). Returns the summed loss, as the step does.
    """
    sync = sync if sync is not None else GradSync()
    wrapped, hold = sync.prepare(model, HoldParameters(model.parameters()))
    return optimizer_step(
        model, wrapped, hold, sync, micro_batches, normalizer, global_samples, loss_fn, sample_loss_fn
    )


class SampleMagnitudes(GradSync):
    """The sum over a global batch's samples of |each sample's contribution to the gradient|.

    A sync for `step_gradient`: the step hands over its micro-batches' samples, as it does to
    exact mode's sync, and they are computed here together as per-sample gradients
    (`distshare.numerics.per_sample`, in fixed chunks): n samples cost about one batched
    backward, not n backwards of one sample. `totals` then holds, per parameter, the float64
    sum of |gradient of that sample's summed loss| / the step's normalizer; `.grad` is left
    unset. Layers that mix the samples of a batch (BatchNorm in training mode, dropout) are
    refused before anything runs (`UsageError`): their one-sample contribution is not a
    row of a batched computation.
    """

    name = "sample magnitudes"
    per_sample = True

    def __init__(self) -> None:
        self.samples: list[Any] = []
        self.loss_fn: LossFn | None = None
        self.normalizer = 1.0
        self.totals: dict[str, torch.Tensor] = {}

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        refuse_split_dependent(model)
        return model, optimizer

    def start_step(self, model: nn.Module, global_items: int, global_samples: int) -> None:
        self.samples, self.normalizer = [], float(global_items)

    def accumulate(self, model: nn.Module, batch: Any, loss_fn: LossFn) -> None:
        self.samples.append(batch)
        self.loss_fn = loss_fn

    def synchronize(self, model: nn.Module) -> None:
        named = list(model.named_parameters())
        device = named[0][1].device if named else torch.device("cpu")
        flat = torch.zeros(sum(p.numel() for _, p in named), dtype=torch.float64, device=device)

        def add(block: torch.Tensor, start: int) -> None:
            # |x| is exact in any precision; the sum over the chunk's samples is float64.
            flat[start : start + block.shape[1]] += block.abs().sum(0, dtype=torch.float64)

        self.step_loss = 0.0
        if self.samples and self.loss_fn is not None:
            batch = tree_map(lambda *parts: torch.cat(parts), *self.samples)
            self.step_loss = float(add_per_sample_grads(model, batch, self.loss_fn, add).sum())
        flat = (flat / self.normalizer).cpu()
        self.samples, self.totals, offset = [], {}, 0
        for name, p in named:
            self.totals[name] = flat[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
