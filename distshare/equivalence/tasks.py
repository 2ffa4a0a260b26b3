"""What the grid trains: a task builds one partition's training (a `Trainee`) on one rank.

- `ConfigTask`: distshare's own training, `build_run` and the one `train_step`, as configured.
- `UserTask`: a user's model, summed loss and data set, trained by the same one step
  (`optimizer_step`) on distshare's global batch plan.

Both must pickle: spawned ranks receive the task and build their own `Trainee` from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from distshare.config import PlanConfig, RunConfig
from distshare.data import build_dataset
from distshare.data.plan import GlobalBatchPlan
from distshare.distributed.sync import ExactSync, GradSync, make_sync
from distshare.distributed.world import World
from distshare.equivalence.gradient import step_gradient
from distshare.errors import UsageError
from distshare.models import build_model
from distshare.numerics.rounding import unit_roundoff
from distshare.training import Run, build_optimizer, build_run, loss_sum, optimizer_step, sample_losses, train_step

AUTOCAST = "bf16-autocast"  # the grid's name for float32 parameters with bfloat16 matrix products


StepFn = Callable[[int], tuple[float, list[list[int]]]]  # step -> (this rank's loss sum, the samples its losses used)


@dataclass
class Trainee:
    """One rank's training for one partition, reduced to what the grid needs to observe."""

    model: nn.Module  # the bare model: its .grad after the sync is the step's gradient
    optimizer: torch.optim.Optimizer
    micro_batch: int
    step: Callable[[int], tuple[float, list[list[int]]]]  # run a step -> (rank's loss sum, its micro-batches)
    global_batch: Callable[[int], list[int]]  # the step's global sample indices, in order
    normalizer: Callable[[int], float]  # what the step divides summed losses by
    batch_loss: Callable[[nn.Module, list[int]], torch.Tensor]  # summed loss of samples on a bare model
    fresh_model: Callable[[], nn.Module]  # a bare copy to compute reference gradients on
    fresh_optimizer: Callable[[nn.Module], torch.optim.Optimizer]  # the configured optimizer, for a copy
    label: str = ""  # the precision, as reports name it: float64, float32, bf16-autocast
    u: float = 0.0  # unit roundoff gradients are accumulated in
    slice_u: float = 0.0  # mixed precision: unit roundoff each partial gradient is rounded to first
    # Exact mode: sets a bare model's .grad to the big batch's exact-mode gradient at a step
    # (the reference's own arithmetic); None: one forward and backward over the whole batch.
    exact_grad: Callable[[nn.Module, int], None] | None = None
    # The samples at these indices as one batch (tensors, samples along dim 0), and each
    # sample's summed loss of such a batch, [n]: with both, the reference takes every sample's
    # gradient magnitude in one batched pass (`SampleMagnitudes`); None: one sample at a time.
    sample_batch: Callable[[list[int]], Any] | None = None
    sample_losses: Callable[[nn.Module, Any], torch.Tensor] | None = None


class GridTask(Protocol):
    """A training the grid can build for any (W, k, dtype) on any rank. Must pickle (spawn)."""

    global_batch: int
    seed: int

    def build(self, world: World, world_size: int, accum_steps: int, dtype: str | None) -> Trainee: ...

    def terms_per_sample(self) -> int: ...


