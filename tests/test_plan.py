"""The global batch plan as a specification: no sample padded, none repeated, and the same
global batches for every split of G = W x k x b.

This is what makes "4 ranks x 2 micro-steps == 1 process x 1 big batch" a checkable
statement: the split changes who computes which slice, never which samples a step sees.
Each property is checked by hypothesis and, where cheap, exhaustively on a small grid.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import make_plan
from hypothesis import assume, given
from hypothesis import strategies as st
from torch.utils.data import DistributedSampler

from distshare.data.plan import GlobalBatchPlan, _permutation
from distshare.errors import ConfigError


def epoch_steps(p: GlobalBatchPlan, epoch: int) -> range:
    return range(epoch * p.steps_per_epoch, (epoch + 1) * p.steps_per_epoch)


def used_in_epoch(p: GlobalBatchPlan, epoch: int) -> np.ndarray:
    """Every index any (rank, micro) slot takes during one epoch, in order."""
    w, k = p.plan.world_size, p.plan.accum_steps
    return np.concatenate([p.micro_batch(s, r, m) for s in epoch_steps(p, epoch) for r in range(w) for m in range(k)])


def check_epoch(p: GlobalBatchPlan, epoch: int) -> None:
    """(a) at most once, exactly steps x G with drop_last, all once without; (c) ranks partition."""
    n, g, w, k = p.num_samples, p.plan.global_batch, p.plan.world_size, p.plan.accum_steps
    used = used_in_epoch(p, epoch)
    assert len(np.unique(used)) == len(used), "a sample is used twice within an epoch"
    assert used.min() >= 0 and used.max() < n
    if p.drop_last:
        assert len(used) == p.steps_per_epoch * g == n - p.dropped_per_epoch
        assert p.dropped_per_epoch < g
    else:
        assert sorted(used.tolist()) == list(range(n)), "drop_last=False must use every sample"
    for step in epoch_steps(p, epoch):
        batch = p.global_batch(step)
        per_rank = [np.concatenate(p.rank_micro_batches(step, r)) for r in range(w)]
        assert np.array_equal(np.concatenate(per_rank), batch)  # union, in slot order
        sizes = [len(mb) for r in range(w) for mb in p.rank_micro_batches(step, r)]
        if len(batch) == g:
            assert sizes == [p.plan.micro_batch] * (w * k)
        else:  # (e) the last incomplete batch: as even as possible over the W x k slots
            assert not p.drop_last
            assert sum(sizes) == len(batch) and max(sizes) - min(sizes) <= 1


# --- (a) + (c) + (e): every sample at most once, ranks partition each batch --------------------


def test_small_grid_exhaustively():
    checked = refused = 0
    for n, w, k, b, drop_last in itertools.product(range(1, 41), (1, 2, 3, 4), (1, 2, 3), (1, 2, 3), (True, False)):
        g = w * k * b
        if drop_last and g > n:
            with pytest.raises(ConfigError):
                make_plan(n, w, k, b, drop_last=drop_last)
            refused += 1
            continue
        p = make_plan(n, w, k, b, seed=n, drop_last=drop_last)
        for epoch in (0, 1):
            check_epoch(p, epoch)
        checked += 1
    assert checked > 1500 and refused > 0  # the grid really covers both outcomes


@given(
    n=st.integers(1, 400),
    w=st.integers(1, 8),
    k=st.integers(1, 4),
    b=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
    epoch=st.integers(0, 5),
    drop_last=st.booleans(),
)
def test_every_sample_at_most_once_per_epoch(n, w, k, b, seed, epoch, drop_last):
    assume(not drop_last or w * k * b <= n)
    check_epoch(make_plan(n, w, k, b, seed=seed, drop_last=drop_last), epoch)


def test_drop_last_uses_exactly_the_complete_batches():
    p = make_plan(100, w=2, k=2, b=4)  # G = 16: 6 steps, 4 samples dropped per epoch
    assert (p.steps_per_epoch, p.dropped_per_epoch) == (6, 4)
    used = used_in_epoch(p, 0)
    assert len(used) == 96 == len(set(used.tolist()))
    assert p.global_batch(6).tolist() != p.global_batch(0).tolist()  # step 6 opens epoch 1


def test_incomplete_last_batch_is_spread_over_the_slots():
    p = make_plan(50, w=2, k=2, b=4, drop_last=False)  # G = 16: 3 full steps, then 2 samples
    assert p.steps_per_epoch == 4
    assert [len(p.micro_batch(3, r, m)) for r in range(2) for m in range(2)] == [1, 1, 0, 0]
    assert sorted(used_in_epoch(p, 0).tolist()) == list(range(50))


# --- (b) the same global batches for every W and k ---------------------------------------------

SPLITS_OF_24 = [(w, k) for w in (1, 2, 3, 4) for k in (1, 2, 3) if 24 % (w * k) == 0]


@pytest.mark.parametrize("drop_last", [True, False])
def test_global_batches_do_not_depend_on_w_and_k(drop_last):
    n = 100  # G = 24 does not divide it: the epoch boundary and the tail are exercised too
    plans = {(w, k): make_plan(n, w, k, 24 // (w * k), seed=7, drop_last=drop_last) for w, k in SPLITS_OF_24}
    assert len(plans) == 11
    reference = plans[(1, 1)]
    for (w, k), p in plans.items():
        assert p.steps_per_epoch == reference.steps_per_epoch
        for step in range(3 * p.steps_per_epoch):
            expected = reference.global_batch(step)
            assert np.array_equal(p.global_batch(step), expected), (w, k, step)
            slots = [p.micro_batch(step, r, m) for r in range(w) for m in range(k)]
            assert np.array_equal(np.concatenate(slots), expected), (w, k, step)


@given(
    factors=st.lists(st.integers(1, 4), min_size=3, max_size=3),
    other=st.lists(st.integers(1, 4), min_size=3, max_size=3),
    extra=st.integers(0, 60),
    seed=st.integers(0, 1000),
    drop_last=st.booleans(),
)
def test_any_two_splits_of_one_g_see_the_same_batches(factors, other, extra, seed, drop_last):
    g = int(np.prod(factors))
    w2, k2 = other[0], other[1]
    assume(g % (w2 * k2) == 0)
    n = g + extra
    a = make_plan(n, *factors, seed=seed, drop_last=drop_last)
    b = make_plan(n, w2, k2, g // (w2 * k2), seed=seed, drop_last=drop_last)
    for step in range(2 * a.steps_per_epoch + 1):
        assert np.array_equal(a.global_batch(step), b.global_batch(step))
        assert np.array_equal(np.concatenate(a.slots(step)), np.concatenate(b.slots(step)))


@given(n=st.integers(1, 200), w=st.integers(1, 4), k=st.integers(1, 3), b=st.integers(1, 6), step=st.integers(0, 50))
def test_ranks_partition_the_global_batch(n, w, k, b, step):
    p = make_plan(n, w, k, b, drop_last=False)
    batch = p.global_batch(step)
    per_rank = [set(np.concatenate(p.rank_micro_batches(step, r)).tolist()) for r in range(w)]
    for r1, r2 in itertools.combinations(range(w), 2):
        assert not per_rank[r1] & per_rank[r2], "two ranks share a sample"
    assert set().union(*per_rank) == set(batch.tolist())
    assert sum(len(s) for s in per_rank) == len(batch)


# --- (d) a pure function of (seed, epoch, step, rank, micro) -----------------------------------


def test_same_inputs_give_the_same_indices_even_recomputed():
    a = make_plan(97, w=2, k=3, b=4, seed=5)
    first = [[mb.copy() for r in range(2) for mb in a.rank_micro_batches(s, r)] for s in range(10)]
    _permutation.cache_clear()  # nothing remembered: the indices are recomputed from the inputs
    b = make_plan(97, w=2, k=3, b=4, seed=5)
    again = [[mb for r in range(2) for mb in b.rank_micro_batches(s, r)] for s in range(10)]
    assert all(np.array_equal(x, y) for xs, ys in zip(first, again, strict=True) for x, y in zip(xs, ys, strict=True))


def test_different_seed_gives_a_different_order():
    a, b = make_plan(100, 1, 1, 10, seed=0), make_plan(100, 1, 1, 10, seed=1)
    assert not np.array_equal(a.epoch_order(0), b.epoch_order(0))
    assert sorted(a.epoch_order(0).tolist()) == sorted(b.epoch_order(0).tolist()) == list(range(100))


def test_different_epochs_give_different_orders():
    p = make_plan(100, 2, 2, 5)
    orders = [tuple(p.epoch_order(e).tolist()) for e in range(5)]
    assert len(set(orders)) == 5
    assert not np.array_equal(p.global_batch(0), p.global_batch(p.steps_per_epoch))


def test_epoch_order_is_read_only():
    with pytest.raises(ValueError):
        make_plan(10, 1, 1, 2).epoch_order(0)[0] = 3


# --- (f) and the edges of the interface ---------------------------------------------------------


def test_global_batch_larger_than_the_data_set_is_refused_with_drop_last():
    with pytest.raises(ConfigError) as info:
        make_plan(30, w=2, k=2, b=8)  # G = 32 > 30: no complete global batch
    assert info.value.field == "plan.global_batch"
    p = make_plan(30, w=2, k=2, b=8, drop_last=False)  # without drop_last: one short step
    assert p.steps_per_epoch == 1 and len(p.global_batch(0)) == 30


@pytest.mark.parametrize(
    ("call", "args"),
    [("micro_batch", (0, 2, 0)), ("micro_batch", (0, -1, 0)), ("micro_batch", (0, 0, 2)), ("global_batch", (-1,))],
)
def test_out_of_range_positions_are_refused(call, args):
    with pytest.raises(ValueError):
        getattr(make_plan(40, w=2, k=2, b=2), call)(*args)


# --- (g) why the plan exists: DistributedSampler pads with duplicates ---------------------------


@pytest.mark.parametrize(("n", "w"), [(10, 3), (7, 4), (101, 2)])
def test_distributed_sampler_duplicates_where_the_plan_does_not(n, w):
    # torch's sampler evens out ranks by repeating samples: with n not divisible by W, some
    # sample is seen twice in one epoch, so W ranks no longer compute the one-process gradient.
    assert n % w
    seen = [i for r in range(w) for i in DistributedSampler(range(n), num_replicas=w, rank=r, shuffle=False)]
    assert len(seen) > n and len(set(seen)) == n  # padded: duplicates across ranks, nothing lost

    p = make_plan(n, w, k=1, b=1, drop_last=False)  # the same ranks, one sample per rank and step
    used = used_in_epoch(p, 0)
    assert len(used) == n and len(set(used.tolist())) == n  # every sample once, none twice
