"""What "the training state" is: every tensor two replicas must agree on, under stable names.

Parameters, buffers (BatchNorm running statistics), optionally gradients, the optimizer's
per-parameter state (momenta, Adam moments, step counts) and its hyperparameters (learning
rate, betas, weight decay: a schedule that drifts on one rank is state that differs). Names
come from the bare model, never from a wrapper (`module.` prefixes), so a DDP replica and a
single process name the same tensor alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn


def _as_is(t: torch.Tensor) -> torch.Tensor:
    return t


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded (FSDP2 / HSDP `DTensor`) tensor; any other tensor as it is.

    Comparing shards compares what this rank holds: across HSDP's replica groups the same
    shard must be bit-identical (`compare_replicas` reads the mesh from the model and compares
    each shard within its replica groups).
    """
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t



def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP (or similar) wrapper, so names carry no `module.` prefix."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def innermost_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's `AcceleratedOptimizer` (or any `.optimizer` wrapper).

    Its step hooks run once per real update: the wrapper subclasses `Optimizer` without its
    hook tables (a hook cannot be registered on it), and its `step()` calls the inner one only
    on the micro-batches that update.
    """
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def hyperparameters(group: dict) -> Iterable[tuple[str, torch.Tensor]]:
    """A param group's numeric settings as tensors, under the keys `named_state_tensors` uses
    (`optim/group<i>/<key>`); also for a group read back from a checkpoint's manifest."""
    yield from _hyperparameters(group)


def _hyperparameters(group: dict) -> Iterable[tuple[str, torch.Tensor]]:
    # Numbers only (lr, betas, eps, weight decay, ...): a learning-rate schedule that drifts on
    # one rank is optimizer state that differs, even though no tensor of `optimizer.state` does.
    for key in sorted(group):
        value = group[key]
        if key == "params" or value is None or isinstance(value, str):
            continue
        if isinstance(value, torch.Tensor):
            yield key, value
        elif isinstance(value, bool | int | float) or (
            isinstance(value, tuple | list) and value and all(isinstance(v, bool | int | float) for v in value)
        ):
            yield key, torch.tensor(value, dtype=torch.float64)


def named_state_tensors(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    grads: bool = False,
    buffers: bool = True,
    extra: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
    shards: bool = True,
) -> Iterable[tuple[str, torch.Tensor]]:
    """Every tensor of the training state, under stable names.

    Names: `param/<name>`, `buffer/<name>` (unless `buffers=False`), `grad/<name>` (optional),
    `optim/<param name>/<state key>` (momenta, Adam moments, step counts),
    `optim/group<i>/<hyperparameter>` (learning rate, betas, ...) and `extra/<key>/...` for
    whatever further state the caller passes (`extra_tensors`).

    Sharded tensors (FSDP2 / HSDP `DTensor`s) come as this rank's shard (`local_shard`), what
    replica checks compare; with `shards=False` as the `DTensor`s themselves, what logical
    digests (`distshare.integrity.logical`) need.
    """
    model = unwrap(model)
    piece = local_shard if shards else _as_is
    for name, p in model.named_parameters():
        yield f"param/{name}", piece(p)
    if buffers:
        for name, b in model.named_buffers():
            yield f"buffer/{name}", piece(b)
    if grads:
        for name, p in model.named_parameters():
            if p.grad is not None:
                yield f"grad/{name}", piece(p.grad)  # the same names as fingerprint_grads
    if optimizer is not None:
        names = {id(p): name for name, p in model.named_parameters()}
        # A tensor the optimizer steps that is not (or no longer) a parameter of the model, e.g.
        # one replaced after the optimizer was built, is named by its place in the optimizer:
        # the same name on every rank (an id() would differ from process to process).
        for i, group in enumerate(optimizer.param_groups):
            for j, p in enumerate(group["params"]):
                names.setdefault(id(p), f"<not in the model: group{i}[{j}]>")
        for p, state in optimizer.state.items():
            pname = names.get(id(p), "<not in the optimizer's groups>")
            for key, value in sorted(state.items()):
                value = piece(value) if isinstance(value, torch.Tensor) else torch.tensor(value)
                yield f"optim/{pname}/{key}", value
        for i, group in enumerate(optimizer.param_groups):
            for key, value in _hyperparameters(group):
                yield f"optim/group{i}/{key}", value
    if extra is not None:
        yield from extra_tensors(extra() if callable(extra) else extra)


def extra_tensors(state: Mapping[str, Any], prefix: str = "extra") -> Iterable[tuple[str, torch.Tensor]]:
    """Further state as named tensors: a scheduler's or GradScaler's `state_dict()`, RNG states.

    Nested mappings and sequences become path components (`extra/scheduler/base_lrs/0`);
    tensors stay as they are, integers become int64 scalars, floats and booleans float64 ones, strings their UTF-8
    bytes; None and anything else (a function in a state dict) is left out.
    """
    for key in sorted(state, key=str):
        value = state[key]
        name = f"{prefix}/{key}"
        if isinstance(value, torch.Tensor):
            yield name, value
        elif isinstance(value, int) and not isinstance(value, bool):
            yield name, torch.tensor(value, dtype=torch.int64)
        elif isinstance(value, bool | float):
            yield name, torch.tensor(float(value), dtype=torch.float64)
        elif isinstance(value, str):
            yield name, torch.tensor(list(value.encode()), dtype=torch.uint8)
        elif isinstance(value, Mapping):
            yield from extra_tensors(value, name)
        elif isinstance(value, list | tuple):
            yield from extra_tensors(dict(enumerate(value)), name)
