"""Order-independent exact addition of per-sample gradients: the arithmetic of `--sync exact`.

Every framework says that W ranks x k micro-batches match one big batch only up to
rounding, because floating-point addition is not associative: splitting the batch changes
the order of the sum. Exact mode removes both places where the split enters: each sample's
gradient is computed alone, in one fixed shape (`distshare.numerics.per_sample`), and the
contributions are added in integers, here.

The integers are digits on a grid of exponents fixed in advance, not taken from the data:
bin b holds the bits of weight 2^(bW) .. 2^((b+1)W - 1), W = `digit_bits(n)` (48 for up to
16,384 samples). Each gradient element keeps the two bins at the top of its largest
contribution so far (top bin T: the largest |contribution| is below 2^((T+1)W)); a
contribution is truncated toward zero at the lower bin's unit 2^((T-1)W) and cut into its two
digits, and each bin sums its digits in an int64. A digit never depends on which other
samples came before: when a larger contribution raises T, the lowest bin is dropped whole,
which is exactly what truncating every earlier contribution at the new unit would have
given. So contributions are added as soon as they exist (a chunk at a time: memory does not
grow with the batch), yet the sum is the same integers for every order, every chunk
composition, every partition over micro-batches and ranks: T is settled by a MAX over ranks
(exact, order-free), the bins by a SUM of integers (associative), either in one all_gather of
every rank's windows and bins (small models: one collective) or in an all-reduce MAX then SUM.
The total is turned into a float once (correctly rounded to float64) and divided by the item
count once.

Precision: each contribution keeps at least W bits below its element's largest contribution
(48 for n <= 16,384; up to 2W when the largest sits high in its bin): finer than float32's 24
bits. A non-zero contribution below the lower bin's unit becomes 0; such underflows are
counted exactly (per element, how many contributions have their highest non-zero digit in
each bin, so a dropped bin is counted), reported and never silent. Overflow of the integer
sums cannot happen by construction (n digits of < 2^W stay below 2^62); a non-finite
gradient, or a total that does not fit the parameter dtype, raises `ExactOverflow` naming the
parameter, on every rank at once.

Memory: per parameter, two int64 bins, the top bin's index (int32) and two int32 counts: 28
bytes, whatever the number of samples, and scratch for 32 rows x 2^15 columns at a time (10
MiB at most). Contributions are converted 32 rows at a time: a chunk's digits are summed
exactly in float64 (32 x 2^48 = 2^53).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from distshare.errors import UsageError, VerificationFailed

CHUNK_ROWS = 32  # rows summed at once in float64: 32 digits of < 2^48 stay below 2^53, exact
DIGIT_BITS = 48  # W: 53 - log2(CHUNK_ROWS)
# Columns converted at once: the scratch is CHUNK_ROWS x this x 9 bytes (9 MiB). A piece's
# rows and scratch (13 MiB) stay in a 32 MiB cache through the conversion's dozen passes; pieces
# 4x wider went out to memory (the 12.6M-parameter model's exact step: 3.1-3.5 s, now 2.2-2.6 s).
# Every demo model (GPT-2's tiny config: 28,032 parameters) is still one piece.
CHUNK_COLUMNS = 1 << 15
# Digits are copied into float64 for their exact sums this many columns at a time: 1 MiB that
# stays in cache, where a whole chunk's copy (4.5 MB for 17,574 columns) went out to memory and
# back (with the cache emptied first, the transformer's conversion took 10-15% longer so).
WIDE_COLUMNS = 1 << 12
WRITE_COLUMNS = 1 << 17  # gradient elements rounded and written at once (a few MiB of float64 temporaries)
NONFINITE = 1 << 30  # the top bin of an element with a non-finite contribution: wins the MAX
# Across ranks, sums of up to this many elements (parameters x ranks) are gathered whole and
# summed on every rank: one collective. Larger ones take an all-reduce MAX, then a SUM (the
# gather would hold 40 bytes a parameter per rank).
GATHER_LIMIT = 1 << 20


class ExactOverflow(VerificationFailed):
    """A gradient that exact mode cannot represent: non-finite, or a sum beyond the dtype's range."""


