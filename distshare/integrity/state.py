"""What "the training state" is: every tensor two replicas must agree on, under stable names.

Parameters, buffers (BatchNorm running statistics), optionally gradients, the optimizer's
per-parameter state (momenta, Adam moments, step counts) and its hyperparameters (learning
rate, betas, weight decay: a schedule that drifts on one rank is state that differs). Names
come from the bare model, never from a wrapper (`module.` prefixes), so a DDP replica and a
single process name the same tensor alike.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP (or similar) wrapper, so names carry no `module.` prefix."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


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
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None, grads: bool = False
) -> Iterable[tuple[str, torch.Tensor]]:
    """Every tensor of the training state, under stable names.

    Names: `param/<name>`, `buffer/<name>`, `grad/<name>` (optional),
    `optim/<param name>/<state key>` (momenta, Adam moments, step counts) and
    `optim/group<i>/<hyperparameter>` (learning rate, betas, ...).
    """
    model = unwrap(model)
    for name, p in model.named_parameters():
        yield f"param/{name}", p
    for name, b in model.named_buffers():
        yield f"buffer/{name}", b
    if grads:
        for name, p in model.named_parameters():
            if p.grad is not None:
                yield f"grad/{name}", p.grad  # the same names as fingerprint_grads
    if optimizer is not None:
        names = {id(p): name for name, p in model.named_parameters()}
        for p, state in optimizer.state.items():
            pname = names.get(id(p), f"<unnamed {id(p)}>")
            for key, value in sorted(state.items()):
                if not isinstance(value, torch.Tensor):
                    value = torch.tensor(value)
                yield f"optim/{pname}/{key}", value
        for i, group in enumerate(optimizer.param_groups):
            for key, value in _hyperparameters(group):
                yield f"optim/group{i}/{key}", value
