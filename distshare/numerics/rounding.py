"""Every rounding bound: the unit roundoff, Higham's gamma(n), and how far two orders of one sum may be apart.

`unit_roundoff`, `gamma` and `gamma_for` are the building blocks; `reorder_norm_bound` is the
normwise bound where no per-term magnitudes are measured (verify, the demos);
`reorder_bound` / `bounds` are the elementwise bounds from measured magnitudes, `excess` and
`norm_rel` read an observed difference against them. (Distances in ULPs are measured with
the other differences, in `distshare.numerics.diff`.)

A gradient is a sum: over the samples of the global batch, and inside a sample over every
position where the weight is used. One process sums all of it in one matrix product; W
ranks x k micro-batches sum slices, accumulate the slices in `.grad` and all-reduce the
ranks. Same terms, different order, so in floating point the results may differ, by no
more than rounding allows. Higham (Accuracy and Stability of Numerical Algorithms, 2nd
ed., section 4.2): any order of summing n terms x_i gives

    |computed - exact| <= gamma(n - 1) * sum |x_i|,   gamma(m) = m u / (1 - m u)

with u the unit roundoff (2^-53 for float64, 2^-24 for float32). Two orders are each that
close to the exact sum, so they are within twice that of each other. The bound is
elementwise and needs sum |x_i|, which we *measure*: the sum over samples of the absolute
per-sample gradient contributions (one backward per sample). What the measurement cannot
see is cancellation between positions inside one sample; n counts every (sample, position)
term to make room for it, and for the per-sample values themselves being computed with a
different blocking. So the bound is a model of the error, not a theorem: the report always
prints it next to the observed value, and a pitfall misses it by orders of magnitude.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def unit_roundoff(dtype: torch.dtype) -> float:
    """u: half the distance from 1.0 to the next float (round to nearest)."""
    return torch.finfo(dtype).eps / 2


def gamma(m: int, u: float) -> float:
    """Higham's gamma_m = m u / (1 - m u): the relative error budget of m roundings."""
    mu = max(m, 0) * u
    if mu >= 1:
        return float("inf")
    return mu / (1 - mu)


def gamma_for(dtype: torch.dtype, m: int) -> float:
    """gamma_m in `dtype`: the elementwise error factor of an m-term dot product (or sum)."""
    return gamma(m, unit_roundoff(dtype))


def reorder_norm_bound(dtype: torch.dtype, n_terms: int) -> float:
    """Normwise relative difference that two summation orders of `n_terms` terms can cause.

    The scalar form of `reorder_bound`, where no per-term magnitudes are measured: two
    orders are each within gamma(n - 1) sum |x_i| of the exact sum, so within twice that of
    each other. Normalized by the result, this assumes no heavy cancellation: every report
    prints the measured value beside the bound, so the margin is visible.
    """
    return 2 * gamma_for(dtype, n_terms - 1)


def reorder_bound(
    abs_sum: torch.Tensor, value: torch.Tensor, n_terms: int, u: float | None = None, slice_u: float = 0.0
) -> torch.Tensor:
    """Elementwise bound on |one order - another order| of a sum of `n_terms` terms.

    `abs_sum` is sum |x_i| (measured), `value` the computed sum; `u` the unit roundoff the
    sum is accumulated in (default: `value`'s dtype). `slice_u` is for mixed precision
    (bf16 autocast): each partial sum (a micro-batch's weight gradient) is rounded once to
    a coarser format before it is accumulated in `u`; those roundings add at most
    `slice_u` x sum |x_i| for each order. The last term allows for the final rounding of
    the stored result itself.
    """
    u = unit_roundoff(value.dtype) if u is None else u
    total = 2 * (gamma(n_terms - 1, u) + slice_u) * abs_sum.to(torch.float64)
    return total + u * value.detach().abs().to(torch.float64)


def bounds(
    abs_sums: Mapping[str, torch.Tensor],
    values: Mapping[str, torch.Tensor],
    n_terms: int,
    u: float | None = None,
    slice_u: float = 0.0,
) -> dict[str, torch.Tensor]:
    """`reorder_bound` for every named tensor (gradients of a model)."""
    return {name: reorder_bound(abs_sums[name], values[name], n_terms, u, slice_u) for name in values}


def excess(
    observed: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], bound: Mapping[str, torch.Tensor]
) -> float:
    """max over elements of |observed - reference| / bound: <= 1 means within rounding.

    An element with a zero bound must agree exactly (a difference there is infinite excess).
    A NaN or infinity on either side is NaN excess: it fails every `<= 1` (and `d > 0`
    alone would skip it, since NaN compares False).
    """
    worst = 0.0
    for name, ref in reference.items():
        d = (observed[name].detach().to(torch.float64) - ref.detach().to(torch.float64)).abs()
        if not bool(torch.isfinite(d).all()):
            return float("nan")
        b = bound[name]
        over = d > 0
        if not over.any():
            continue
        if (b[over] == 0).any():
            return float("inf")
        worst = max(worst, float((d[over] / b[over]).max()))
    return worst


def norm_rel(bound: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]) -> float:
    """||bound|| / ||values||: the elementwise bound as one normwise relative number."""
    num = sum(float(b.pow(2).sum()) for b in bound.values()) ** 0.5
    den = sum(float(v.detach().to(torch.float64).pow(2).sum()) for v in values.values()) ** 0.5
    return num / den if den else (0.0 if num == 0 else float("inf"))
