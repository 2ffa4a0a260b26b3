"""Order-independent exact addition of per-sample gradients: the arithmetic of `--sync exact`.

Every framework says that W ranks x k micro-batches match one big batch only up to
rounding, because floating-point addition is not associative: splitting the batch changes
the order of the sum. Exact mode removes both places where the split enters: each sample's
gradient is computed alone, in one fixed shape (`distshare.numerics.per_sample`), and the
contributions are added in integers, here.

For every gradient element j, the largest |contribution| over the whole global batch is
found by an all-reduce MAX (max is exact and order-free), which fixes a shared exponent e_j.
Each contribution is scaled by 2^(62 - h - e_j) (h = ceil(log2 n) for n samples) and rounded
to an int64: n of them cannot exceed 2^62, so the local sums and the all-reduce SUM are exact
integer additions, associative in any order. The integer total is turned back into a float
once and divided by the global item count once. So the gradient, and with it the whole
training state, is bitwise the same for every partition of the global batch, every engine,
and every order of arrival.

Precision: each contribution keeps 62 - h bits below its element's largest contribution
(57 bits for 32 samples): finer than float64's 53 for the large ones, coarser for those
that are far smaller. A non-zero contribution below half a unit of its element's scale
becomes 0; such underflows are counted, reported and never silent. Overflow of the integer
sum cannot happen by construction; a non-finite gradient or a total that does not fit the
parameter dtype raises `ExactOverflow` naming the parameter.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from distshare.errors import UsageError, VerificationFailed

INT_BITS = 62  # headroom below int64's 63 bits: n contributions of < 2^(62 - h) sum to < 2^62

class ExactOverflow(VerificationFailed):
    """A gradient that exact mode cannot represent: non-finite, or a sum beyond the dtype's range."""


class ExactGradSum:
    """One step's exact sum of per-sample gradient contributions, over micro-batches and ranks."""

    def __init__(
        self, model: nn.Module, global_samples: int, world_size: int = 1, group: dist.ProcessGroup | None = None
    ) -> None:
        self.params = list(model.named_parameters())  # the order `per_sample_grads` flattens in
        self.size = sum(p.numel() for _, p in self.params)
        first = self.params[0][1]
        self.dtype, self.device = first.dtype, first.device
        self.global_samples = global_samples
        self.n = max(1, global_samples)
        self.world_size = world_size
        self.group = group
        self.rows: list[torch.Tensor] = []
        self.underflows = 0  # contributions of this step that rounded to 0 (all ranks)

    def add(self, rows: torch.Tensor) -> None:
        """This rank's per-sample gradients of one micro-batch, [n_i, P]."""
        if rows.shape[0]:
            self.rows.append(rows)

    def total(self) -> torch.Tensor:
        """The exact sum over every rank's contributions, rounded once to float64; collective."""
        if not self.rows:
            local = torch.zeros(0, self.size, dtype=self.dtype, device=self.device)
        else:
            local = self.rows[0] if len(self.rows) == 1 else torch.cat(self.rows)
        top = local.abs().amax(dim=0) if local.shape[0] else local.new_zeros(self.size)
        top = torch.where(torch.isnan(top), torch.full_like(top, math.inf), top)
        if self._distributed:
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.group)
        bad = ~torch.isfinite(top)
        if bool(bad.any()):
            raise ExactOverflow(f"sync=exact: the gradient of {self._name_at(int(bad.nonzero()[0]))} is not finite")
        headroom = INT_BITS - math.ceil(math.log2(self.n))
        _, exponent = torch.frexp(top.to(torch.float64))  # top < 2^exponent (0 where top == 0)
        shift = headroom - exponent.to(torch.int64)
        ints = _to_fixed(local, shift)
        # Rounding never turns 0 into non-zero: the non-zeros that vanished are the underflows.
        lost = torch.count_nonzero(local) - torch.count_nonzero(ints)
        counts = torch.tensor([int(lost), local.shape[0]], dtype=torch.int64, device=ints.device)
        summed = torch.cat([ints.sum(dim=0), counts])
        if self._distributed:
            dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=self.group)
        self.underflows = int(summed[-2])
        if int(summed[-1]) != self.global_samples:
            # More contributions than the headroom was sized for may have wrapped the integer
            # sum around; fewer mean a sample missing from the step. Either way: refused.
            raise UsageError(
                f"sync=exact: the step was started for global_samples={self.global_samples}, but the ranks "
                f"added {int(summed[-1])} samples' gradients: pass the sample count of the whole global batch"
            )
        return _ldexp(summed[:-2].to(torch.float64), -shift)

    def write_grads(self, normalizer: float) -> None:
        """Set every parameter's .grad to total / normalizer in its own dtype; collective."""
        flat = self.total() / normalizer
        rounded = flat.to(self.dtype)
        over = torch.isinf(rounded) & torch.isfinite(flat)
        if bool(over.any()):
            i = int(over.nonzero()[0])
            raise ExactOverflow(
                f"sync=exact: the gradient of {self._name_at(i)} is {float(flat[i]):.3g}, "
                f"beyond the range of {str(self.dtype).removeprefix('torch.')}"
            )
        offset = 0
        for _, p in self.params:  # views of one buffer, as DDP's gradient buckets are
            p.grad = rounded[offset : offset + p.numel()].view_as(p)
            offset += p.numel()

    @property
    def _distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def _name_at(self, flat_index: int) -> str:
        offset = 0
        for name, p in self.params:
            if flat_index < offset + p.numel():
                return f"'{name}' (element {flat_index - offset})"
            offset += p.numel()
        return f"element {flat_index}"


def _to_fixed(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """round(x * 2^shift) as int64, column j scaled by 2^shift[j].

    In x's own dtype when every 2^shift[j] is a float of that dtype: multiplying by a power
    of two is then exact (the results are below 2^62, and one that falls below the normal
    range is below 0.5 and rounds to 0 either way), so the integers are the float64 route's,
    without a float64 copy of every contribution. Else through float64.
    """
    info = torch.finfo(x.dtype)
    highest = math.frexp(info.max)[1] - 1  # 2^highest is the largest power of two of the dtype
    lowest = math.frexp(info.smallest_normal)[1] - 1 + math.frexp(info.eps)[1] - 1  # the smallest subnormal
    if int(shift.max()) <= highest and int(shift.min()) >= lowest:
        return (x * torch.exp2(shift.to(x.dtype))).round_().to(torch.int64)
    return _ldexp(x.to(torch.float64), shift).round_().to(torch.int64)


def _ldexp(x: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """x * 2^exponent elementwise, exact wherever the result is a normal float64.

    In two factors: one power of two of the whole range (up to about 2^1130 here) does not
    fit a float64, each half does.
    """
    if int(exponent.max()) <= 1000 and int(exponent.min()) >= -1000:  # the usual case: one factor
        return x * torch.exp2(exponent.to(torch.float64))
    half = torch.div(exponent, 2, rounding_mode="floor")
    return x * torch.exp2(half.to(torch.float64)) * torch.exp2((exponent - half).to(torch.float64))
