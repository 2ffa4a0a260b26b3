"""Pitfalls 1-5: what a step computes, caught by the partition grid or its sample accounting.

Each runs distshare's grid (or accounting) on small data, beside its correct version:

    1 token normalization   mean loss per micro-batch / k, with variable-length sequences
    2 accumulation scale    forgetting to divide by k, or dividing twice
    3 DistributedSampler    padding repeats samples; drop_last drops them
    4 BatchNorm             batch statistics depend on the split
    5 dropout               the random masks depend on the split

A wrong step is distshare's one step (`optimizer_step`) with one ingredient swapped
(`MicroMeanTask`: the loss); W = 1 is enough to break accumulation, dropout needs W = 2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distshare.config import PlanConfig, RunConfig, load_config
from distshare.data.accounting import account, account_epoch, distributed_sampler_indices
from distshare.data.plan import GlobalBatchPlan
from distshare.data.types import Batch
from distshare.equivalence.grid import GridResult, run_grid
from distshare.equivalence.pitfalls.record import Pitfall
from distshare.equivalence.tasks import ConfigTask, UserTask
from distshare.training import Run, loss_sum, optimizer_step

KS = (1, 2, 4)
G = 16


def _config(*overrides: str) -> RunConfig:
    base = [
        f"plan.global_batch={G}",
        "plan.accum_steps=1",
        "plan.micro_batch=null",
        "data.num_samples=128",
        "data.task=roles",
        "data.variable_length=true",
        "model.dtype=float64",
        "steps=2",
    ]
    return load_config(None, base + list(overrides))


def _grid(task: Any, ks: tuple[int, ...] = KS, world_sizes: tuple[int, ...] = (1,)) -> GridResult:
    return run_grid(task, world_sizes, ks, [None], steps=2, progress=False)


def _worst(result: GridResult) -> dict[str, float]:
    return {
        "grad_norm_rel_diff": max(p.grad_norm_rel_diff for p in result.partitions),
        "grad_excess_over_bound": max(p.grad_excess for p in result.partitions),
        "param_norm_rel_diff": max(p.norm_rel_diff for p in result.partitions),
        "bound_norm_rel": max(p.grad_bound_norm_rel for p in result.partitions),
    }


@dataclass
class MicroMeanTask(ConfigTask):
    """distshare's model and data, but a step that means the loss per micro-batch.

    `k_power`: the per-micro-batch mean is divided by k**k_power: 1 (the usual
    "loss / accum_steps"), 0 (forgot), 2 (divided by k twice).
    """

    k_power: int = 1

    def make_step(self, run: Run) -> Callable[[int], tuple[float, list[list[int]]]]:
        """The one step with its loss swapped: each micro-batch's own mean, then / k**k_power."""

        def step(s: int) -> tuple[float, list[list[int]]]:
            micro = run.plan.rank_micro_batches(s, run.world.rank)
            k = len(micro)
            sums: list[torch.Tensor] = []  # each micro-batch's summed loss: what the step reports
            consumed: list[list[int]] = []  # the samples each loss was computed from

            def micro_mean(module: nn.Module, batch: Batch) -> torch.Tensor:
                consumed.append(batch.indices.tolist())
                loss = loss_sum(module(**batch.inputs), batch.labels)
                sums.append(loss.detach())
                # The pitfall: each micro-batch's own mean, then / k (HF transformers < 4.46).
                return loss / batch.num_items / k**self.k_power

            batches = [run.table.select(indices).to(run.world.device) for indices in micro]
            # The loss arrives normalized already, so the step divides it by 1.
            global_samples = len(run.plan.global_batch(s))
            optimizer_step(run.model, run.wrapped, run.optimizer, run.sync, batches, 1, global_samples, micro_mean)
            return sum(float(x) for x in sums), consumed

        return step


def token_normalization() -> Pitfall:
    correct = _grid(ConfigTask(_config()))
    wrong = _grid(MicroMeanTask(_config()))
    fixed = _grid(MicroMeanTask(_config("data.variable_length=false")))
    w, c = _worst(wrong), _worst(correct)
    return Pitfall(
        1,
        "mean loss per micro-batch / k with variable-length sequences",
        "Averaging the loss inside each micro-batch and dividing by k gives every micro-batch the "
        "same weight, however many tokens it holds; the big batch gives every token the same "
        "weight. With variable-length sequences a token in a short micro-batch counts more. With "
        "fixed lengths the two agree, which is why the bug (HF transformers, fixed in 2024 by "
        "normalizing by num_items_in_batch) went unnoticed: nobody measured the grid on varied "
        "lengths. distshare sums the loss and divides by the global batch's token count.",
        f"gradient off by {w['grad_norm_rel_diff']:.1e} (normwise rel), {w['grad_excess_over_bound']:.1e} x the "
        f"rounding bound; correct step: {c['grad_excess_over_bound']:.2f} x; same bug on fixed lengths: "
        f"{_worst(fixed)['grad_excess_over_bound']:.2f} x (invisible)",
        "grid",
        detected=not wrong.ok and correct.ok and fixed.ok,
        distshare_avoids=correct.ok,
        measured={"wrong": w, "correct": c, "wrong_on_fixed_lengths": _worst(fixed)},
    )


