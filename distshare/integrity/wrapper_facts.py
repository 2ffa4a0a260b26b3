"""What a DDP wrapper says about the model it wraps: evidence for a diagnosis, read locally.

DDP decides at wrap time which parameters it reduces: it registers hooks on the gradient
accumulators of the parameters that exist, require gradients and have their dtype then. Code
that changes any of that afterwards leaves DDP reducing the old set, silently. The wrapper
keeps enough to see it: the parameter objects it wrapped (`_module_parameters`), how many of
them required gradients and their dtypes (its logging data), its device, whether its forward
has ever run (`_lazy_init_ran`), and its buffer sync setting. Read only when replicas already
differ: nothing here costs anything while they agree.

Private attributes of torch's DDP are read defensively: an attribute a torch version lacks
gives no note, never an error.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# The dtype names of DDP's logging data (c10's), for the dtypes parameters usually have.
_LOGGED_DTYPES = {
    torch.float32: "float",
    torch.float64: "double",
    torch.float16: "c10::Half",
    torch.bfloat16: "c10::BFloat16",
}


def buffer_sync(model: nn.Module) -> bool | None:
    """Does this DDP wrapper broadcast buffers at every forward? None: not a DDP wrapper."""
    if not isinstance(model, DistributedDataParallel):
        return None
    flag = getattr(model, "forward_sync_buffers", None)  # torch >= 2.13; broadcast_buffers before
    return bool(flag if flag is not None else getattr(model, "broadcast_buffers", True))


def wrapper_notes(model: nn.Module, updated: bool | None) -> dict[str, list[str]]:
    """Ways the model has left what its DDP wrapper wrapped, by kind, each with the parameters
    (or values) concerned; empty for a bare module or a model DDP still matches.

        never_forward   the wrapper's forward never ran, yet the model was updated (model.module)
        replaced        parameters that are not the objects DDP wrapped
        joined          more parameters require gradients than when DDP wrapped the model
        dtype           parameter dtypes other than those DDP wrapped
        device          parameters on another device than DDP's
        unused          parameters DDP reduces that got no gradient (find_unused_parameters=False)
    """
    if not isinstance(model, DistributedDataParallel):
        return {}
    inner = model.module
    ignored = getattr(model, "parameters_to_ignore", set())
    named = [(n, p) for n, p in inner.named_parameters() if n not in ignored]
    notes: dict[str, list[str]] = {}
    if updated and getattr(model, "_lazy_init_ran", True) is False:
        notes["never_forward"] = []
    wrapped = getattr(model, "_module_parameters", None)
    if wrapped is not None:
        ids = {id(p) for p in wrapped}
        replaced = [n for n, p in named if id(p) not in ids]
        if replaced:
            notes["replaced"] = replaced
    logged = _logging_data(model)
    trainable = [n for n, p in named if p.requires_grad]
    then = logged.get("num_parameter_tensors")
    if isinstance(then, int) and len(trainable) > then and "replaced" not in notes:
        notes["joined"] = [f"{then} then", f"{len(trainable)} now"]
    was = logged.get("dtypes")
    now = sorted({_LOGGED_DTYPES.get(p.dtype, str(p.dtype)) for _, p in named})
    if isinstance(was, str) and was and set(now) != set(was.split(", ")):
        readable = {v: str(k).removeprefix("torch.") for k, v in _LOGGED_DTYPES.items()}
        then = ", ".join(readable.get(d, d) for d in was.split(", "))
        notes["dtype"] = [f"{then} then", f"{', '.join(readable.get(d, d) for d in now)} now"]
    device = getattr(model, "device", None)
    moved = [n for n, p in named if device is not None and p.device != device]
    if moved:
        notes["device"] = moved
    if updated and not getattr(model, "find_unused_parameters", True) and "never_forward" not in notes:
        unused = [n for n, p in named if p.requires_grad and p.grad is None]
        if unused and len(unused) < len(trainable):  # all None: gradients were zeroed after the step
            notes["unused"] = unused
    return notes


def _logging_data(model: DistributedDataParallel) -> dict:
    try:
        return model._get_ddp_logging_data()
    except Exception:  # noqa: BLE001 - no logger (a torch without it): no note from it
        return {}
