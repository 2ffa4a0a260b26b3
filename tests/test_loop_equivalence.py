"""Claim: `assert_loop_equivalent` runs the user's own training loop under every split W x k of
the same global batches, passes a correct loop, and fails each way users' loops break it.

The loops are in `tests/user_loops.py`, written as users write them, on transformers' GPT-2
from a tiny config: a plain DDP loop, one that shards its data with `DistributedSampler`,
one with accelerate. Each bug sits beside its correct version, which passes. The bound is
the spread measured by reordering the reference's batches; every split's numbers are
printed (`pytest -s`) as measured.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
from user_loops import (
    PAD_TO,
    classification_data,
    gpt2_accelerate_loop,
    gpt2_ddp_loop,
    gpt2_sharded_loop,
    gpt2_trainer_loop,
    label_tokens,
    mlp_exact_loop,
    sequences,
    summed_next_token_loss,
    tiny_token_lm,
)

from distshare.equivalence import UserTask, run_grid
from distshare.equivalence.loop import BOUND_FACTOR
from distshare.errors import UsageError
from distshare.testing import LoopResult, assert_accumulation_equivalent, assert_loop_equivalent

ONE_PROCESS = {"world_sizes": (1,), "accum_steps": (1, 2)}  # k > 1 without spawning ranks
# For the bugs, which miss by orders of magnitude: 2 steps, the bound from one reordering.
QUICK = {**ONE_PROCESS, "steps": 2, "reorderings": 1}


def _passes(loop, data, **grid) -> LoopResult:
    result = assert_loop_equivalent(loop, data, **grid)
    print(result.text())
    return result


def _fails(loop, data, *words: str, **grid) -> str:
    with pytest.raises(AssertionError) as info:
        assert_loop_equivalent(loop, data, **grid)
    message = str(info.value)
    print(message)
    assert "FAIL" in message
    for w in words:
        assert w in message
    return message


def _split(result: LoopResult, w: int, k: int):
    return next(s for s in result.splits if (s.world_size, s.accum_steps) == (w, k))


# ---------------------------------------------------------------------------------------
# The correct loop, and what "within the measured spread" measured.


@pytest.mark.slow
def test_a_correct_gpt2_ddp_loop_passes_every_split():
    result = _passes(gpt2_ddp_loop, sequences(32))
    print(f"grid W in (1, 2) x k in (1, 2, 4), 3 steps: {result.seconds:.1f} s")
    assert {(s.world_size, s.accum_steps) for s in result.splits} == {(w, k) for w in (1, 2) for k in (1, 2, 4)}
    # The rerun of the reference itself is bitwise: the loop is deterministic...
    assert _split(result, 1, 1).bitwise_equal
    # ...and the other splits really sum in other orders: not bitwise, yet within the bound.
    others = [s for s in result.splits if (s.world_size, s.accum_steps) != (1, 1)]
    assert all(not s.bitwise_equal and s.ratio <= 1 for s in others)
    assert all(s.accounting_ok and not s.early_sync for s in result.splits)
    assert all(sp["grad"] > 0 and sp["params"] > 0 for sp in result.spread)


@pytest.mark.slow
def test_in_float64_rounding_is_1e_16_and_the_2024_bug_is_orders_above_it():
    data = sequences(32)
    good = _passes(functools.partial(gpt2_ddp_loop, dtype="float64"), data, **ONE_PROCESS)
    assert max(sp["grad"] for sp in good.spread) < 1e-13
    assert _split(good, 1, 2).grad_norm_rel < 1e-13
    message = _fails(functools.partial(gpt2_ddp_loop, dtype="float64", bug="token_mean"), data, **ONE_PROCESS)
    assert "W=1 k=2" in message


# ---------------------------------------------------------------------------------------
# The bugs, each beside its correct version.


def test_the_per_micro_batch_token_mean_fails_with_variable_lengths_only():
    # The 2024 transformers accumulation bug: mean over the micro-batch's tokens, / k.
    token_mean = functools.partial(gpt2_ddp_loop, bug="token_mean")
    _fails(token_mean, sequences(32), "FAIL  W=1 k=2", **QUICK)
    # Control: with every sequence the same length, the token mean / k is the global mean.
    _passes(token_mean, sequences(32, variable=False), **ONE_PROCESS)


@pytest.mark.parametrize("bug", ["k_twice", "no_k"])
def test_dividing_by_k_twice_or_not_at_all_fails(bug):
    _fails(functools.partial(gpt2_ddp_loop, bug=bug), sequences(32, variable=False), "FAIL  W=1 k=2", **QUICK)


@pytest.mark.slow
def test_ddp_averaging_a_globally_normalized_loss_fails():
    # Divided by the global token count, then DDP averages over W: the gradient / W.
    bug = functools.partial(gpt2_ddp_loop, bug="ddp_average")
    message = _fails(bug, sequences(32), "W=2", world_sizes=(2,), accum_steps=(1,), steps=2, reorderings=1)
    assert "FAIL  W=2 k=1" in message


@pytest.mark.slow
def test_a_forward_outside_no_sync_with_a_sum_reduction_fails_by_its_states():
    sum_loop = functools.partial(gpt2_ddp_loop, reduce="sum")
    _passes(sum_loop, sequences(32), world_sizes=(2,), accum_steps=(2,))
    # Each micro-batch's backward now all-reduces the gradient accumulated so far: the
    # earlier micro-batches are summed W times.
    bug = functools.partial(gpt2_ddp_loop, reduce="sum", bug="forward_outside_no_sync")
    message = _fails(bug, sequences(32), "early sync", world_sizes=(2,), accum_steps=(2,), steps=2, reorderings=1)
    assert "no_sync" in message


@pytest.mark.slow
def test_a_forward_outside_no_sync_under_ddp_averaging_is_caught_by_the_early_sync_only():
    # Averaging is linear: syncing every micro-batch gives the same gradient up to rounding.
    bug = functools.partial(gpt2_ddp_loop, bug="forward_outside_no_sync")
    with pytest.raises(AssertionError) as info:
        assert_loop_equivalent(bug, sequences(32), world_sizes=(2,), accum_steps=(2,))
    print(info.value)
    assert "early sync: step 1" in str(info.value) and "no_sync" in str(info.value)
    # The numbers are within the bound: the early sync is the only evidence of the bug.
    split = info.value.result.splits[0]
    assert split.ratio <= 1 and split.accounting_ok and not split.problem


@pytest.mark.slow
def test_a_distributed_sampler_that_pads_fails_the_accounting():
    # 16 samples: W = 2 divides them, nothing padded.
    _passes(gpt2_sharded_loop, sequences(16), accum_steps=(1,), steps=2)
    # 17: DistributedSampler(drop_last=False) repeats a sample to give both ranks 9.
    message = _fails(gpt2_sharded_loop, sequences(17), "accounting: counted twice", accum_steps=(1,), steps=2)
    assert "FAIL  W=2 k=1" in message and "ok    W=1 k=1" in message


@pytest.mark.slow
def test_the_correct_loop_written_with_accelerate_passes_and_its_token_mean_fails():
    result = _passes(gpt2_accelerate_loop, sequences(32), accum_steps=(1, 2))
    assert all(s.ok for s in result.splits)
    bug = functools.partial(gpt2_accelerate_loop, bug="token_mean")
    _fails(bug, sequences(32), "FAIL  W=1 k=2", world_sizes=(1,), accum_steps=(1, 2))


@pytest.mark.slow
def test_transformers_trainer_as_the_loop_passes_and_a_per_rank_token_count_fails():
    # The Trainer shards the data itself (ctx.dataset), accumulates and normalizes by the
    # step's label tokens, counted across the ranks.
    _passes(gpt2_trainer_loop, sequences(32), accum_steps=(1, 2))
    # Counted on each rank alone, ranks with fewer tokens weigh each token more.
    bug = functools.partial(gpt2_trainer_loop, average_tokens_across_devices=False)
    _fails(bug, sequences(32), "FAIL  W=2 k=1", world_sizes=(2,), accum_steps=(1,), steps=2, reorderings=1)


# ---------------------------------------------------------------------------------------
# Every verdict can fail: faults injected into the splits with k > 1, never the reference.


@pytest.mark.parametrize(
    "mutant, words",
    [
        ("nan", "non-finite"),
        ("scale", "FAIL  W=1 k=2"),  # the loss 1e-4 too large
        ("skip_micro", "FAIL  W=1 k=2"),  # drawn (so counted) but never trained on
        ("exponent_bit", "FAIL  W=1 k=2"),
    ],
)
def test_each_mutant_flips_the_verdict(mutant, words):
    _fails(functools.partial(gpt2_ddp_loop, mutant=mutant), sequences(32), words, **QUICK)


@pytest.mark.slow
def test_exact_mode_is_bitwise_and_a_last_bit_fails_it():
    data = classification_data()
    result = _passes(mlp_exact_loop, data, world_sizes=(1, 2), accum_steps=(1, 2), exact=True)
    assert all(s.bitwise_equal for s in result.splits)
    _fails(functools.partial(mlp_exact_loop, mutant="last_bit"), data, **ONE_PROCESS, exact=True)
    # Control: the plain loop differs by rounding between splits, which exact mode refuses.
    _fails(functools.partial(mlp_exact_loop, exact=False), data, "FAIL  W=1 k=2", **ONE_PROCESS, exact=True)


def test_the_result_reports_every_split_as_measured():
    result = _passes(mlp_exact_loop, classification_data(), **ONE_PROCESS)
    assert result.bound_factor == BOUND_FACTOR and len(result.orders) == 3
    d = result.to_dict()
    assert d["ok"] is True and len(d["splits"]) == 2
    for s in d["splits"]:
        assert {"bitwise_equal", "grad_max_abs", "grad_norm_rel", "param_max_ulp", "ratio", "accounting"} <= set(s)
        assert all(math.isfinite(st["ratio"]) for st in s["steps"])


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"global_batch": 6, "accum_steps": (1, 4)}, "not divisible"),
        ({"steps": 20}, "lower steps"),
        ({"steps": 0}, "steps must be"),
    ],
)
def test_bad_input_is_one_line(kwargs, words):
    grid = {"world_sizes": (1,), **kwargs}
    with pytest.raises(UsageError) as info:
        assert_loop_equivalent(mlp_exact_loop, classification_data(), **grid)
    assert words in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------
# assert_accumulation_equivalent(count_items=...): distshare's step, the user's token count.


class SampleCountStep(UserTask):
    """Mutant: the step divides by the global *sample* count, the reference by the tokens."""

    def build(self, world, world_size, accum_steps, dtype):
        trainee = UserTask.build(dataclasses.replace(self, count_items=None), world, world_size, accum_steps, dtype)
        trainee.normalizer = UserTask.build(self, world, world_size, accum_steps, dtype).normalizer
        return trainee


@pytest.mark.slow
def test_count_items_divides_a_token_loss_by_the_global_token_count():
    result = assert_accumulation_equivalent(
        tiny_token_lm, summed_next_token_loss, sequences(32), world_sizes=(1, 2), accum_steps=(1, 2),
        count_items=label_tokens, uses_per_sample=PAD_TO,
    )  # fmt: skip
    print(result.text())
    assert result.ok and all(p.accounting_ok for p in result.partitions)


def test_a_step_dividing_by_the_sample_count_fails_the_token_count_reference():
    fields = {"lr": 0.5, "uses_per_sample": PAD_TO, "count_items": label_tokens}
    task = SampleCountStep(tiny_token_lm, summed_next_token_loss, sequences(32), 8, **fields)
    grid = run_grid(task, (1,), (1, 2), [None], steps=2, progress=False)
    print(grid.text())
    assert not grid.ok
    assert all(p.grad_excess > 1e3 for p in grid.partitions)
    # Control: the same task with the step and the reference agreeing passes the same grid.
    fair = run_grid(UserTask(tiny_token_lm, summed_next_token_loss, sequences(32), 8, **fields),
                    (1,), (1, 2), [None], steps=2, progress=False)  # fmt: skip
    assert fair.ok, fair.text()
