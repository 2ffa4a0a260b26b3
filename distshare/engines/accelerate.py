"""The accelerate engine: the one step under `Accelerator(gradient_accumulation_steps=k)`.

    accelerate launch --config_file configs/accelerate/cpu.yaml -m distshare train --engine accelerate

accelerate changes two things about the arithmetic, and both are undone exactly:

- `accelerator.backward(loss)` divides the loss by k (it assumes a *mean* loss per
  micro-batch, averaged over the k micro-batches);
- the DDP wrapper that `accelerator.prepare` builds *averages* gradients over the W ranks.

The step's loss is already divided by the item count of the whole global batch (the only
normalization that is right when micro-batches hold different numbers of tokens). accelerate's
guide for variable-size batches multiplies that loss by k x W to cancel both divisions; that
is exact only when k and W are powers of two (measured: W = 3 moved the final float64
parameters by 2.8e-16). Here the two are cancelled separately, each exactly:

- the prepared DDP model gets the torch engine's SUM comm hook, so ranks are added, not
  averaged: no division by W at all;
- the loss is multiplied by `s`, the float next to k for which fl(fl(1/k) x s) == 1: the
  backward pass then multiplies the gradient by (1/k) x s = exactly 1. For most k, s == k;
  for some (k = 41 in float32, 49 in float64) k itself leaves the last bit off.

So the gradient is bitwise the one the torch engine computes, for every W and k, and
everything else — the plan, the micro-batches, the optimizer step, the checks — is the one
per-rank runner (`distshare.engines.runner`), unchanged.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distshare.distributed import launchers
from distshare.distributed.sync import ExactSync, GradSync, sum_hook
from distshare.distributed.world import World
from distshare.engines.runner import RankJob, run_rank
from distshare.training import DTYPES, TrainResult


class AccelerateSync(GradSync):
    """Gradient sync by accelerate: `accumulate()` decides when DDP all-reduces."""

    name = "accelerate (DDP, SUM hook)"
    reduces_in_backward = True

    def __init__(self, accelerator: Any, accum_steps: int, dtype: torch.dtype):
        self.accelerator = accelerator
        self.scale = exact_unscale(accum_steps, dtype)  # cancels accelerate's loss / k

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        wrapped, optimizer = self.accelerator.prepare(model, optimizer)
        if isinstance(wrapped, DistributedDataParallel):
            wrapped.register_comm_hook(state=None, hook=sum_hook)  # add the ranks, don't average them
        return wrapped, optimizer

    @contextlib.contextmanager
    def micro_step(self, wrapped: nn.Module, last: bool) -> Iterator[None]:
        with self.accelerator.accumulate(wrapped):
            # accelerate counts micro-steps itself; if its count ever disagreed with the plan,
            # gradients would sync at the wrong micro-batch. Refuse rather than train wrong.
            if self.accelerator.sync_gradients != last:
                raise RuntimeError(
                    f"accelerate's accumulation counter is out of step with the plan "
                    f"(sync_gradients={self.accelerator.sync_gradients}, last micro-batch={last})"
                )
            yield

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss * self.scale)


def exact_unscale(k: int, dtype: torch.dtype) -> float:
    """The float s nearest k with fl(fl(1/k) * s) == 1 in `dtype`, if one exists (else k):
    multiplying a loss by s before accelerate divides it by k leaves every gradient exactly
    as it was."""
    if k == 1:
        return 1.0  # accelerate divides only when accumulating
    inv = torch.ones((), dtype=dtype) / k
    candidates = [torch.tensor(float(k), dtype=dtype)]
    up = down = candidates[0]
    for _ in range(16):
        up = torch.nextafter(up, torch.tensor(float("inf"), dtype=dtype))
        down = torch.nextafter(down, torch.tensor(0.0, dtype=dtype))
        candidates += [up, down]
    for s in candidates:
        if (inv * s).item() == 1.0:
            return float(s.item())
    # Near 1 the floats are spaced finer than the steps of fl(1/k) x s: for a few k (141 in
    # float32, the first) no s lands on 1 exactly. k it is; the gradient may then carry a
    # last-bit difference, which the parity table measures.
    return float(k)


def run_training(job: RankJob, engine: str = "accelerate") -> list[TrainResult] | None:
    """Train under accelerate; every rank's result on rank 0, None on the others.

    The process group is accelerate's own (`Accelerator()` creates it from the launcher's
    environment: gloo on CPU, nccl on GPU), bounded by the run's timeout.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    place = launchers.launched_place()
    job = job.with_world_size(place.world_size if place is not None else 1)
    cfg = job.cfg
    k = cfg.plan.resolve().accum_steps
    accelerator = Accelerator(
        gradient_accumulation_steps=k,
        # accelerate's multi-process launcher does not pass the config's use_cpu on to the
        # processes, so the run's own device decides: cpu -> MULTI_CPU on gloo, cuda -> nccl.
        cpu=cfg.device == "cpu",
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.timeout_s))],
    )
    distributed = accelerator.num_processes > 1
    world = World(
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        local_rank=accelerator.local_process_index,
        device=accelerator.device,
        backend=dist.get_backend() if distributed else None,
    )
    # Exact mode's sum is integer arithmetic of its own: accelerate starts the processes and
    # owns the process group and device, and the gradients are added by `ExactSync`.
    sync: GradSync = (
        ExactSync(world.world_size) if cfg.sync == "exact" else AccelerateSync(accelerator, k, DTYPES[cfg.model.dtype])
    )
    try:
        return run_rank(job, world, engine, "accelerate", sync=sync, restart=launchers.restart_count())
    finally:
        # accelerate keeps the prepared (DDP) model alive; its reducer holds gloo work objects
        # that, destroyed only at interpreter exit, abort the process ("terminate called
        # without an active exception"). Release them while the process group still exists.
        accelerator.free_memory()
        del sync
        gc.collect()
        accelerator.end_training()  # destroys the process group
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
