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

from distshare.distributed.sync import GradSync, PerSampleSync
from distshare.numerics.per_sample import add_per_sample_grads
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


class SampleMagnitudes(PerSampleSync):
    """The sum over a global batch's samples of |each sample's contribution to the gradient|.

    A sync for `step_gradient` that takes the step's per-sample path, as exact mode's sync
    does: n samples cost about one batched backward, not n backwards of one sample. `totals`
    then holds, per parameter, the float64 sum of |gradient of that sample's summed loss| /
    the step's normalizer; `.grad` is left unset. A model whose layers mix samples is refused
    before anything runs (`UsageError`, from `PerSampleSync.prepare`).
    """

    name = "sample magnitudes"

    def __init__(self) -> None:
        super().__init__()
        self.totals: dict[str, torch.Tensor] = {}

    def synchronize(self, model: nn.Module) -> None:
        named = list(model.named_parameters())
        device = named[0][1].device if named else torch.device("cpu")
        flat = torch.zeros(sum(p.numel() for _, p in named), dtype=torch.float64, device=device)

        def add(block: torch.Tensor, start: int) -> None:
            # |x| is exact in any precision; the sum over the chunk's samples is float64.
            flat[start : start + block.shape[1]] += block.abs().sum(0, dtype=torch.float64)

        batch = self.take_samples()
        self.step_loss = 0.0
        if batch is not None:
            self.step_loss = float(add_per_sample_grads(model, batch, self.loss_fn, add).sum())
        pieces = (flat / self.normalizer).cpu().split([p.numel() for _, p in named])
        self.totals = {name: piece.view(p.shape) for (name, p), piece in zip(named, pieces, strict=True)}
