"""The one training step and the loop around it, the same for every engine.

Engines differ only in how processes start (a single process, spawned gloo ranks,
torchrun) and which `GradSync` they use; the step below is all there is to training:

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

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distshare.config import RunConfig
from distshare.data import build_dataset
from distshare.data.plan import GlobalBatchPlan
from distshare.data.tensors import TensorTable
from distshare.data.types import IGNORE_INDEX, Batch, DataInfo
from distshare.distributed.sync import GradSync, make_sync
from distshare.distributed.world import World
from distshare.integrity.fingerprint import fingerprint_grads
from distshare.models import build_model

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Run:
    """Everything the step needs, built identically on every rank from the same config."""

    cfg: RunConfig
    world: World
    info: DataInfo
    table: TensorTable
    plan: GlobalBatchPlan
    model: nn.Module  # the bare model: fingerprints and names come from here
    wrapped: nn.Module  # what forward is called on (DDP wrapper or the model itself)
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
    sync = sync or make_sync(cfg.sync, world.world_size)
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
    indices: list[list[int]]  # global sample indices of each of this rank's micro-batches
    local_grads: dict[str, str] | None = None  # grad fingerprints before the sync, if probed


def train_step(run: Run, step: int, probe_local_grads: bool = False) -> StepStats:
    """One optimizer step over this rank's k micro-batches of global batch `step`."""
    micro = run.plan.rank_micro_batches(step, run.world.rank)
    # Every rank knows the whole plan, so it counts the global batch's items locally:
    # no collective needed to learn the normalizer.
    global_indices = run.plan.global_batch(step)
    global_items = run.table.count_items(global_indices)
    run.optimizer.zero_grad(set_to_none=True)
    run.sync.start_step(run.model, global_items, len(global_indices))
    total = torch.zeros((), dtype=torch.float64)
    local_grads = None
    # What a rank computed alone is visible just before the sync. Under DDP the last
    # backward already all-reduced, so only the no_sync micro-batches show it (k >= 2).
    probe_at = len(micro) - 2 if run.sync.reduces_in_backward else len(micro) - 1
    for i, indices in enumerate(micro):
        last = i == len(micro) - 1
        batch = run.table.select(indices).to(run.world.device)
        if run.sync.per_sample:  # exact mode: the sync takes the samples, computed in finish()
            run.sync.accumulate(run.model, {"inputs": batch.inputs, "labels": batch.labels}, sample_losses)
            continue
        with run.sync.micro_step(run.wrapped, last):
            loss = _micro_loss(run, batch)
            run.sync.backward(loss / global_items)
        total += loss.detach().to(torch.float64).cpu()
        if probe_local_grads and i == probe_at:
            local_grads = fingerprint_grads(run.model)
    run.sync.finish(run.model)
    if run.sync.per_sample:
        total += run.sync.step_loss
    run.optimizer.step()
    return StepStats(float(total), global_items, [m.tolist() for m in micro], local_grads)


def sample_losses(model: nn.Module, sample: dict[str, Any]) -> torch.Tensor:
    """Each sample's summed loss, [n], of `{"inputs", "labels"}`: what exact mode differentiates."""
    logits = model(**sample["inputs"])
    labels = sample["labels"]
    per_item = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none", ignore_index=IGNORE_INDEX
    )
    return per_item.reshape(labels.shape[0], -1).sum(dim=1)  # ignored items are exactly 0


def _micro_loss(run: Run, batch: Batch) -> torch.Tensor:
    if len(batch) == 0:
        # An empty slot (last incomplete global batch) must still join the gradient
        # all-reduce, and DDP only reduces after a forward through its wrapper: run one
        # sample and scale its loss by exactly zero, which contributes exactly zero.
        stand_in = run.table.select([0]).to(run.world.device)
        return loss_sum(run.wrapped(**stand_in.inputs), stand_in.labels) * 0.0
    logits = run.wrapped(**batch.inputs)
    return loss_sum(logits, batch.labels)
