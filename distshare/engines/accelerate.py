"""The accelerate engine: the one step under `Accelerator(gradient_accumulation_steps=k)`.

    accelerate launch --config_file configs/accelerate/cpu.yaml -m distshare train --engine accelerate

accelerate changes two things about the arithmetic, and both are undone exactly:

- `accelerator.backward(loss)` divides the loss by k (it assumes a *mean* loss per
  micro-batch, averaged over the k micro-batches);
- the DDP wrapper that `accelerator.prepare` builds *averages* gradients over the W ranks.

The step's loss is already divided by the item count of the whole global batch (the only
normalization that is right when micro-batches hold different numbers of tokens), so the
loss handed to accelerate is multiplied by k x W first, as accelerate's own guide to
gradient accumulation with variable-size batches does. When k and W are powers of two these
scalings only shift exponents, every rounding commutes with them, and the gradient is
bitwise the one the torch engine computes; otherwise they can change the last bit (the
parity table says by how much).

Everything else — the plan, the micro-batches, the optimizer step, the checks — is
`distshare.train`, unchanged.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distshare.config import RunConfig
from distshare.dist.sync import GradSync
from distshare.dist.world import World
from distshare.engines.gather import gather_to_main, with_world_size
from distshare.train import TrainResult, train


def launched_by_accelerate() -> bool:
    """True inside `accelerate launch` (it exports its settings as ACCELERATE_* variables)."""
    return "ACCELERATE_MIXED_PRECISION" in os.environ


class AccelerateSync(GradSync):
    """Gradient sync by accelerate: `accumulate()` decides when DDP all-reduces."""

    name = "accelerate (DDP mean, loss x k*W)"
    reduces_in_backward = True

    def __init__(self, accelerator: Any, accum_steps: int, world_size: int):
        self.accelerator = accelerator
        # Undo accelerate's division by k and DDP's average over W (see the module docstring).
        self.scale = float(accum_steps * world_size)

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        return self.accelerator.prepare(model, optimizer)

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


def run_training(
    cfg: RunConfig,
    out_dir: Path | None = None,
    progress: bool = True,
    keep_state: bool = False,
) -> list[TrainResult] | None:
    """Train under accelerate; every rank's result on rank 0, None on the others.

    The process group is accelerate's own (`Accelerator()` creates it from the launcher's
    environment: gloo on CPU, nccl on GPU), bounded by the run's timeout.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = with_world_size(cfg, world_size)
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
    sync = AccelerateSync(accelerator, k, world.world_size)
    try:
        result = train(cfg, world, out_dir, progress and world.is_main, keep_state, sync=sync)
        result.engine = "accelerate"
        results = gather_to_main(result, world) if distributed else [result]
    finally:
        accelerator.end_training()
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
    return results