def _precision(autocast: bool, device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()


def _dtype(model: nn.Module) -> torch.dtype:
    p = next(model.parameters(), None)
    return p.dtype if p is not None else torch.float32


@dataclass
class ConfigTask:
    """distshare's own training: `build_run` and the one `train_step`, as configured."""

    cfg: RunConfig

    @property
    def global_batch(self) -> int:
        return self.cfg.plan.resolve().global_batch

    @property
    def seed(self) -> int:
        return self.cfg.seed

    def build(self, world: World, world_size: int, accum_steps: int, dtype: str | None) -> Trainee:
        plan = dataclasses.replace(
            self.cfg.plan,
            world_size=world_size,
            global_batch=self.global_batch,
            accum_steps=accum_steps,
            micro_batch=None,
        )
        # bf16: float32 parameters and gradients, matrix products in bfloat16 under autocast.
        autocast = dtype == AUTOCAST
        model_cfg = dataclasses.replace(self.cfg.model, dtype="float32" if autocast else dtype or self.cfg.model.dtype)
        cfg = dataclasses.replace(self.cfg, plan=plan, model=model_cfg)
        run = build_run(cfg, world, self.make_sync(cfg, world))
        return trainee_of(run, autocast, self.make_step(run))

    def make_sync(self, cfg: RunConfig, world: World) -> GradSync | None:
        """The sync of a partition: None, the configured one (a mutant overrides this)."""
        return None

    def make_step(self, run: Run) -> StepFn:
        """The step the grid runs: distshare's one `train_step` (a pitfall, a mutant overrides this)."""
        return the_step(run)

    def terms_per_sample(self) -> int:
        """How often one weight is used per sample: once per token, or per pixel."""
        _, info = build_dataset(self.cfg.data)
        if info.kind == "text":
            return max(1, info.max_len)
        _, h, w = info.image_shape
        return max(1, h * w)


def the_step(run: Run) -> StepFn:
    """distshare's one `train_step` on `run`, as the grid calls it: step -> (loss sum, samples used)."""

    def step(s: int) -> tuple[float, list[list[int]]]:
        stats = train_step(run, s)
        return stats.loss_sum, stats.indices

    return step


def trainee_of(run: Run, autocast: bool = False, inner: StepFn | None = None) -> Trainee:
    """What the grid observes of one rank's run of distshare's own training.

    `inner` runs a step (default: the one `train_step`); under `autocast` (bf16) the step
    and the reference gradients run inside `torch.autocast`. `distshare verify` observes
    its real training run through this too (`distshare.equivalence.observe`).
    """
    cfg, world = run.cfg, run.world
    inner = inner or the_step(run)

    def step(s: int) -> tuple[float, list[list[int]]]:
        # The optimizer's pre-step hooks (the grid's observers) run inside this too, so the
        # reference gradients they compute are autocast alike.
        with _precision(autocast, world.device):
            return inner(s)

    def batch_loss(model: nn.Module, indices: list[int]) -> torch.Tensor:
        batch = run.table.select(indices).to(world.device)
        with _precision(autocast, world.device):
            return loss_sum(model(**batch.inputs), batch.labels)

    def sample_batch(indices: list[int]) -> dict[str, Any]:
        batch = run.table.select(indices).to(world.device)
        return {"inputs": batch.inputs, "labels": batch.labels}

    def batch_sample_losses(model: nn.Module, sample: dict[str, Any]) -> torch.Tensor:
        with _precision(autocast, world.device):
            return sample_losses(model, sample)

    def exact_grad(model: nn.Module, s: int) -> None:
        indices = run.plan.global_batch(s)
        sample = sample_batch(indices)
        # The one exact arithmetic, on one process: what every partition reaches. (Exact
        # mode differentiates the per-sample losses; the summed loss is never called.)
        step_gradient(
            model,
            [sample],
            run.table.count_items(indices),
            len(indices),
            lambda module, b: loss_sum(module(**b["inputs"]), b["labels"]),
            sync=ExactSync(),
            sample_loss_fn=sample_losses,
        )

    dtype = cfg.model.dtype  # float32 under autocast: build() sets it
    return Trainee(
        model=run.model,
        optimizer=run.optimizer,
        micro_batch=run.plan.plan.micro_batch,
        step=step,
        global_batch=lambda s: [int(i) for i in run.plan.global_batch(s)],
        normalizer=lambda s: run.table.count_items(run.plan.global_batch(s)),
        batch_loss=batch_loss,
        fresh_model=lambda: build_model(cfg.model, run.info, seed=cfg.seed).to(world.device),
        fresh_optimizer=lambda model: build_optimizer(cfg, model),
        label=AUTOCAST if autocast else dtype,
        u=unit_roundoff(getattr(torch, dtype)),
        slice_u=unit_roundoff(torch.bfloat16) if autocast else 0.0,
        exact_grad=exact_grad if cfg.sync == "exact" else None,
        sample_batch=sample_batch,
        sample_losses=batch_sample_losses,
    )


@dataclass
class UserTask:
    """A user's model, loss and data set, trained by distshare's one step (`optimizer_step`)."""

    model_fn: Callable[[], nn.Module]
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    dataset: Any
    global_batch: int
    optimizer: str = "sgd"
    lr: float = 0.1
    sync: str = "ddp"
    seed: int = 0
    uses_per_sample: int = 1
    # Exact mode (sync="exact"): each sample's summed loss, [n], of a collated batch; what
    # exact mode differentiates (per-sample gradients) instead of loss_fn's summed loss.
    sample_loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None
    # count_items(batch) -> int: the loss items of a collated batch (e.g. label tokens != -100).
    # The step divides the summed loss by their count over the whole global batch; None: by
    # its sample count. Summed over micro-batches it must equal the count of their union.
    count_items: Callable[[Any], int] | None = None

    def terms_per_sample(self) -> int:
        return self.uses_per_sample

    def _fresh(self) -> nn.Module:
        # Seeded here so that every rank, and every copy, starts from the same bits even if
        # model_fn draws its initialization from the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self.model_fn()

    def _optimizer(self, params: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr) if self.optimizer == "sgd" else torch.optim.AdamW(params, lr=self.lr)

    def _collate(self, indices: list[int]) -> Any:
        ds = self.dataset
        idx = torch.as_tensor(indices, dtype=torch.long)
        if isinstance(ds, torch.utils.data.TensorDataset):
            return tuple(t[idx] for t in ds.tensors)
        if isinstance(ds, torch.Tensor):
            return ds[idx]
        return torch.utils.data.default_collate([ds[i] for i in indices])

    def build(self, world: World, world_size: int, accum_steps: int, dtype: str | None) -> Trainee:
        model = self._fresh()
        opt = self._optimizer(model.parameters())
        sync = make_sync(self.sync, world.world_size)
        wrapped, opt = sync.prepare(model, opt)
        resolved = PlanConfig(world_size, self.global_batch, accum_steps, None).resolve()
        plan = GlobalBatchPlan(len(self.dataset), resolved, seed=self.seed)

        @functools.cache
        def items(s: int) -> float:
            # What step s divides the summed loss by: the global batch's items, on every rank alike.
            indices = [int(i) for i in plan.global_batch(s)]
            if self.count_items is None:
                return float(len(indices))
            count = int(self.count_items(self._collate(indices)))
            if count <= 0:
                raise UsageError(f"count_items gave {count} items for the global batch of step {s}: nothing to divide")
            return float(count)

        def batch_loss(module: nn.Module, indices: list[int]) -> torch.Tensor:
            # Collated inside the step's micro-step, one micro-batch at a time, as it is used.
            return self.loss_fn(module, self._collate(indices))

        def step(s: int) -> tuple[float, list[list[int]]]:
            # distshare's step: the user's summed loss per micro-batch, divided by the global count.
            micro = [m.tolist() for m in plan.rank_micro_batches(s, world.rank)]
            n = len(plan.global_batch(s))
            consumed: list[list[int]] = []

            def step_loss(module: nn.Module, indices: list[int]) -> torch.Tensor:
                consumed.append(list(indices))  # accounting reads what the loss was computed from
                return batch_loss(module, indices)

            if sync.per_sample:
                # Exact mode: the sync takes the collated samples (tensors, samples along dim 0) and
                # computes them in its own chunks; what it consumes is exactly what it is handed.
                micro = [m for m in micro if m]
                consumed.extend(micro)
                micro = [self._collate(m) for m in micro]
            return optimizer_step(
                model, wrapped, opt, sync, micro, items(s), n, step_loss, self.sample_loss_fn
            ), consumed

        dtype = _dtype(model)
        trainee = Trainee(
            label=str(dtype).removeprefix("torch."),
            u=unit_roundoff(dtype),
            model=model,
            optimizer=opt,
            micro_batch=resolved.micro_batch,
            step=step,
            global_batch=lambda s: [int(i) for i in plan.global_batch(s)],
            normalizer=items,
            batch_loss=batch_loss,
            fresh_model=self._fresh,
            fresh_optimizer=lambda m: self._optimizer(m.parameters()),
            sample_batch=self._collate if self.sample_loss_fn is not None else None,
            sample_losses=self.sample_loss_fn,
        )
        if sync.per_sample:
            trainee.exact_grad = self._exact_grad(trainee)
        return trainee

    def _exact_grad(self, trainee: Trainee) -> Callable[[nn.Module, int], None]:
        """The big batch's exact-mode gradient at a step, on one process: what every partition reaches."""

        def exact_grad(model: nn.Module, s: int) -> None:
            indices = trainee.global_batch(s)
            step_gradient(
                model,
                [self._collate(indices)],
                trainee.normalizer(s),
                len(indices),
                lambda module, b: self.loss_fn(module, b),  # never called: exact mode differentiates per sample
                sync=ExactSync(),
                sample_loss_fn=self.sample_loss_fn,
            )

        return exact_grad
