"""How far apart two sets of tensors are: bitwise, max abs, max rel, max ULP.

Equivalence is reported as measured, never rounded away: `bitwise` when every bit agrees,
otherwise the largest absolute, relative and ULP (units in the last place) distances.
ULPs make float32 and float64 differences comparable: 1 ULP is one rounding step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

_INT_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


@dataclass(frozen=True)
class Diff:
    """Distance between two tensor collections with the same names and shapes."""

    bitwise_equal: bool
    max_abs_diff: float
    max_rel_diff: float  # max |a - b| / |b| over elements where b != 0
    norm_rel_diff: float  # ||a - b|| / ||b|| over all elements together
    max_ulp: int
    worst_tensor: str | None  # the tensor holding the max abs difference

    def to_dict(self) -> dict:
        return asdict(self)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Number of representable floats between a and b, elementwise (0 = identical bits)."""
    int_dtype = _INT_VIEW.get(a.dtype)
    if int_dtype is None:
        return (a != b).to(torch.int64)
    ia = a.contiguous().view(int_dtype).to(torch.int64)
    ib = b.contiguous().view(int_dtype).to(torch.int64)
    # Map sign-magnitude floats onto a monotonic integer line so that subtraction counts
    # the floats in between, across zero as well.
    bits = torch.iinfo(int_dtype).bits
    top = 1 << (bits - 1)
    ia = torch.where(ia < 0, -(ia + top), ia)
    ib = torch.where(ib < 0, -(ib + top), ib)
    return (ia - ib).abs()


def diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> Diff:
    """Compare tensors of the same names; `b` is the reference for relative differences."""
    if set(a) != set(b):
        missing = sorted(set(a) ^ set(b))
        raise ValueError(f"tensor names differ: {missing[:5]}")
    bitwise = True
    max_abs = max_rel = 0.0
    max_ulp = 0
    sq_diff = sq_ref = 0.0
    worst = None
    for name in sorted(a):
        x, y = a[name].detach().cpu(), b[name].detach().cpu()
        if x.shape != y.shape or x.dtype != y.dtype:
            raise ValueError(f"{name}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}")
        if not x.is_floating_point():
            bitwise &= torch.equal(x, y)
            continue
        same = torch.equal(x.view(_INT_VIEW.get(x.dtype, x.dtype)), y.view(_INT_VIEW.get(y.dtype, y.dtype)))
        bitwise &= same
        if same or not x.numel():
            sq_ref += float(y.double().pow(2).sum())
            continue
        d = (x.double() - y.double()).abs()
        t_abs = float(d.max())
        if t_abs > max_abs:
            max_abs, worst = t_abs, name
        nz = y != 0
        if nz.any():
            max_rel = max(max_rel, float((d[nz] / y.double().abs()[nz]).max()))
        max_ulp = max(max_ulp, int(ulp_distance(x, y).max()))
        sq_diff += float(d.pow(2).sum())
        sq_ref += float(y.double().pow(2).sum())
    norm_rel = (sq_diff**0.5) / (sq_ref**0.5) if sq_ref else (0.0 if sq_diff == 0 else float("inf"))
    return Diff(bitwise, max_abs, max_rel, norm_rel, max_ulp, worst)
