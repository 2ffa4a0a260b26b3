"""How far apart tensors are, and where: the one place differences are measured and described.

- `diff(a, b)` -> `Diff`: two collections of tensors, as a whole: bitwise, or the largest
  absolute, relative and ULP (units in the last place) distances and the normwise one.
  Equivalence is reported as measured, never rounded away. ULPs make float32 and float64
  differences comparable: 1 ULP is one rounding step.
- `localize(mine, reference)` -> `TensorDiff`: one tensor, element by element (bits, not
  values): how many elements differ, the first one, the largest distances.
- `Diff.describe()`, `describe(tensor_diff)`: the one-line descriptions every report uses.

A NaN or infinity anywhere is never a small difference: `Diff` counts them and makes its
distances NaN, `Diff.within(bound)` is False, and `worst` keeps NaN where `max` would drop it.
"""

from __future__ import annotations

import math
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
    # Elements that are NaN or infinite on either side. Any makes the distances NaN and
    # `within` False: a NaN compares False with everything, so it would otherwise pass
    # every `d > bound` test and vanish from every Python `max`.
    nonfinite: int = 0
    first_nonfinite: str | None = None  # "name[index] = value (side)" of the first one

    @property
    def finite(self) -> bool:
        return self.nonfinite == 0

    def within(self, bound: float) -> bool:
        """Finite, and bitwise equal or normwise within `bound` (False for any NaN)."""
        return self.finite and (self.bitwise_equal or self.norm_rel_diff <= bound)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """The difference in one line: "bitwise equal", the distances, or the non-finite values."""
        if not self.finite:
            return f"{self.nonfinite} non-finite value(s), first {self.first_nonfinite}"
        if self.bitwise_equal:
            return "bitwise equal"
        return f"max abs {self.max_abs_diff:.2e}, norm rel {self.norm_rel_diff:.2e}, max {self.max_ulp} ULP"


def worst(*values: float) -> float:
    """The largest value, or NaN if any is NaN (Python's `max(x, nan)` returns x)."""
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def first_nonfinite(tensors: Mapping[str, torch.Tensor], side: str = "") -> tuple[int, str | None]:
    """How many elements are NaN or infinite, and "name[index] = value" of the first (sorted by name)."""
    count, first = 0, None
    for name in sorted(tensors):
        t = tensors[name].detach()
        if not t.is_floating_point():
            continue
        bad = ~torch.isfinite(t)
        n = int(bad.sum())
        if n and first is None:
            flat = int(bad.reshape(-1).nonzero()[0])
            where = ", ".join(str(i) for i in _unravel(flat, list(t.shape)))
            first = f"{name}[{where}] = {float(t.reshape(-1)[flat])}" + (f" ({side})" if side else "")
        count += n
    return count, first


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
    worst_name = None
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
            max_abs, worst_name = t_abs, name
        nz = y != 0
        if nz.any():
            max_rel = max(max_rel, float((d[nz] / y.double().abs()[nz]).max()))
        max_ulp = max(max_ulp, int(ulp_distance(x, y).max()))
        sq_diff += float(d.pow(2).sum())
        sq_ref += float(y.double().pow(2).sum())
    norm_rel = (sq_diff**0.5) / (sq_ref**0.5) if sq_ref else (0.0 if sq_diff == 0 else float("inf"))
    bad_a, first_a = first_nonfinite(a, "observed")
    bad_b, first_b = first_nonfinite(b, "reference")
    if bad_a or bad_b:
        nan = math.nan
        return Diff(bitwise, nan, nan, nan, max_ulp, worst_name, bad_a + bad_b, first_a or first_b)
    return Diff(bitwise, max_abs, max_rel, norm_rel, max_ulp, worst_name)


@dataclass
class TensorDiff:
    """Where one rank's copy of a tensor departs from the reference rank's copy."""

    rank: int
    reference_rank: int
    differing: int  # elements whose bits differ
    numel: int
    first_index: list[int] | None  # multi-index of the first differing element (row-major)
    max_abs_diff: float | None  # None for non-numeric comparisons (shape or dtype differ)
    max_ulp: int | None
    mine: float | None = None  # this rank's value at first_index
    reference: float | None = None  # the reference rank's value there
    note: str = ""  # e.g. "shape [3] vs [4]", "missing on this rank"
    # mine ~ scale x reference (least squares over every element) and how well that fits,
    # ||mine - scale x reference|| / ||mine||: one factor that explains a whole tensor is a
    # clipped or rescaled gradient, not a different one (distshare.integrity.diagnosis).
    scale: float | None = None
    scale_residual: float | None = None
    nonfinite_mine: int = 0  # NaN or infinite elements in this rank's copy
    nonfinite_reference: int = 0  # ... and in the reference's

    def describe(self) -> str:
        """Between ranks: "rank 2: 1 of 1024 element(s) differ from rank 0, first at [3, 5] (...)"."""
        return describe(self)