def accumulation_scale() -> Pitfall:
    cfg = _config("data.task=subject", "data.variable_length=false")
    correct = _grid(ConfigTask(cfg))
    forgot = _grid(MicroMeanTask(cfg, k_power=0))
    twice = _grid(MicroMeanTask(cfg, k_power=2))
    k4 = {
        name: next(p for p in r.partitions if p.accum_steps == 4).grad_norm_rel_diff
        for name, r in (("forgot", forgot), ("twice", twice))
    }
    return Pitfall(
        2,
        "forgetting to divide by k, or dividing twice",
        "Accumulating k micro-batch means without dividing by k makes the gradient k times the "
        "big batch's; dividing by hand when the framework already does (accelerate's "
        "`Accelerator.backward` divides the loss by gradient_accumulation_steps) makes it 1/k of "
        "it. With Adam the parameters barely show it (Adam's update is nearly scale-invariant), "
        "with SGD the step is k times off; the gradient shows it at once. distshare divides once, "
        "by the global item count, and never leaves it to a wrapper.",
        f"k=4: gradient off by {k4['forgot']:.2f} (forgot, expected k-1 = 3) and {k4['twice']:.2f} "
        "(twice, expected 1-1/k = 0.75), normwise rel",
        "grid",
        detected=not forgot.ok and not twice.ok and correct.ok,
        distshare_avoids=correct.ok,
        measured={"forgot": _worst(forgot), "twice": _worst(twice), "correct": _worst(correct), "k4": k4},
    )


def distributed_sampler(num_samples: int = 42, world_size: int = 4) -> Pitfall:
    padded = account_epoch(num_samples, distributed_sampler_indices(num_samples, world_size, drop_last=False))
    dropped = account_epoch(num_samples, distributed_sampler_indices(num_samples, world_size, drop_last=True))
    # distshare's plan over the same data: the last incomplete global batch is split over the slots.
    resolved = PlanConfig(world_size=world_size, global_batch=8, accum_steps=1, micro_batch=None).resolve()
    plan = GlobalBatchPlan(num_samples, resolved, seed=0, drop_last=False)
    steps = plan.steps_per_epoch
    ours = account(plan, [[plan.rank_micro_batches(s, r) for s in range(steps)] for r in range(world_size)])
    n_dup = sum(len(v) for v in padded.duplicated.values())
    n_missing = sum(len(v) for v in dropped.missing.values())
    return Pitfall(
        3,
        "DistributedSampler pads with duplicates; drop_last drops samples",
        f"torch's DistributedSampler gives every rank the same number of samples. With {num_samples} "
        f"samples on {world_size} ranks, drop_last=False pads the epoch to a multiple of {world_size} by "
        "repeating samples from the start of the order, so their gradient counts twice; drop_last=True "
        "cuts the tail, so some samples never count. distshare's plan splits the last global batch "
        "over the ranks instead (some slots smaller or empty, normalized by the global count).",
        f"drop_last=False: {n_dup} samples counted twice; drop_last=True: {n_missing} never counted; "
        f"distshare's plan: {ours.summary()}",
        "accounting",
        detected=not padded.ok and not dropped.ok and ours.ok,
        distshare_avoids=ours.ok,
        measured={
            "padded": {"histogram": padded.count_histogram[0], "duplicated": n_dup},
            "drop_last": {"histogram": dropped.count_histogram[0], "missing": n_missing},
            "distshare_plan": {"ok": ours.ok, "steps": steps},
        },
    )