def digit_bits(samples: int) -> int:
    """W for a sum of `samples` contributions: 48, fewer where n digits of W bits would pass 2^62."""
    return min(DIGIT_BITS, 62 - math.ceil(math.log2(max(1, samples))))


class ExactGradSum:
    """One step's exact sum of per-sample gradient contributions, over chunks and ranks.

    `add(rows, start)` takes contributions of columns [start, start + rows.shape[1]) of the
    flattened parameters (in `named_parameters` order) and converts them at once; the block
    that holds column 0 counts the samples (rows) it brings.
    """

    def __init__(
        self, model: nn.Module, global_samples: int, world_size: int = 1, group: dist.ProcessGroup | None = None
    ) -> None:
        self.params = list(model.named_parameters())  # the order `per_sample_grads` flattens in
        self.size = sum(p.numel() for _, p in self.params)
        first = self.params[0][1]
        self.dtype, self.device = first.dtype, first.device
        self.global_samples = global_samples
        self.bits = digit_bits(global_samples)
        self.world_size = world_size
        self.group = group
        self.grid = _grid(self.bits, self.device)
        self.top = torch.zeros(self.size, dtype=torch.int32, device=self.device)  # bin index (`_Grid`)
        self.bins = torch.zeros(2, self.size, dtype=torch.int64, device=self.device)  # [top bin, lower bin]
        self.leads = torch.zeros(2, self.size, dtype=torch.int32, device=self.device)  # highest digit there
        self.samples = 0  # rows added on this rank
        self.lost = 0  # this rank's contributions truncated to 0 so far
        self.underflows = 0  # contributions of this step truncated to 0 (all ranks): set by total()
        self._scratch: _Scratch | None = None  # for the last chunk shape, reused
        self._fresh = True  # nothing added since the step began: the first block sets its window

    def reset(self, global_samples: int) -> None:
        """Start the next step's sum (the same parameters): nothing allocated again."""
        self.global_samples, self.bits = global_samples, digit_bits(global_samples)
        self.grid = _grid(self.bits, self.device)
        self.top.zero_()
        self.bins.zero_()
        self.leads.zero_()
        self.samples = self.lost = self.underflows = 0
        self._fresh = True

    def add(self, rows: torch.Tensor, start: int = 0) -> None:
        """Contributions [m, L] to columns [start, start + L): converted now, not kept."""
        if start == 0:
            self.samples += rows.shape[0]
        for first in range(0, rows.shape[0], CHUNK_ROWS):
            for column in range(0, max(1, rows.shape[1]), CHUNK_COLUMNS):  # bounded scratch
                part = rows[first : first + CHUNK_ROWS, column : column + CHUNK_COLUMNS]
                self._add(part, start + column)

    def _add(self, rows: torch.Tensor, start: int) -> None:
        if not rows.shape[0] or not rows.shape[1]:
            return
        rows = rows.to(_work_dtype(rows.dtype))  # exact; float16 cannot hold the scaled values (up to 2^96)
        cols = slice(start, start + rows.shape[1])
        work = self._scratch
        if work is None or (work.y.shape, work.y.dtype) != (rows.shape, rows.dtype):
            work = self._scratch = _Scratch(rows)
        largest = torch.abs(rows, out=work.y).amax(dim=0)
        if math.isfinite(float(largest.max())):  # NaN and inf reach the max
            top = self.grid.top(largest)  # 0 for a column of zeros
        else:
            finite = torch.isfinite(largest)
            rows = rows.masked_fill(~finite, 0.0)  # the element is refused in total(); keep the rest exact
            top = torch.where(finite, self.grid.top(largest.masked_fill(~finite, 0.0)), NONFINITE)
        if self._fresh:
            self.top[cols] = top  # the step's first contributions: empty bins, nothing to move
            self._fresh = False
        else:
            self._raise_top(cols, top)
        high, nonzero, leading_high, with_low = work.high, work.counts[0], work.counts[1], work.counts[2]
        work.count_nonzero(rows, out=nonzero)
        # Each contribution truncated toward zero at its lower bin's unit, in that unit: by a
        # division that rounds toward zero (trunc() and fmod() are about 40x slower on CPU here).
        y = self.grid.truncated(rows, self.top[cols], out=work.y)
        if y.dtype != high.dtype:  # scaled in float64 (mixed dtypes): its scratch too
            high = torch.empty_like(y)
        torch.div(y, 2.0**self.bits, rounding_mode="trunc", out=high)  # the top bin's digit
        work.count_nonzero(high, out=leading_high)
        low = y.add_(high, alpha=-(2.0**self.bits))  # the lower bin's digit (exact: y's bits below the top digit)
        work.count_nonzero(low, out=with_low)
        self.bins[0, cols].add_(work.column_sums(high))
        self.leads[0, cols].add_(leading_high)
        # A contribution that is not 0 but has no top digit either has its highest digit in the
        # lower bin, or was truncated to 0 (underflow).
        lost = nonzero.sum() - leading_high.sum()
        # Lower digits are rare (a float32's 24 bits mostly sit inside its top bin's 48): they
        # are summed and counted in the columns that have one, not over the whole chunk.
        where = with_low.nonzero().squeeze(1)
        if len(where):
            low_part, high_part = low.index_select(1, where), high.index_select(1, where)
            # 32 digits of < 2^48: exact in float64
            self.bins[1, cols].index_add_(0, where, low_part.to(torch.float64).sum(dim=0).to(torch.int64))
            only_low = ((high_part == 0) & (low_part != 0)).sum(dim=0, dtype=torch.int32)
            self.leads[1, cols].index_add_(0, where, only_low)
            lost -= only_low.sum()
        self.lost += int(lost)

    def _raise_top(self, cols: slice, top: torch.Tensor) -> None:
        """Move the columns' window up to `top` where it is higher: the bins it leaves are dropped whole."""
        self.lost += _align(self.top[cols], self.bins[:, cols], self.leads[:, cols], top)

    def total(self) -> torch.Tensor:
        """The exact sum over every rank's contributions, rounded once to float64; collective."""
        high, low = self._settled()
        return self._value(high, low, slice(0, self.size))

    def _settled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's sums at one window (`self.top`): the two digit sums, [size] int64 each,
        after refusing a non-finite gradient and a wrong sample count; collective."""
        if not self._distributed:
            (high, low), self.underflows, samples = self.bins, self.lost, self.samples
        elif self.size * dist.get_world_size(self.group) <= GATHER_LIMIT:
            high, low, self.underflows, samples = self._gathered()
        else:  # two all-reduces: the window's MAX, then the bins' SUM at that window
            top = self.top.clone()
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.group)
            self._raise_top(slice(0, self.size), top)
            counts = torch.tensor([self.lost, self.samples], dtype=torch.int64, device=self.device)
            summed = torch.cat([self.bins.reshape(-1), counts])
            dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=self.group)
            high, low = summed[: self.size], summed[self.size : 2 * self.size]
            self.underflows, samples = int(summed[-2]), int(summed[-1])
        if int(self.top.max()) == NONFINITE:
            bad = int((self.top == NONFINITE).nonzero()[0])
            raise ExactOverflow(f"sync=exact: the gradient of {self._name_at(bad)} is not finite")
        if samples != self.global_samples:
            # More contributions than the digits were sized for may have wrapped the integer
            # sums around; fewer mean a sample missing from the step. Either way: refused.
            raise UsageError(
                f"sync=exact: the step was started for global_samples={self.global_samples}, but the ranks "
                f"added {samples} samples' gradients: pass the sample count of the whole global batch"
            )
        return high, low

    def _value(self, high: torch.Tensor, low: torch.Tensor, cols: slice) -> torch.Tensor:
        """The settled sums of columns `cols` as float64 values, each rounded once."""
        return self.grid.to_units(_round_to_float64(high[cols], low[cols], self.bits), self.top[cols])

    def _gathered(self) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Every rank's windows, bins and counts in one all_gather, each moved to the highest
        window and summed here (in rank order: integers, so any order gives the same): one
        collective's latency where the MAX-then-SUM path pays two."""
        n = self.size
        counts = torch.tensor([self.lost, self.samples], dtype=torch.int64, device=self.device)
        mine = torch.cat(
            [self.top.to(torch.int64), self.bins.reshape(-1), self.leads.to(torch.int64).reshape(-1), counts]
        )
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, mine, group=self.group)
        self.top.copy_(torch.stack([part[:n] for part in parts]).amax(dim=0))
        bins = torch.zeros_like(self.bins)
        lost = samples = 0
        for part in parts:
            theirs = part[n : 3 * n].view(2, n)  # a fresh tensor of this rank's: moved in place
            lost += _align(part[:n], theirs, part[3 * n : 5 * n].view(2, n), self.top) + int(part[-2])
            samples += int(part[-1])
            bins += theirs
        return bins[0], bins[1], lost, samples

    def write_grads(self, normalizer: float) -> None:
        """Set every parameter's .grad to total / normalizer in its own dtype; collective."""
        high, low = self._settled()
        rounded = torch.empty(self.size, dtype=self.dtype, device=self.device)
        # Finite values of the dtype summed in float64 stay finite: one number checks them all.
        check = torch.zeros((), dtype=torch.float64, device=self.device)
        # In pieces: a whole model's float64 temporaries (100 MB each for 12.6M parameters) went
        # out to memory and were faulted in anew every step.
        for start in range(0, self.size, WRITE_COLUMNS):
            cols = slice(start, start + WRITE_COLUMNS)
            piece = rounded[cols]
            piece.copy_(self._value(high, low, cols).div_(normalizer))
            check += piece.sum(dtype=torch.float64)
        if not math.isfinite(float(check)):
            i = int(torch.isinf(rounded).nonzero()[0])  # every value is finite: an inf here is an overflow
            value = float(self._value(high, low, slice(i, i + 1))) / normalizer
            raise ExactOverflow(
                f"sync=exact: the gradient of {self._name_at(i)} is {value:.3g}, "
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


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype contributions are digitized in: float64 stays, anything narrower becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _align(top: torch.Tensor, bins: torch.Tensor, leads: torch.Tensor, new_top: torch.Tensor) -> int:
    """Move windows `top` up to `new_top` where it is higher, in place: the bins they leave are
    dropped whole (which is truncating every contribution at the new unit). Returns how many
    contributions that turns into 0: those whose highest digit was in a dropped bin."""
    up = new_top > top
    if not bool(up.any()):
        return 0
    by_one = up & (new_top == top + 1)
    lost = int((leads[1] * up).sum() + (leads[0] * (up & ~by_one)).sum())
    bins[1] = torch.where(by_one, bins[0], torch.where(up, 0, bins[1]))
    leads[1] = torch.where(by_one, leads[0], torch.where(up, 0, leads[1]))
    bins[0] = torch.where(up, 0, bins[0])
    leads[0] = torch.where(up, 0, leads[0])
    top.copy_(torch.maximum(top, new_top))
    return lost


class _Scratch:
    """The working tensors of one chunk shape, reused from chunk to chunk and step to step."""

    def __init__(self, rows: torch.Tensor) -> None:
        shape, device = rows.shape, rows.device
        self.high, self.y = torch.empty_like(rows), torch.empty_like(rows)
        # float64 digits are summed where they are; others are copied here first, WIDE_COLUMNS at a time
        wide = (shape[0], min(shape[1], WIDE_COLUMNS))
        self.wide = None if rows.dtype == torch.float64 else torch.empty(wide, dtype=torch.float64, device=device)
        self.flags = torch.empty(shape, dtype=torch.bool, device=device)
        self.counts = torch.empty(3, shape[1], dtype=torch.uint8, device=device)
        self.sums = torch.empty(shape[1], dtype=torch.float64, device=device)

    def count_nonzero(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Per column, how many of its (at most CHUNK_ROWS <= 255) rows are non-zero, into `out` (uint8).

        A copy into bool and a uint8 sum: comparisons and bool reductions are several times
        slower on CPU."""
        return torch.sum(self.flags.copy_(x).view(torch.uint8), dim=0, dtype=torch.uint8, out=out)

    def column_sums(self, digits: torch.Tensor) -> torch.Tensor:
        """Each column's sum of its digits, int64: exact in float64 (rows x 2^48 <= 2^53)."""
        if digits.dtype == torch.float64:
            return torch.sum(digits, dim=0, out=self.sums).to(torch.int64)
        for start in range(0, digits.shape[1], WIDE_COLUMNS):
            part = digits[:, start : start + WIDE_COLUMNS]
            wide = self.wide[:, : part.shape[1]].copy_(part)
            torch.sum(wide, dim=0, out=self.sums[start : start + part.shape[1]])
        return self.sums.to(torch.int64)


class _Grid:
    """The fixed bins of one digit width W: bin k holds the bits of 2^(kW) .. 2^((k+1)W - 1).

    A column's top bin is kept as an index i over the bin starts 2^(kW) a float64 can hold
    (k_min <= k <= k_max): i = how many of them its largest |contribution| is >= of,
    so the top bin is T = k_min + i - 1, and 0 means zero or below every bin start. Indices
    order as the bins do, so a MAX over indices is the MAX over bins.
    """

    def __init__(self, bits: int, device: torch.device) -> None:
        self.bits, self.device = bits, device
        self.k_min, k_max = -(1074 // bits), 1023 // bits  # float64: 2^-1074 .. 2^1023
        self.starts = k_max - self.k_min + 1  # how many bin starts: the largest index
        # Per index, the exponent of the lower bin's unit, (T - 1) W: scaling by its negative
        # makes that unit 1, scaling the integer total by it gives the value back.
        self.unit = (torch.arange(self.starts + 1, dtype=torch.float64) + self.k_min - 2) * bits
        self._lowest: dict[torch.dtype, int] = {}
        self._scaling: dict[torch.dtype, torch.Tensor] = {}
        # The top-bin index of a float64 by its exponent field f (the value in [2^(f-1023), 2^(f-1022))):
        # 0 for f = 0 (zero; only a float64 can be subnormal, and `top` reads those apart).
        e = torch.arange(2048) - 1023
        by_field = (torch.div(e, bits, rounding_mode="floor") - (self.k_min - 1)).clamp(0, self.starts)
        self._by_field = torch.where(e > -1023, by_field, 0).to(dtype=torch.int32, device=device)
        self._powers: dict[tuple[str, torch.dtype], _Powers] = {}

    def powers(self, sign: str, dtype: torch.dtype) -> _Powers:
        """2^(-unit) (`sign` "-": into units) or 2^unit ("+": back), per index, in `dtype`."""
        key = (sign, dtype)
        if key not in self._powers:
            self._powers[key] = _Powers(-self.unit if sign == "-" else self.unit, dtype, self.device)
        return self._powers[key]

    def scaling_index(self, dtype: torch.dtype) -> torch.Tensor:
        """Per top-bin index, the index whose unit scales the column: itself, except below the
        bin of the dtype's smallest subnormal, where a column is all zeros and any unit serves
        it: there, the unit 1 (so a zero column never forces two factors)."""
        if dtype not in self._scaling:
            index = torch.arange(self.starts + 1, dtype=torch.int32)
            unit_one = 2 - self.k_min  # (T - 1) W = 0
            self._scaling[dtype] = torch.where(index < self.lowest(dtype), unit_one, index).to(self.device)
        return self._scaling[dtype]

    def lowest(self, dtype: torch.dtype) -> int:
        """The index of the smallest non-zero value of `dtype`."""
        if dtype not in self._lowest:
            info = torch.finfo(dtype)
            tiny = torch.tensor([info.smallest_normal * info.eps], dtype=torch.float64, device=self.device)
            self._lowest[dtype] = int(self.top(tiny)[0])
        return self._lowest[dtype]

    def top(self, largest: torch.Tensor) -> torch.Tensor:
        """Each column's top-bin index (int32) from its largest |contribution| (finite).

        From the exponent: largest in [2^(e-1), 2^e) is >= the bin start 2^(kW) exactly when
        kW <= e - 1 (what `bucketize` over the starts would find, at a fraction of its cost)."""
        if largest.dtype != torch.float64:
            # Every float32 is a normal float64, whose exponent field alone says it: a lookup.
            field = torch.bitwise_right_shift(largest.to(torch.float64).view(torch.int64), 52)
            return self._by_field.index_select(0, field)
        exponent = torch.frexp(largest)[1] - 1  # subnormal float64s too
        index = torch.div(exponent, self.bits, rounding_mode="floor") - (self.k_min - 1)
        return torch.where(largest > 0, index.clamp(0, self.starts), 0).to(torch.int32)

    def truncated(self, x: torch.Tensor, top: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x / 2^((T - 1) W) truncated toward zero, column by column: each contribution as an
        integer count of its lower bin's unit, exactly; into `out` where it can be.

        One division that rounds toward zero where every column's unit is a normal float of the
        dtype (a division by a power of two is exact wherever the quotient is >= 1, and one
        below 1 is truncated to 0 anyway; quotients stay below 2^(2W) <= 2^96); elsewhere a
        multiplication by the inverse, in two factors if need be, then the truncation. Columns
        whose factors the dtype cannot hold (mixed dtypes only) are scaled in float64, in a
        new tensor.
        """
        index = self.scaling_index(x.dtype).index_select(0, top.clamp(max=self.starts))
        span = _span(index)
        units = self.powers("+", x.dtype)
        if units.holds(span, single=True):
            return torch.div(x, units.single.index_select(0, index), rounding_mode="trunc", out=out)
        if not self.powers("-", x.dtype).apply(x, index, span, out):
            out = x.to(torch.float64, copy=True)
            self.powers("-", torch.float64).apply(out, index, span, out)  # float64 holds them all
        return torch.div(out, 1.0, rounding_mode="trunc", out=out)

    def to_units(self, value: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        """value * 2^((T - 1) W) column by column (float64): exact wherever the result is a normal float64."""
        # `total` refused a non-finite element before: every index is a bin's.
        done = self.powers("+", torch.float64).apply(value, top, _span(top), value)
        assert done  # every index's two factors are normal float64s
        return value


class _Powers:
    """2^e for a table of exponents e, as one factor where it is a normal float of the dtype and
    as two (each normal) where only they are: multiplying by them is exact."""

    def __init__(self, exponent: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
        info = torch.finfo(dtype)
        low, high = math.frexp(info.smallest_normal)[1] - 1, math.frexp(info.max)[1] - 1
        half = torch.floor(exponent / 2)
        one = ((exponent >= low) & (exponent <= high)).nonzero().squeeze(1)
        two = ((half >= low) & (half <= high) & (exponent - half >= low) & (exponent - half <= high)).nonzero()
        self.single, self.first, self.second = (
            torch.exp2(e.clamp(low, high)).to(dtype=dtype, device=device) for e in (exponent, half, exponent - half)
        )
        self.one = (int(one[0]), int(one[-1])) if len(one) else (1, 0)
        self.two = (int(two[0]), int(two[-1])) if len(two) else (1, 0)

    def holds(self, span: tuple[int, int], single: bool) -> bool:
        """Are the factors of every index in `span` (lo, hi) normal floats: one each, or two each?"""
        lo, hi = self.one if single else self.two
        return lo <= span[0] and span[1] <= hi

    def apply(self, x: torch.Tensor, index: torch.Tensor, span: tuple[int, int], out: torch.Tensor) -> bool:
        """out = x * 2^e[index] column by column (`span`: the indices' least and greatest);
        False (out untouched) where the dtype cannot hold the factors."""
        if self.holds(span, single=True):
            torch.mul(x, self.single.index_select(0, index), out=out)
        elif self.holds(span, single=False):
            torch.mul(x, self.first.index_select(0, index), out=out).mul_(self.second.index_select(0, index))
        else:
            return False
        return True


def _span(index: torch.Tensor) -> tuple[int, int]:
    """The least and the greatest index: which factors a column-by-column scaling needs."""
    lo, hi = torch.aminmax(index)
    return int(lo), int(hi)


_grids: dict[tuple[int, str], _Grid] = {}


def _grid(bits: int, device: torch.device) -> _Grid:
    key = (bits, str(device))
    if key not in _grids:
        _grids[key] = _Grid(bits, device)
    return _grids[key]


def _round_to_float64(high: torch.Tensor, low: torch.Tensor, bits: int) -> torch.Tensor:
    """high * 2^bits + low (int64 digit sums), correctly rounded to float64 (nearest, ties to even)."""
    # Both below 2^53 (the usual case): two exact float64 operands, one correctly rounded
    # addition (the factor 2^bits is exact).
    value = torch.add(low.to(torch.float64), high.to(torch.float64), alpha=2.0**bits)
    if any(abs(int(v)) >= 2**53 for digits in (high, low) for v in torch.aminmax(digits)):
        wide = (high.abs() >= 2**53) | (low.abs() >= 2**53)
        where = wide.nonzero().squeeze(1)
        value[where] = _round_wide(high[where], low[where], bits)
    return value


def _round_wide(high: torch.Tensor, low: torch.Tensor, bits: int) -> torch.Tensor:
    """`_round_to_float64` in integers, for digit sums of up to 62 bits."""
    carry = torch.bitwise_right_shift(low, bits)  # floor: low becomes a digit in [0, 2^bits)
    low = low - torch.bitwise_left_shift(carry, bits)
    high = high + carry
    negative = high < 0  # the value's sign: work on its magnitude
    borrow = (negative & (low > 0)).to(torch.int64)
    high = torch.where(negative, -high - borrow, high)
    low = torch.where(negative & (low > 0), (1 << bits) - low, low)
    # Keep the 62 leading bits of the magnitude (at least 55: the 53 of a float64 and two more)
    # and OR in a sticky bit for what lies below them: the int64 -> float64 conversion then
    # rounds as the exact value would.
    _, length = torch.frexp(high.to(torch.float64))  # bit length of high, or one more if rounded up
    length = length.to(torch.int64)
    rounded_up = (high > 0) & (torch.bitwise_right_shift(high, (length - 1).clamp(min=0)) == 0)
    length = torch.where(rounded_up, length - 1, length)
    drop = (length + bits - 62).clamp(min=0)  # <= bits: high < 2^62
    kept = torch.bitwise_left_shift(high, bits - drop) | torch.bitwise_right_shift(low, drop)
    sticky = (low & (torch.bitwise_left_shift(torch.ones_like(drop), drop) - 1)) != 0
    magnitude = (kept | sticky.to(torch.int64)).to(torch.float64) * torch.exp2(drop.to(torch.float64))
    return torch.where(negative, -magnitude, magnitude)
