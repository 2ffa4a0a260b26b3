"""Fingerprints: a 128-bit digest of a tensor's dtype, shape and raw bytes.

Two replicas hold "the same parameters" only if every bit agrees, so a fingerprint hashes
the raw bytes (not a rounded value, not a sum, which cancels). The dtype and shape go into
the digest too: a float32 and a float64 zero, or a [2, 3] and a [3, 2] tensor with the same
bytes, are different state. The digest names its algorithm (`xxh3_128:...`), so digests of
different algorithms are never compared as if equal.

xxh3-128 is a non-cryptographic hash: it detects accidents (drift, corruption, a missed
all-reduce), not an adversary, and it runs many times faster than SHA-256.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import xxhash
from torch import nn

ALGORITHM = "xxh3_128"


def fingerprint(tensor: torch.Tensor) -> str:
    """Digest of one tensor: algorithm-tagged hex of xxh3-128 over dtype, shape and bytes."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    h = xxhash.xxh3_128()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        # A uint8 view reads the raw bytes of any dtype (bfloat16 included) without a copy.
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return f"{ALGORITHM}:{h.hexdigest()}"


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP (or similar) wrapper, so names carry no `module.` prefix."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def named_state_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None, grads: bool = False
) -> Iterable[tuple[str, torch.Tensor]]:
    """Every tensor of the training state, under stable names.

    Names: `param/<name>`, `buffer/<name>`, `grad/<name>` (optional) and
    `optim/<param name>/<state key>` (momenta, Adam moments, step counts).
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


def fingerprint_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None, grads: bool = False
) -> dict[str, str]:
    """Per-tensor fingerprints of the whole training state (see `named_state_tensors`)."""
    return {name: fingerprint(t) for name, t in named_state_tensors(model, optimizer, grads)}


def fingerprint_grads(model: nn.Module) -> dict[str, str]:
    """Fingerprints of the gradients alone (`grad/<name>`), e.g. before and after a sync."""
    return {f"grad/{n}": fingerprint(p.grad) for n, p in unwrap(model).named_parameters() if p.grad is not None}


def combined_fingerprint(digests: Mapping[str, str]) -> str:
    """One digest for a whole state: order-independent over names, sensitive to every entry."""
    h = xxhash.xxh3_128()
    for name in sorted(digests):
        h.update(f"{name}={digests[name]}\n".encode())
    return f"{ALGORITHM}:{h.hexdigest()}"
