"""The one training step, the same for every engine, every model and every check.

Engines differ only in how processes start (a single process, spawned gloo ranks,
torchrun, accelerate, Ray) and which `GradSync` they use; the step below is all there is
to training (`optimizer_step` for any model and data; `train_step` for distshare's own runs,
which the loop calls; the equivalence grid and its pitfalls call it too):

    for each of this rank's k micro-batches:
        loss = (sum of per-item losses) / (items in the WHOLE global batch)
        loss.backward()                      # accumulates into .grad
    synchronize gradients (sum over ranks)   # -> the large-batch gradient, on every rank
    optimizer.step()                         # the same update of the same parameters everywhere

Dividing by the global item count (torchtitan does the same) is what makes "W ranks x k
micro-batches" the same computation as "one process, one big batch", even when
micro-batches hold different numbers of tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distshare.config import DTYPES, RunConfig, hsdp_mesh
from distshare.data import build_dataset
from distshare.data.plan import GlobalBatchPlan
from distshare.data.tensors import TensorTable
from distshare.data.types import IGNORE_INDEX, Batch, DataInfo
from distshare.distributed.sync import GradSync, make_sync
from distshare.distributed.world import World
from distshare.models import build_model


@dataclass
class Run:
    """Everything the step needs, built identically on every rank from the same config."""

    cfg: RunConfig
    world: World
    info: DataInfo
    table: TensorTable
    plan: GlobalBatchPlan
    model: nn.Module  # the bare model: fingerprints and names come from here (FSDP2: sharded in place)
    wrapped: nn.Module  # what forward is called on (DDP wrapper, or the model itself: FSDP2, one process)
    optimizer: torch.optim.Optimizer
    sync: GradSync


def build_run(cfg: RunConfig, world: World, sync: GradSync | None = None) -> Run:
    """Data, plan, model, optimizer and sync for this rank; the same on every rank.

    `sync` is the engine's, when the engine brings its own (accelerate); else from `cfg.sync`.
    """
    dtype = DTYPES[cfg.model.dtype]
    dataset, info = build_dataset(cfg.data)
    table = TensorTable.from_dataset(dataset, info, dtype)
    plan = GlobalBatchPlan(
        num_samples=len(table),
        plan=cfg.plan.resolve(world.world_size),
        seed=cfg.plan.seed,
        drop_last=cfg.plan.drop_last,
    )
    model = build_model(cfg.model, info, seed=cfg.seed).to(world.device)
    sync = sync or make_sync(
        cfg.sync, world.world_size, cfg.parallel, hsdp_mesh(cfg, world.world_size)[0], world.device.type
    )
    wrapped, optimizer = sync.prepare(model, build_optimizer(cfg, model))
    return Run(cfg, world, info, table, plan, model, wrapped, optimizer, sync)


def build_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    params = model.parameters()
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed (not averaged) cross-entropy over the non-ignored items of a micro-batch."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum", ignore_index=IGNORE_INDEX
    )


@dataclass
class StepStats:
    """What one rank saw in one step."""

    loss_sum: float  # this rank's summed loss (before dividing by the global count)
    global_items: int  # loss items in the whole global batch: the normalizer
    # Global sample indices of each of this rank's micro-batches, as the loss consumed them:
    # read from the batch itself when its loss is computed, not copied from the plan, so a
    # skipped, repeated or swapped micro-batch shows in the sample accounting.
    indices: list[list[int]]


LossFn = Callable[[nn.Module, Any], torch.Tensor]


def optimizer_step(
    model: nn.Module,
    wrapped: nn.Module,
    optimizer: torch.optim.Optimizer,
    sync: GradSync,
    micro_batches: Sequence[Any],
    normalizer: float,
    global_samples: int,
    loss_fn: LossFn,
    sample_loss_fn: LossFn | None = None,
    on_local_grads: Callable[[], None] | None = None,
) -> float:
    """The one step, for any model and data: this rank's micro-batches, one optimizer step.

    `micro_batches` are this rank's k micro-batches of the global batch, in order, in
    whatever form `loss_fn(module, batch)` takes; it returns the micro-batch's *summed*
    loss, and the step divides it by `normalizer`, the loss items of the WHOLE global
    batch. `sample_loss_fn(model, batch)` gives each sample's summed loss ([n]); exact mode
    differentiates that instead. `on_local_grads` is called once, when `.grad` holds what
    this rank computed alone, before any sync. Returns this rank's summed loss.
    """
    optimizer.zero_grad(set_to_none=True)
    sync.start_step(model, normalizer, global_samples)
    total = torch.zeros((), dtype=torch.float64)
    # What a rank computed alone is visible just before the sync. Under DDP the last
    # backward already all-reduces, so only the no_sync micro-batches show it (k >= 2).
    probe_at = len(micro_batches) - 2 if sync.reduces_in_backward else len(micro_batches) - 1
    for i, batch in enumerate(micro_batches):
        if sync.per_sample:  # exact mode: the sync takes the samples, computed in synchronize()
            if sample_loss_fn is None:
                raise ValueError(f"sync {sync.name!r} needs per-sample losses (sample_loss_fn)")
            sync.accumulate(model, batch, sample_loss_fn)
            continue
        with sync.micro_step(wrapped, i == len(micro_batches) - 1):
            loss = loss_fn(wrapped, batch)
            sync.backward(loss / normalizer)
        total += loss.detach().to(torch.float64).cpu()
        if on_local_grads is not None and i == probe_at:
            on_local_grads()
    sync.synchronize(model)
    if sync.per_sample:
        total += sync.step_loss
    optimizer.step()
    return float(total)


def train_step(run: Run, step: int, on_local_grads: Callable[[], None] | None = None) -> StepStats:
    """One optimizer step of distshare's own training over this rank's k micro-batches of global batch `step`."""
    micro = run.plan.rank_micro_batches(step, run.world.rank)
    # Every rank knows the whole plan, so it counts the global batch's items locally:
    # no collective needed to learn the normalizer.
    global_indices = run.plan.global_batch(step)
    global_items = run.table.count_items(global_indices)
    batches = [_as_sample(run.table.select(indices).to(run.world.device)) for indices in micro]
    consumed: list[list[int]] = []

    def micro_loss(module: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        consumed.append(batch["indices"].tolist())  # what this loss is computed from
        return _micro_loss(run, module, batch)

    if run.sync.per_sample:
        # Exact mode computes the losses inside the sync, in padded chunks of samples; what it
        # consumes is exactly the batches it is handed, so those are recorded.
        consumed.extend(b["indices"].tolist() for b in batches)
    total = optimizer_step(
        run.model,
        run.wrapped,
        run.optimizer,
        run.sync,
        batches,
        global_items,
        len(global_indices),
        micro_loss,
        sample_losses,
        on_local_grads,
    )
    return StepStats(total, global_items, consumed)


def _as_sample(batch: Batch) -> dict[str, Any]:
    """A micro-batch as the loss sees it; `indices` travel with it so accounting reads what was used."""
    return {"inputs": batch.inputs, "labels": batch.labels, "indices": batch.indices}


def sample_losses(model: nn.Module, sample: dict[str, Any]) -> torch.Tensor:
    """Each sample's summed loss, [n], of `{"inputs", "labels"}`: what exact mode differentiates."""
    logits = model(**sample["inputs"])
    labels = sample["labels"]
    per_item = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none", ignore_index=IGNORE_INDEX
    )
    return per_item.reshape(labels.shape[0], -1).sum(dim=1)  # ignored items are exactly 0


def _micro_loss(run: Run, module: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    if batch["labels"].shape[0] == 0:
        # An empty slot (last incomplete global batch) must still join the gradient
        # all-reduce, and DDP only reduces after a forward through its wrapper: run one
        # sample and scale its loss by exactly zero, which contributes exactly zero.
        stand_in = run.table.select([0]).to(run.world.device)
        return loss_sum(module(**stand_in.inputs), stand_in.labels) * 0.0
    return loss_sum(module(**batch["inputs"]), batch["labels"])
