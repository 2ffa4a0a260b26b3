"""Claim: in exact mode (`--sync exact`) the training state after N steps is bitwise the same
for every partition G = W x k x b of the global batch, on real gloo ranks, in float32 and
float64; and the arithmetic that makes it so detects what it cannot represent.

The contrast is measured beside it: the same grid in normal mode differs from the big batch
in the last bits (test_equivalence.py shows by how much), so "bitwise" here is a property of
exact mode, not of a grid too small to show rounding.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch
from conftest import rules_written_in_place
from torch import nn

from distshare.cli import main
from distshare.config import load_config
from distshare.distributed.spawn import run_distributed
from distshare.equivalence import ConfigTask, run_grid
from distshare.errors import UsageError
from distshare.models import build_model
from distshare.numerics import exact_sum, per_sample
from distshare.numerics.exact_sum import ExactGradSum, ExactOverflow
from distshare.numerics.per_sample import CHUNK, per_sample_grads, refuse_split_dependent
from distshare.training import sample_losses


def _cfg(*overrides: str):
    return load_config(
        None,
        [
            "plan.global_batch=24",
            "plan.accum_steps=1",
            "plan.micro_batch=null",
            "data.num_samples=72",
            "data.task=roles",  # a label per token: items per sample differ, the normalizer is the token count
            "data.variable_length=true",
            "sync=exact",
            *overrides,
        ],
    )


def _assert_all_bitwise(grid) -> None:
    not_bitwise = [p.label for p in grid.partitions if not (p.bitwise_equal and p.grad_bitwise_equal)]
    assert not not_bitwise, grid.text()


def test_small_grid_is_bitwise_in_exact_mode_float32_and_float64():
    # W = 3 is a non-power of two; b runs from 8 down to 2 (24 = 3 x 4 x 2).
    grid = run_grid(ConfigTask(_cfg()), (1, 2, 3), (1, 2, 4), ["float32", "float64"], steps=2, progress=False)
    assert len(grid.partitions) == 18
    _assert_all_bitwise(grid)


@pytest.mark.slow
def test_ranks_holding_several_chunks_are_bitwise():
    # 80 samples a step: one process adds 32 + 32 + 16 rows, each of 2 ranks 32 + 8; the
    # integer sum is streamed chunk by chunk, and the split still changes no bit.
    cfg = _cfg("plan.global_batch=80", "data.num_samples=160")
    grid = run_grid(ConfigTask(cfg), (1, 2), (1, 5), ["float32"], steps=2, progress=False)
    assert len(grid.partitions) == 4
    _assert_all_bitwise(grid)


def test_normal_mode_is_not_bitwise_on_the_same_split_and_exact_mode_is():
    # One process, k = 1 against k = 4 (b = 6): only the order of the additions changes.
    normal = run_grid(ConfigTask(_cfg("sync=ddp")), (1,), (1, 4), ["float32"], steps=2, progress=False)
    k4 = next(p for p in normal.partitions if p.accum_steps == 4)
    assert not k4.bitwise_equal and k4.within_rounding, normal.text()
    exact = run_grid(ConfigTask(_cfg()), (1,), (1, 4), ["float32"], steps=2, progress=False)
    _assert_all_bitwise(exact)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model", [["model.name=transformer"], ["model.name=cnn", "data.name=shapes", "model.norm=group"]], ids=str
)
def test_full_grid_is_bitwise_in_exact_mode(model):
    # W in 1..4 x k in 1, 2, 4, 8: G = 96 is the smallest global batch every split divides.
    cfg = _cfg("plan.global_batch=96", "data.num_samples=192", *model)
    grid = run_grid(ConfigTask(cfg), (1, 2, 3, 4), (1, 2, 4, 8), ["float32", "float64"], steps=2, progress=False)
    assert len(grid.partitions) == 32
    _assert_all_bitwise(grid)


@pytest.mark.parametrize("method", ["expanded weights", "vmap"])
def test_a_samples_gradient_does_not_depend_on_its_batch(method, monkeypatch):
    # The premise: BLAS picks kernels by size, so a batch of 1 and a batch of 12 compute a
    # sample's rows differently; exact mode's fixed-size chunks do not, by either method.
    if method == "vmap":
        monkeypatch.setattr(per_sample, "_expandable", lambda model: False)
    cfg = _cfg()
    from distshare.data import build_dataset
    from distshare.data.tensors import TensorTable

    ds, info = build_dataset(cfg.data)
    table = TensorTable.from_dataset(ds, info, torch.float32)
    model = build_model(cfg.model, info, seed=0)

    def grads(indices: list[int]) -> torch.Tensor:
        b = table.select(indices)
        return per_sample_grads(model, {"inputs": b.inputs, "labels": b.labels}, sample_losses)[0]

    whole = grads(list(range(2 * CHUNK + 3)))
    for size in (1, 2, 3, CHUNK, CHUNK + 1):
        for start in (0, 5):
            part = grads(list(range(start, start + size)))
            assert torch.equal(part, whole[start : start + size]), (size, start)


# ---------------------------------------------------------------- the integer sum


def _model(*shapes: int) -> nn.Module:
    m = nn.Module()
    m.w = nn.Parameter(torch.zeros(*shapes))
    return m


def test_integer_sum_is_the_same_for_every_order_and_split():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(40, 50, generator=gen) * torch.logspace(-6, 6, 50)
    model = _model(50)

    def total(order: torch.Tensor, cuts: list[int]) -> torch.Tensor:
        acc = ExactGradSum(model, 40)
        for part in torch.tensor_split(rows[order], cuts):
            acc.add(part)
        return acc.total()

    reference = total(torch.arange(40), [])
    for seed in range(5):
        order = torch.randperm(40, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(total(order, [3, 7, 20, 33]), reference)
    # Plain float32 addition does depend on the order: the contrast this removes.
    assert not torch.equal(rows.sum(0), rows.flip(0).sum(0))


def test_integer_sum_is_the_exact_sum_rounded_once_when_contributions_fit():
    # float32 contributions within 2^20 of each other fit 57 bits exactly: the total is the
    # exact rational sum, rounded once to float64.
    gen = torch.Generator().manual_seed(1)
    rows = (torch.randn(32, 20, generator=gen) * 2.0 ** torch.randint(-10, 10, (32, 20), generator=gen)).float()
    acc = ExactGradSum(_model(20), 32)
    acc.add(rows)
    got = acc.total()
    for j in range(20):
        exact = sum(Fraction(float(x)) for x in rows[:, j])
        assert got[j].item() == float(exact), j
    assert acc.underflows == 0


def test_underflow_is_counted_not_silent():
    acc = ExactGradSum(_model(2), 2)
    acc.add(torch.tensor([[1.0, 1.0], [1e-30, 0.5]], dtype=torch.float64))
    total = acc.total()
    assert total.tolist() == [1.0, 1.5]  # 1e-30 is below the lower bin's unit, 2^-48 here
    assert acc.underflows == 1


def _truncated_reference(rows: torch.Tensor, bits: int = 48) -> tuple[torch.Tensor, int]:
    """The specification, in rationals: per element, the top bin T of the largest |contribution|
    (largest in [2^(TW), 2^((T+1)W))), every contribution truncated toward zero at 2^((T-1)W),
    the exact sum rounded once to float64; and how many non-zero contributions became 0."""
    out, lost = [], 0
    for j in range(rows.shape[1]):
        column = [Fraction(float(x)) for x in rows[:, j]]
        largest = max(abs(c) for c in column)
        if largest == 0:
            out.append(0.0)
            continue
        top = (math.frexp(float(largest))[1] - 1) // bits
        unit = Fraction(2) ** ((top - 1) * bits)
        total = Fraction(0)
        for c in column:
            kept = math.floor(abs(c) / unit) * (1 if c > 0 else -1)
            lost += c != 0 and kept == 0
            total += kept * unit
        out.append(float(total))
    return torch.tensor(out, dtype=torch.float64), lost


def _spread_rows(dtype: torch.dtype, spread: str = "gradients") -> torch.Tensor:
    """96 x 24 contributions: signed, a fifth of them 0, exponents 2^-80 .. 2^80 apart
    ("gradients": windows rise across chunks, many underflows) or every exponent the dtype has,
    subnormals included ("whole range")."""
    gen = torch.Generator().manual_seed(7)
    n, p = 96, 24
    if spread == "gradients":
        exponent = torch.randint(-80, 80, (n, p), generator=gen)
    else:
        info = torch.finfo(dtype)
        low, high = int(math.log2(info.smallest_normal * info.eps)), int(math.log2(info.max)) - 6
        exponent = torch.randint(low, high, (n, p), generator=gen)
    rows = ((torch.rand(n, p, generator=gen, dtype=torch.float64) + 0.5) * torch.exp2(exponent.double())).to(dtype)
    rows *= torch.where(torch.rand(n, p, generator=gen) < 0.5, -1, 1).to(dtype)
    rows[torch.rand(n, p, generator=gen) < 0.2] = 0
    return rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spread", ["gradients", "whole range"])
def test_the_streamed_sum_is_the_specification_for_every_order_and_chunking(dtype, spread):
    # Contributions arrive a chunk at a time and the window of each element rises as larger
    # ones come: the bins it leaves are dropped whole. The result must be the rational
    # specification above (truncation at the FINAL window, rounded once) and the same underflow
    # count, whatever the order and the cuts.
    rows = _spread_rows(dtype, spread)
    n, p = rows.shape
    expected, lost = _truncated_reference(rows)
    assert lost > 0  # the case where dropped bins must be counted is exercised
    for seed in range(3):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        acc = ExactGradSum(_model(p), n)
        for part in torch.tensor_split(rows[order], [5, 40, 41, 70]):
            acc.add(part)
        assert torch.equal(acc.total(), expected), seed
        assert acc.underflows == lost, seed


def _summed_in_pieces(rows: torch.Tensor) -> ExactGradSum:
    acc = ExactGradSum(_model(rows.shape[1]), rows.shape[0])
    for part in torch.split(rows, 35):
        acc.add(part)
    return acc


def test_blocks_wider_than_the_scratch_are_converted_in_pieces(monkeypatch):
    # 24 columns through a scratch of 7 (7 + 7 + 7 + 3), rows 35 at a time (32 + 3), each
    # piece's digits copied to float64 3 columns at a time (3 + 3 + 1): the specification
    # still, bit for bit and count for count; then written in pieces too.
    monkeypatch.setattr(exact_sum, "CHUNK_COLUMNS", 7)
    monkeypatch.setattr(exact_sum, "WIDE_COLUMNS", 3)
    rows = _spread_rows(torch.float32)
    expected, lost = _truncated_reference(rows)
    acc = _summed_in_pieces(rows)
    assert torch.equal(acc.total(), expected)
    assert acc.underflows == lost
    # Mutant: every piece added at column 0, its own offset forgotten.
    real = ExactGradSum._add
    with monkeypatch.context() as m:
        m.setattr(ExactGradSum, "_add", lambda self, part, start: real(self, part, 0))
        assert not torch.equal(_summed_in_pieces(rows).total(), expected)

    # Mutant: the digits' sums of the first 3 columns only, the copy's later pieces forgotten.
    def first_piece_only(self, digits):
        sums = torch.zeros(digits.shape[1], dtype=torch.int64)
        sums[:3] = digits[:, :3].to(torch.float64).sum(dim=0).to(torch.int64)
        return sums

    with monkeypatch.context() as m:
        m.setattr(exact_sum._Scratch, "column_sums", first_piece_only)
        assert not torch.equal(_summed_in_pieces(rows).total(), expected)

    # The gradient is rounded and written 5 elements at a time (5 x 4 + 4): the total divided
    # once, in float32, all the same.
    monkeypatch.setattr(exact_sum, "WRITE_COLUMNS", 5)
    written = expected.div(3.0).to(torch.float32)
    acc = _summed_in_pieces(rows)
    acc.write_grads(3.0)
    assert torch.equal(acc.params[0][1].grad, written)
    # Mutant: every piece of the gradient taken from the first columns' sums.
    real_value = ExactGradSum._value
    monkeypatch.setattr(
        ExactGradSum, "_value", lambda self, h, l, cols: real_value(self, h, l, slice(0, len(range(self.size)[cols])))
    )
    acc = _summed_in_pieces(rows)
    acc.write_grads(3.0)
    assert not torch.equal(acc.params[0][1].grad, written)


def test_a_window_taken_per_chunk_is_caught_by_the_specification(monkeypatch):
    # Mutant: each chunk truncated at its OWN largest contribution's window, as a streaming
    # sum that forgets the running window would. Orders then disagree with each other.
    from distshare.numerics import exact_sum

    real = exact_sum.ExactGradSum._raise_top

    def per_chunk(self, cols, top):
        self.top[cols] = top  # the window follows each chunk, never the running maximum
        real(self, cols, top)

    monkeypatch.setattr(exact_sum.ExactGradSum, "_raise_top", per_chunk)
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(64, 16, generator=gen, dtype=torch.float64) * torch.exp2(
        torch.randint(-60, 60, (64, 16), generator=gen).double()
    )
    totals = set()
    for seed in range(3):
        acc = ExactGradSum(_model(16), 64)
        for part in torch.tensor_split(rows[torch.randperm(64, generator=torch.Generator().manual_seed(seed))], 4):
            acc.add(part)
        totals.add(acc.total().numpy().tobytes())
    assert len(totals) > 1


def test_a_dropped_bin_left_uncounted_is_caught(monkeypatch):
    # Mutant: contributions truncated to 0 when the window rises are not counted.
    from distshare.numerics import exact_sum

    real = exact_sum.ExactGradSum._raise_top

    def uncounted(self, cols, top):
        lost = self.lost
        real(self, cols, top)
        self.lost = lost

    rows = torch.tensor([[1e-20], [1.0], [0.5]], dtype=torch.float64)  # 1e-20 then a larger one
    acc = ExactGradSum(_model(1), 3)
    acc.add(rows[:1])
    acc.add(rows[1:])
    acc.total()
    assert acc.underflows == 1
    monkeypatch.setattr(exact_sum.ExactGradSum, "_raise_top", uncounted)
    acc = ExactGradSum(_model(1), 3)
    acc.add(rows[:1])
    acc.add(rows[1:])
    acc.total()
    assert acc.underflows == 0


def _held_bytes(obj: object) -> int:
    """Bytes of every tensor an object holds in its attributes (lists, tuples and dicts opened)."""
    seen: set[int] = set()

    def walk(value: object) -> int:
        if isinstance(value, torch.Tensor):
            if value.untyped_storage().data_ptr() in seen:
                return 0
            seen.add(value.untyped_storage().data_ptr())
            return value.untyped_storage().nbytes()
        if isinstance(value, (list, tuple)):
            return sum(walk(v) for v in value)
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        if type(value).__module__.startswith("distshare"):  # the sum's own helpers (its scratch)
            return sum(walk(v) for v in vars(value).values())
        return 0

    # Not the model's own parameters, nor the grid's tables (one per digit width, shared by every sum).
    return sum(walk(v) for k, v in vars(obj).items() if k not in ("params", "grid"))


def _summed_bytes(n: int, p: int) -> int:
    acc = ExactGradSum(_model(p), n)
    for part in torch.randn(n, p).split(CHUNK):
        acc.add(part)
    acc.total()
    return _held_bytes(acc)


def test_memory_does_not_grow_with_the_number_of_samples():
    # The sum keeps 28 bytes a parameter and one chunk's scratch, for 32 samples or 4,096.
    p = 1000
    # Scratch: a chunk's two float32 digits, their float64 copy and non-zero flags; per column,
    # three uint8 counts and one float64 digit sum.
    assert _summed_bytes(32, p) == _summed_bytes(4096, p) == 28 * p + CHUNK * p * (2 * 4 + 8 + 1) + p * (3 + 8)


def test_a_sum_that_keeps_the_rows_is_caught(monkeypatch):
    # Mutant: the previous design, every contribution kept until the step's end.
    real = ExactGradSum.add

    def keeping(self, rows, start=0):
        self.__dict__.setdefault("rows", []).append(rows.clone())
        real(self, rows, start)

    monkeypatch.setattr(ExactGradSum, "add", keeping)
    assert _summed_bytes(4096, 1000) > _summed_bytes(32, 1000)


def test_exact_mode_hands_the_sum_one_chunk_at_a_time():
    # add_per_sample_grads never holds more than a chunk: every block it hands over has at
    # most CHUNK rows, and 100 samples arrive as 32 + 32 + 32 + 4 rows.
    cfg = _cfg("data.num_samples=100")
    from distshare.data import build_dataset
    from distshare.data.tensors import TensorTable

    ds, info = build_dataset(cfg.data)
    table = TensorTable.from_dataset(ds, info, torch.float32)
    model = build_model(cfg.model, info, seed=0)
    b = table.select(list(range(100)))
    blocks = []
    per_sample.add_per_sample_grads(
        model, {"inputs": b.inputs, "labels": b.labels}, sample_losses, lambda g, c: blocks.append((g.shape, c))
    )
    rows = [shape[0] for shape, column in blocks if column == 0]
    assert max(shape[0] for shape, _ in blocks) <= CHUNK
    assert rows == [CHUNK, CHUNK, CHUNK, 100 - 3 * CHUNK]


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_a_non_finite_contribution_is_refused_by_name(bad):
    acc = ExactGradSum(_model(3), 2)
    acc.add(torch.tensor([[0.0, 1.0, 2.0], [0.0, bad, 2.0]]))
    with pytest.raises(ExactOverflow, match=r"'w' \(element 1\) is not finite"):
        acc.total()


def test_a_sum_beyond_the_dtype_is_detected():
    rows = torch.tensor([[3e38, 1.0], [3e38, 1.0]], dtype=torch.float32)
    assert torch.isinf(rows.sum(0)[0])  # float32 addition overflows silently
    model = _model(2)
    acc = ExactGradSum(model, 2)
    acc.add(rows)
    with pytest.raises(ExactOverflow, match=r"'w' \(element 0\) is 6e\+38, beyond the range of float32"):
        acc.write_grads(1.0)


def test_a_total_beyond_float64_is_refused_not_written_as_inf():
    # Two float64 contributions of 1e308: the exact total, 2e308, is beyond float64 itself.
    # (The check before only caught a total that float64 held and the dtype did not: this
    # one's gradient was written as inf.)
    model = _model(2).double()
    rows = torch.tensor([[1e308, 1.0], [1e308, 1.0]], dtype=torch.float64)
    # Control: the previous check (an inf in the dtype where float64 was finite) finds nothing here.
    acc = ExactGradSum(model, 2)
    acc.add(rows)
    flat = acc.total()
    assert not (torch.isinf(flat.to(torch.float64)) & torch.isfinite(flat)).any() and torch.isinf(flat[0])
    acc = ExactGradSum(model, 2)
    acc.add(rows)
    with pytest.raises(ExactOverflow, match=r"'w' \(element 0\) is inf, beyond the range of float64"):
        acc.write_grads(1.0)
    assert model.w.grad is None


def _overflow_on_one_rank(world) -> str:
    acc = ExactGradSum(_model(2), 2, world.world_size)
    acc.add(torch.tensor([[1.0, math.inf if world.rank == 1 else 1.0]]))
    try:
        acc.total()
    except ExactOverflow as exc:
        return str(exc)
    return "no error"


def test_overflow_on_one_rank_stops_every_rank_with_the_same_message():
    messages = run_distributed(_overflow_on_one_rank, 2, timeout_s=30)
    assert messages[0] == messages[1] == "sync=exact: the gradient of 'w' (element 1) is not finite"


def _streamed_on_ranks(world, gather_limit: int, mutant: bool) -> tuple[bytes, int]:
    # Each of 3 ranks adds every third row, in two chunks: windows differ from rank to rank,
    # so the collective must move every rank's bins to the highest window before summing.
    exact_sum.GATHER_LIMIT = gather_limit  # in this rank's process only
    if mutant:  # windows moved without dropping the bins they leave

        def moved_only(top, bins, leads, new_top):
            top.copy_(torch.maximum(top, new_top))
            return 0

        exact_sum._align = moved_only
    rows = _spread_rows(torch.float32)
    acc = ExactGradSum(_model(rows.shape[1]), rows.shape[0], world.world_size)
    for part in torch.tensor_split(rows[world.rank :: world.world_size], 2):
        acc.add(part)
    return acc.total().numpy().tobytes(), acc.underflows


@pytest.mark.parametrize("mutant", [False, True], ids=["as built", "bins not dropped"])
@pytest.mark.parametrize("path", ["one all_gather", "all-reduce MAX then SUM"])
def test_both_collective_paths_sum_the_specification_across_ranks(path, mutant):
    expected, lost = _truncated_reference(_spread_rows(torch.float32))
    limit = exact_sum.GATHER_LIMIT if path == "one all_gather" else 0
    results = run_distributed(_streamed_on_ranks, 3, limit, mutant, timeout_s=60)
    assert len(set(results)) == 1  # every rank has the same total
    assert (results[0] == (expected.numpy().tobytes(), lost)) is not mutant


# ---------------------------------------------------------------- refusal


def test_layers_whose_result_depends_on_the_split_are_refused():
    with pytest.raises(UsageError, match=r"layer '1' is BatchNorm in training mode"):
        refuse_split_dependent(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    with pytest.raises(UsageError, match=r"layer '0' is dropout \(p=0.1\)"):
        refuse_split_dependent(nn.Sequential(nn.Dropout(0.1), nn.Linear(2, 2)))
    refuse_split_dependent(nn.Sequential(nn.Dropout(0.0), nn.BatchNorm1d(2).eval(), nn.GroupNorm(1, 2)))


def test_cli_refuses_batch_norm_in_exact_mode_with_one_line(capsys):
    code = main(["train", "--config", "configs/train/cnn.yaml", "--set", "model.norm=batch", "--sync", "exact"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "sync=exact" in err and "Traceback" not in err


# ---------------------------------------------------------------- commands and engines


def test_verify_in_exact_mode_equals_one_big_batch_bitwise(tmp_path, capsys):
    code = main(
        ["verify", "--sync", "exact", "--nproc", "3", "--set", "steps=4", "--json", "--no-progress"]
        + ["--out", str(tmp_path / "v")]
    )
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["sync"] == "exact"
    assert result["bitwise_equal_to_single_process"]
    assert result["single_process"]["step0_grads"]["bitwise_equal"]


def test_the_cnns_per_sample_gradients_by_conv_hooks_match_expanded_weights_and_its_batch_gradient():
    # Conv2d has a hooks rule (unfolded input x output gradient, one product per sample): the
    # shipped CNN now takes it. It must give expanded weights' per-sample gradients, depend on
    # no other sample of the batch, and sum to the batch gradient within rounding.
    from distshare.data import build_dataset
    from distshare.data.tensors import TensorTable

    cfg = load_config("cnn", [])
    ds, info = build_dataset(cfg.data)
    table = TensorTable.from_dataset(ds, info, torch.float32)
    model = build_model(cfg.model, info, seed=0)
    assert per_sample.choose_method(model) == "hooks"

    def grads(indices: list[int], method: str) -> torch.Tensor:
        b = table.select(indices)
        return per_sample_grads(model, {"inputs": b.inputs, "labels": b.labels}, sample_losses, method)[0]

    hooks = grads(list(range(40)), "hooks")
    assert torch.equal(hooks, grads(list(range(40)), "expanded"))
    assert torch.equal(grads(list(range(5, 9)), "hooks"), hooks[5:9])
    b = table.select(list(range(40)))
    model.zero_grad()
    sample_losses(model, {"inputs": b.inputs, "labels": b.labels}).sum().backward()
    batch = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert (hooks.sum(0) - batch).abs().max() <= 1e-6 * batch.abs().max()


def _grads_in_groups(
    group: int, name: str = "transformer", stale: bool = False
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Per-sample gradients (hooks) of a fresh distshare model whose blocks are cut every
    `group` columns; `stale`: the reused block buffer holds NaN when the run starts (and then
    the previous block's rows: what a block that is not wholly written hands over)."""
    from distshare.data import build_dataset
    from distshare.data.tensors import TensorTable

    cfg = load_config(name, [])
    ds, info = build_dataset(cfg.data)
    table = TensorTable.from_dataset(ds, info, torch.float32)
    model = build_model(cfg.model, info, seed=0)
    b = table.select(list(range(12)))
    per_sample.GROUP = group  # read when the model's layout is made: a fresh model's
    try:
        layout = per_sample._layout(model)
        if stale:
            layout._buffer = torch.full((CHUNK * max(size for _, size in layout.groups),), math.nan)
        rows = per_sample_grads(model, {"inputs": b.inputs, "labels": b.labels}, sample_losses, "hooks")[0]
        return rows, layout.groups
    finally:
        per_sample.GROUP = 1 << 18


