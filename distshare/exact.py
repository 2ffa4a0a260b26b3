"""Exact mode in your own training loop: the same gradient, bit for bit, for every split of the batch.

Data-parallel training with W ranks and k accumulation steps matches one big batch only up
to rounding: the split changes the order of the floating-point additions. Exact mode
removes the split from the arithmetic. Each sample's gradient is computed alone, in one
fixed chunk shape, and the samples' gradients are added as integers, across micro-batches
and ranks. The gradient is then the same bits for every (W, k), and so is the whole
training trajectory. `ExactGradients` takes the place of DDP's backward in a plain loop
(no DDP wrapper is needed: the sum is its own collective):

    exact = distshare.exact.ExactGradients(model)           # world size from torch.distributed
    for step, micro_batches in enumerate(my_rank_batches):
        exact.start_step(global_items=tokens_in_global_batch, global_samples=samples_in_global_batch)
        for batch in micro_batches:
            exact.accumulate(batch, per_sample_loss)      # per_sample_loss(model, batch) -> [n]
        exact.synchronize()                                 # every .grad = exact sum / global_items
        optimizer.step()
        optimizer.zero_grad()

`per_sample_loss(model, batch)` returns each sample's *summed* loss (shape [n], n the
samples along dim 0 of every tensor in `batch`); the gradient is divided once, by
`global_items` (samples, or label tokens). Layers whose result depends on the split by
design (BatchNorm in training mode, dropout with p > 0) are refused with one line.

How the per-sample gradients are computed (`method`): "auto" takes the fastest that the
model's layers allow (`distshare.numerics.per_sample`): per-layer rules on one batched
backward for models of Linear, transformers' Conv1D, Conv2d, Embedding and LayerNorm layers (GPT-2,
BERT), else torch's expanded weights, else `torch.func.vmap`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distshare.distributed.sync import ExactSync
from distshare.errors import UsageError
from distshare.numerics.per_sample import CHUNK, METHODS, choose_method, refuse_split_dependent

__all__ = ["CHUNK", "ExactGradients"]

PerSampleLoss = Callable[[nn.Module, Any], torch.Tensor]  # (model, batch) -> each sample's summed loss, [n]


class ExactGradients:
    """Sets `model`'s gradients to the exact sum of per-sample gradients over every rank's samples.

    `world_size` defaults to the size of `group` (the default process group) when
    torch.distributed is initialized, else 1. `synchronize` is a collective: every rank of
    the group calls it once per step, in the same order.
    """

    def __init__(
        self,
        model: nn.Module,
        world_size: int | None = None,
        group: dist.ProcessGroup | None = None,
        method: str = "auto",
    ) -> None:
        if method not in METHODS:
            raise UsageError(f"exact: method {method!r} is not one of {', '.join(METHODS)}")
        if world_size is None:
            world_size = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
        if world_size < 1:
            raise UsageError(f"exact: world_size must be >= 1, got {world_size}")
        if next(model.parameters(), None) is None:
            raise UsageError("exact: the model has no parameters to compute gradients of")
        refuse_split_dependent(model)
        self.model = model
        self._sync = ExactSync(world_size, group, method)
        self._started = False

    @property
    def method(self) -> str:
        """The per-sample method used: the one asked for, or what "auto" chose for this model."""
        return choose_method(self.model) if self._sync.method == "auto" else self._sync.method

    @property
    def underflows(self) -> int:
        """Per-sample contributions rounded to 0 so far, summed over steps and ranks (never silent)."""
        return self._sync.underflows

    def start_step(self, global_items: float, global_samples: int) -> None:
        """Begin a step. `global_items`: what the summed loss is divided by (samples or tokens of
        the WHOLE global batch, all ranks and micro-batches); `global_samples`: its samples."""
        if not global_items > 0:
            raise UsageError(f"exact: global_items must be > 0 (the global batch's loss items), got {global_items}")
        if int(global_samples) != global_samples or global_samples < 0:
            raise UsageError(f"exact: global_samples must be a count >= 0, got {global_samples}")
        # Checked every step: a model put back into train() after construction is caught too.
        refuse_split_dependent(self.model)
        self._sync.start_step(self.model, global_items, int(global_samples))
        self._started = True

    def accumulate(self, batch: Any, per_sample_loss: PerSampleLoss) -> None:
        """Hand over one micro-batch: a tensor, or a dict / tuple of tensors, samples along dim 0.

        Nothing is computed yet: the step's samples are computed together in `synchronize`,
        in the fixed chunk shape, whatever the micro-batches were.
        """
        if not self._started:
            raise UsageError("exact: accumulate() before start_step(): call start_step(global_items, global_samples)")
        if not callable(per_sample_loss):
            raise UsageError("exact: per_sample_loss must be a function (model, batch) -> each sample's loss, [n]")
        self._sync.accumulate(self.model, batch, per_sample_loss)

    def synchronize(self) -> float:
        """Set every parameter's .grad to the exact sum over all ranks / global_items; a collective.

        Returns this rank's summed loss of the step (its samples only).
        """
        if not self._started:
            raise UsageError("exact: synchronize() before start_step(): call start_step(global_items, global_samples)")
        self._started = False
        self._sync.synchronize(self.model)
        return self._sync.step_loss
