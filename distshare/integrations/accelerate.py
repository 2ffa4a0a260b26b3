"""distshare's checks in a plain `accelerate` loop: two lines.

    import distshare.integrations.accelerate as ds_accelerate

    accelerator = Accelerator(cpu=True)      # on CPUs; Accelerator() where there are GPUs
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    with ds_accelerate.watch(accelerator, model, optimizer, every=10):
        for batch in loader:
            with accelerator.accumulate(model):
                accelerator.backward(loss_fn(model(batch)))
                optimizer.step()
                optimizer.zero_grad()

    accelerate launch --config_file configs/accelerate/cpu.yaml train.py

Every `every`-th optimizer step: every rank holds the same training state (the replica check,
with the diagnosis), and the step was data-parallel (different data on each rank, local
gradients that differ, a synced gradient that is their mean: `distshare.integrity.data_parallel`).

Why a helper rather than `distshare.watch` itself: `accelerator.prepare` hands back an
`AcceleratedOptimizer`, whose `step()` calls the torch optimizer inside only on the steps that
really update (not while accumulating, not when the loss scaler skips one); the hooks belong on
that inner optimizer. And a run accelerate does not distribute is refused before any step: with
several processes launched, `DistributedType.NO` means an unwrapped model and unsharded data on
every rank, W copies of one run that every replica check would pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distshare.distributed.launchers import launched_place
from distshare.errors import UsageError
from distshare.integrations.options import check_options
from distshare.integrity.state import innermost_optimizer
from distshare.integrity.watch import Watch


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's `AcceleratedOptimizer` (or the optimizer itself)."""
    inner = innermost_optimizer(optimizer)
    if not isinstance(inner, torch.optim.Optimizer):
        raise UsageError(
            f"distshare.integrations.accelerate.watch: {type(optimizer).__name__} is not a torch optimizer: "
            "pass the optimizer accelerator.prepare returned"
        )
    return inner


def refuse_undistributed(accelerator: Any) -> None:
    """UsageError when the launcher started several processes but accelerate does not distribute them."""
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    place = launched_place()
    if kind != "NO" or place is None or place.world_size < 2:
        return
    if not torch.cuda.is_available():
        raise UsageError(
            f"accelerate reports DistributedType.NO although {place.world_size} processes were launched: with a "
            "MULTI_GPU + use_cpu config, accelerate launch does not pass use_cpu on to the processes, so every rank "
            "would train alone on all the data; create Accelerator(cpu=True) (or export ACCELERATE_USE_CPU=1)"
        )
    raise UsageError(
        f"accelerate reports DistributedType.NO although {place.world_size} processes were launched: every rank "
        "would train alone on all the data; check `accelerate env` and that each process sees its device"
    )


def watch(
    accelerator: Any,
    model: nn.Module,
    optimizer: Any,
    every: int = 1,
    data_parallel: bool | dict[str, Any] = True,
    **options: Any,
) -> Watch:
    """`distshare.watch` for a loop `accelerator.prepare` set up; a collective at creation.

    `model`, `optimizer`: what `accelerator.prepare` returned (the DDP wrapper, the
    `AcceleratedOptimizer`). Checks replicas now and after every `every`-th real optimizer
    step, with the data-parallel check (`data_parallel=False` leaves it out; a dict passes its
    options, e.g. `{"replicated_inputs": True}`). Refuses (UsageError, before any hook) a run
    accelerate does not distribute although several processes were launched. `options`: those
    of `distshare.watch` (grads, buffers, extra, raise_on_divergence, locate, timeout_s, keep).
    """
    check_options(every, options.get("grads", "on_divergence"), options.get("buffers", "compare"))
    refuse_undistributed(accelerator)
    return Watch(model, torch_optimizer(optimizer), every, data_parallel=data_parallel, **options)