def batchnorm() -> Pitfall:
    cnn = ("model.name=cnn", "data.name=shapes", "data.num_samples=64", "model.conv_channels=4")
    bn = _grid(ConfigTask(_config(*cnn, "model.norm=batch")))
    gn = _grid(ConfigTask(_config(*cnn, "model.norm=group")))
    wb, wg = _worst(bn), _worst(gn)
    return Pitfall(
        4,
        "BatchNorm: batch statistics depend on the partition",
        "BatchNorm normalizes each micro-batch by its own mean and variance, so k micro-batches of "
        "b samples compute a different function than one batch of k x b, and the running statistics "
        "follow the micro-batches. SyncBatchNorm only pools statistics across ranks, not across "
        "micro-steps: on W ranks with k micro-batches it normalizes over W x b samples, exactly what "
        "one process with micro-batch W x b does (the W = 1, k rows below). (On the CPU torch refuses "
        "SyncBatchNorm outright: 'SyncBatchNorm layers only work with GPU modules'.) GroupNorm has no "
        "cross-sample statistics and passes the grid. distshare cannot make BatchNorm split-invariant; "
        "its grid flags it.",
        f"BatchNorm: gradient off by {wb['grad_norm_rel_diff']:.1e} normwise, "
        f"{wb['grad_excess_over_bound']:.1e} x the rounding bound; GroupNorm: {wg['grad_excess_over_bound']:.2f} x",
        "grid",
        detected=not bn.ok and gn.ok,
        distshare_avoids=False,
        measured={"batchnorm": wb, "groupnorm": wg},
    )


# Dropout: a model of its own (distshare's models have none, on purpose).


class DropoutMLP(nn.Module):
    """Linear, ReLU, dropout, linear. `keyed`: masks drawn per sample from its global index."""

    def __init__(self, keyed: bool = False, p: float = 0.5) -> None:
        super().__init__()
        self.keyed, self.p = keyed, p
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        if not self.keyed:
            h = F.dropout(h, self.p, self.training)
        elif self.training:
            # A sample's mask depends on the sample, not on which micro-batch it landed in.
            rows = [torch.rand(h.shape[1], generator=torch.Generator().manual_seed(int(i))) for i in index]
            keep = (torch.stack(rows) >= self.p).to(h.dtype) if rows else h.new_zeros(h.shape)
            h = h * keep / (1 - self.p)
        return self.fc2(h)


def dropout_model() -> nn.Module:
    return DropoutMLP().double()


def keyed_dropout_model() -> nn.Module:
    return DropoutMLP(keyed=True).double()


def mlp_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y, index = batch
    return F.cross_entropy(model(x, index), y, reduction="sum")


def toy_dataset(n: int = 64, seed: int = 0) -> torch.utils.data.TensorDataset:
    """Random 8-feature inputs, 4 classes, and each sample's own index (for keyed masks)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=gen)
    return torch.utils.data.TensorDataset(x, y, torch.arange(n))


def dropout() -> Pitfall:
    data = toy_dataset()
    both = (1, 2)
    wrong = _grid(UserTask(dropout_model, mlp_loss, data, G, optimizer="sgd", lr=0.1), world_sizes=both)
    keyed = _grid(UserTask(keyed_dropout_model, mlp_loss, data, G, optimizer="sgd", lr=0.1), world_sizes=both)
    one = GridResult(G, wrong.steps, wrong.n_terms, [p for p in wrong.partitions if p.world_size == 1], {})
    two = GridResult(G, wrong.steps, wrong.n_terms, [p for p in wrong.partitions if p.world_size == 2], {})
    w1, w2, c = _worst(one), _worst(two), _worst(keyed)
    return Pitfall(
        5,
        "dropout: the random masks depend on the partition",
        "Dropout draws its masks from the RNG stream as batches arrive, so a sample's mask depends on "
        "where in the stream its micro-batch came. In one CPU process torch draws the masks in order "
        "from one stream, and k micro-batches happen to get the very masks of the big batch (measured "
        "below: within rounding). On W ranks seeded alike, every rank draws the *start* of the stream "
        "for its own, different samples: different masks, a different gradient, a different model. "
        "Keying each sample's mask to its global index (and, in real training, the step) makes dropout "
        "split-invariant: the correct version below. distshare's models have no dropout, so its step "
        "cannot hit this.",
        f"2 ranks: gradient off by {w2['grad_norm_rel_diff']:.1e} normwise, parameters by "
        f"{w2['param_norm_rel_diff']:.1e} after 2 steps; 1 rank x k: {w1['grad_excess_over_bound']:.2f} x the "
        f"bound; per-sample keyed masks: {c['grad_excess_over_bound']:.2f} x",
        "grid",
        detected=one.ok and not two.ok and keyed.ok,
        distshare_avoids=True,
        measured={"torch_dropout_one_rank": w1, "torch_dropout_two_ranks": w2, "keyed_masks": c},
    )