def test_groups_cut_between_a_layers_weight_and_bias_give_the_same_gradients(monkeypatch):
    # Groups of about 1,000 parameters split the transformer's layers, weights from biases: each
    # group's block computes only its own parameters' products, and the whole is unchanged.
    whole, one = _grads_in_groups(1 << 18)
    cut, groups = _grads_in_groups(1000)
    assert len(one) == 1 and len(groups) > 5
    assert torch.equal(cut, whole)
    # Mutant: a rule that hands over every parameter of the call, whatever the group (every
    # parameter in "group None"): another group's parameter does not fit this block (a weight
    # of 1,000 elements or more is a group of its own, its block a view the bias cannot take).
    real = per_sample._rule
    every_group = SimpleNamespace(group_of=defaultdict(lambda: None))
    monkeypatch.setattr(
        per_sample, "_rule", lambda call, gy, group, layout, into=None: real(call, gy, None, every_group, into)
    )
    with pytest.raises(RuntimeError, match="is invalid for input of size"):
        _grads_in_groups(1000)


@pytest.mark.parametrize("name", ["transformer", "cnn"])
def test_a_parameter_alone_in_its_group_is_computed_in_its_block_unchanged(name, monkeypatch):
    # Groups of 16: every parameter of 16 elements or more is a group of its own, and its rule
    # (Linear, Embedding, LayerNorm, Conv2d, their biases) writes the block itself, which held
    # NaN before: the rows are those of one group, bit for bit, every element written.
    whole, _ = _grads_in_groups(1 << 18, name)
    real = per_sample._rule
    in_place = rules_written_in_place(monkeypatch)
    cut, groups = _grads_in_groups(16, name, stale=True)
    kinds = {"transformer": {"linear", "embedding", "layer_norm"}, "cnn": {"conv2d", "linear"}}[name]
    assert len(groups) > 5 and kinds <= set(in_place)
    assert torch.equal(cut, whole)

    # Mutant: a rule that computes in a tensor of its own yet hands over the block as written.
    def claims_in_place(call, gy, group, layout, into=None):
        ruled = real(call, gy, group, layout)
        return [(p, into if into is not None else g) for p, g in ruled]

    monkeypatch.setattr(per_sample, "_rule", claims_in_place)
    assert not torch.equal(_grads_in_groups(16, name, stale=True)[0], whole)


def test_a_conv_rule_without_the_padding_is_caught(monkeypatch):
    # Mutant: the unfold ignores the layer's padding; the per-sample gradients then cannot
    # match expanded weights (the shapes do not even agree).
    real = per_sample.F.unfold
    monkeypatch.setattr(per_sample.F, "unfold", lambda x, k, dilation, padding, stride: real(x, k, dilation, 0, stride))
    from distshare.data import build_dataset
    from distshare.data.tensors import TensorTable

    cfg = load_config("cnn", [])
    ds, info = build_dataset(cfg.data)
    table = TensorTable.from_dataset(ds, info, torch.float32)
    model = build_model(cfg.model, info, seed=0)
    b = table.select(list(range(8)))
    with pytest.raises(RuntimeError):
        per_sample_grads(model, {"inputs": b.inputs, "labels": b.labels}, sample_losses, "hooks")
