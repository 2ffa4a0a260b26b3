"""The one step's gradient without its update: what a partition is compared against.

The reference gradient of a global batch, the per-sample magnitudes of the rounding bound
and the pitfalls' measurements are all "what the step computes from these micro-batches at
these parameters". They come from the one step (`distshare.training.optimizer_step`) with
an optimizer that does not move the parameters, so that no gradient here is computed by a
hand-written copy of the step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from distshare.distributed.sync import GradSync
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
