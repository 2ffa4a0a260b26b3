"""Claim: in every step each sample of the global batch contributes to the gradient exactly
once, across ranks and micro-steps; torch's DistributedSampler does not guarantee that.

The sampler is torch's real `DistributedSampler`, run once per rank; the accounting is fed
what it yields.
"""

from __future__ import annotations

import pytest
from conftest import make_plan
from hypothesis import given, settings
from hypothesis import strategies as st

from distshare.data.accounting import account, account_batches, account_epoch, distributed_sampler_indices
from distshare.data.plan import GlobalBatchPlan


def _consumed(plan: GlobalBatchPlan, steps: int) -> list:
    w = plan.plan.world_size
    return [[[m.tolist() for m in plan.rank_micro_batches(s, r)] for s in range(steps)] for r in range(w)]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.integers(0, 40), st.booleans())
def test_the_plan_counts_every_sample_exactly_once(w, k, b, extra, drop_last):
    g = w * k * b
    plan = make_plan(g + extra, w, k, b, drop_last=drop_last)
    steps = plan.steps_per_epoch
    acc = account(plan, _consumed(plan, steps))
    assert acc.ok, acc.summary()
    for step in range(steps):
        assert set(acc.count_histogram[step]) == {1}
    assert acc.samples == sum(len(plan.global_batch(s)) for s in range(steps))


def test_a_sample_used_twice_or_never_fails():
    plan = make_plan(64, 2, 2, 4)
    consumed = _consumed(plan, 2)
    consumed[1][1][0] = consumed[0][1][0]  # rank 1 re-uses rank 0's first micro-batch at step 1
    acc = account(plan, consumed)
    assert not acc.ok
    assert 1 in acc.duplicated and 1 in acc.missing and 1 in acc.shared_between_ranks
    assert acc.count_histogram[1] == {0: 4, 1: 8, 2: 4}
    assert 0 not in acc.duplicated and acc.count_histogram[0] == {1: 16}


@pytest.mark.parametrize("n, w", [(42, 4), (10, 3), (33, 2)])
def test_distributed_sampler_pads_with_duplicates(n, w):
    per_rank = distributed_sampler_indices(n, w, drop_last=False)
    assert len({len(r) for r in per_rank}) == 1  # every rank the same count: that is why it pads
    acc = account_epoch(n, per_rank)
    pad = -n % w
    assert not acc.ok
    assert sum(len(v) for v in acc.duplicated.values()) == pad
    assert acc.count_histogram[0] == {1: n - pad, 2: pad}


@pytest.mark.parametrize("n, w", [(42, 4), (10, 3)])
def test_distributed_sampler_drop_last_leaves_samples_out(n, w):
    acc = account_epoch(n, distributed_sampler_indices(n, w, drop_last=True))
    assert not acc.ok
    assert sum(len(v) for v in acc.missing.values()) == n % w
    assert acc.count_histogram[0] == {0: n % w, 1: n - n % w}


def test_distributed_sampler_is_fine_when_the_data_divides():
    acc = account_epoch(40, distributed_sampler_indices(40, 4, drop_last=False))
    assert acc.ok, acc.summary()


def test_accounting_reads_back_as_plain_data():
    acc = account_batches([[0, 1, 2]], [[[[0, 1]]], [[[2, 2]]]])
    d = acc.to_dict()
    assert d["ok"] is False and d["duplicated"] == {0: [2]}
    assert "counted twice" in acc.summary()