def describe(d: TensorDiff, sides: tuple[str, str] | None = None) -> str:
    """One differing tensor in one line: between ranks, or between two named sides.

    `sides` = (reference's name, other's name), e.g. ("A", "B") for two checkpoints: then
    the ranks are not mentioned and both values are labelled.
    """
    if d.note:
        return d.note if sides else f"rank {d.rank}: {d.note} (vs rank {d.reference_rank})"
    where = "[" + ", ".join(str(i) for i in d.first_index or []) + "]"
    if sides:
        ref_name, other_name = sides
        text = (
            f"{d.differing} of {d.numel} element(s) differ, first at {where} "
            f"({ref_name} {_num(d.reference)}, {other_name} {_num(d.mine)})"
        )
    else:
        text = (
            f"rank {d.rank}: {d.differing} of {d.numel} element(s) differ from rank {d.reference_rank}, "
            f"first at {where} ({_num(d.mine)} vs {_num(d.reference)})"
        )
    if d.max_abs_diff is not None:
        text += f", max abs {d.max_abs_diff:.3g}"
    if d.max_ulp is not None:
        text += f", max {d.max_ulp} ULP"
    return text


def localize(mine: torch.Tensor | None, reference: torch.Tensor | None, rank: int, reference_rank: int) -> TensorDiff:
    """Compare one rank's tensor with the reference rank's, element by element (bits, not values)."""
    if mine is None or reference is None:
        where = "this rank" if mine is None else f"rank {reference_rank}"
        return TensorDiff(rank, reference_rank, 0, 0, None, None, None, note=f"missing on {where}")
    a, b = mine.detach().cpu(), reference.detach().cpu()
    if a.shape != b.shape or a.dtype != b.dtype:
        return TensorDiff(
            rank,
            reference_rank,
            max(a.numel(), b.numel()),
            max(a.numel(), b.numel()),
            None,
            None,
            None,
            note=f"{a.dtype} {list(a.shape)} vs {b.dtype} {list(b.shape)}",
        )
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    scale = residual = None
    bad_mine = bad_reference = 0
    if a.is_floating_point():
        bad_mine, bad_reference = int((~torch.isfinite(flat_a)).sum()), int((~torch.isfinite(flat_b)).sum())
        scale, residual = _scale_fit(flat_a, flat_b)
        # Differ means different bits, as for the digest: +0.0 and -0.0 are different state
        # even though they are 0 ULP apart, and a NaN equals itself here when its bits do.
        off = _bits(flat_a) != _bits(flat_b)
        max_ulp: int | None = int(ulp_distance(flat_a[off], flat_b[off]).max()) if off.any() else 0
        diffs = (flat_a.double() - flat_b.double()).abs()[off]
        finite = diffs[torch.isfinite(diffs)]
        max_abs: float | None = float(finite.max()) if finite.numel() else (math.inf if off.any() else 0.0)
    else:
        off = flat_a != flat_b
        max_ulp = None
        max_abs = float((flat_a.double() - flat_b.double()).abs().max()) if off.any() else 0.0
    positions = off.nonzero().flatten()
    first = int(positions[0]) if positions.numel() else None
    index = list(_unravel(first, list(a.shape))) if first is not None else None
    return TensorDiff(
        rank=rank,
        reference_rank=reference_rank,
        differing=int(positions.numel()),
        numel=a.numel(),
        first_index=index,
        max_abs_diff=max_abs,
        max_ulp=max_ulp,
        mine=float(flat_a[first]) if first is not None else None,
        reference=float(flat_b[first]) if first is not None else None,
        scale=scale,
        scale_residual=residual,
        nonfinite_mine=bad_mine,
        nonfinite_reference=bad_reference,
    )


def _scale_fit(mine: torch.Tensor, reference: torch.Tensor) -> tuple[float | None, float | None]:
    """(s, ||mine - s x reference|| / ||mine||) for the s that fits best; None where undefined."""
    x, y = mine.double(), reference.double()
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
        return None, None
    ref_sq, mine_sq = float(y.pow(2).sum()), float(x.pow(2).sum())
    if ref_sq == 0.0 or mine_sq == 0.0:
        return None, None
    s = float((x * y).sum()) / ref_sq
    return s, float((x - s * y).norm()) / mine_sq**0.5


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor as integers of the same width."""
    width = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()]
    return t.contiguous().view(width)


def _unravel(flat: int, shape: list[int]) -> list[int]:
    out = []
    for size in reversed(shape):
        out.append(flat % size)
        flat //= size
    return list(reversed(out))


def _num(v: float | None) -> str:
    return "none" if v is None else f"{v:.9g}"
