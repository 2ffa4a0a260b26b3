"""Claim: each way replicas silently part is caught at the next check, and the report names
the tensor, the rank (and for a flipped bit, the element); and runs without a fault never
raise a false alarm.

All faults share one 3-rank world (one start-up) with the fault-free runs, which go first: with
3 ranks a strict majority exists, so the faulty rank is named alone.
"""

from __future__ import annotations

import pytest

from distshare.distributed.spawn import run_distributed
from distshare.testing.faults import BEFORE_FIRST_STEP, FAULTS, clean_checks, run_all_faults
from distshare.testing.selftest import replica_rows_of

WORLD = 3


pytestmark = [pytest.mark.faults, pytest.mark.slow]  # every test here injects a fault on spawned ranks


def _clean_then_every_fault(world):
    """The fault-free runs first (on fresh ranks), then every fault, in the one world."""
    return clean_checks(world, steps=70), run_all_faults(world)


@pytest.fixture(scope="module")
def three_ranks():
    """Rank by rank, (the clean runs, every fault's outcome): one 3-rank world for the module."""
    return run_distributed(_clean_then_every_fault, WORLD, timeout_s=60, deadline_s=360)


@pytest.fixture(scope="module")
def outcomes(three_ranks):
    per_rank = [faults for _, faults in three_ranks]
    return {o.fault: o for o in per_rank[0]}, per_rank


def test_every_rank_reaches_the_same_verdict(outcomes):
    _, per_rank = outcomes
    for rank_outcomes in per_rank[1:]:
        for a, b in zip(per_rank[0], rank_outcomes, strict=True):
            assert a.detected_at == b.detected_at
            assert (a.report and a.report.to_dict()) == (b.report and b.report.to_dict())


def test_the_selftests_rows_pass_every_clean_run_and_catch_every_fault(three_ranks):
    # `distshare selftest`'s replicas group, built from this module's world: the suite checks it here.
    clean, faults = three_ranks[0]
    rows = replica_rows_of(clean, faults)
    assert len(rows) == len(clean) + len(FAULTS) and sum(r.clean for r in rows) == len(clean)
    assert all(r.caught for r in rows), [r for r in rows if not r.caught]


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_fault_is_detected_at_the_next_check_and_localized(outcomes, name):
    o = outcomes[0][name]
    assert o.report is not None, f"{name}: never detected in {o.checks} checks"
    # Checked every step, and once before the first: the very next check. A rank started from
    # another seed differs before any update; unsynced buffers only once a forward updated them.
    assert o.detected_at == (BEFORE_FIRST_STEP if name == "different_seed" else o.injected_at + 1)
    assert o.report.diagnosis is not None and o.report.diagnosis.cause == o.expected_cause, o.report.summary()
    assert o.expected_tensor in o.report.differing, o.report.summary()
    if o.faulty_rank is None:  # every rank's buffers follow its own data: no majority, all named
        assert o.report.differing[o.expected_tensor] == list(range(WORLD))
        assert all(name.startswith("buffer/") for name in o.report.differing)
        assert not o.report.majority[o.expected_tensor]
        return
    # Majority of 3: the faulty rank, alone, for every differing tensor.
    assert set(o.report.odd_ranks) == {o.faulty_rank}, o.report.summary()
    # Element-wise localization (of at most 16 tensors per check, in name order): every
    # localized tensor is the faulty rank's, compared with a rank of the majority.
    assert 0 < len(o.report.elements) == min(16, len(o.report.differing))
    for diffs in o.report.elements.values():
        assert [d.rank for d in diffs] == [o.faulty_rank]
        assert diffs[0].reference_rank != o.faulty_rank and diffs[0].differing >= 1
    assert o.expected_tensor in o.report.summary(limit=len(o.report.differing))
    assert f"on rank {o.faulty_rank} [rank {o.faulty_rank}: " in o.report.summary()


def test_bit_flip_is_localized_to_the_element(outcomes):
    o = outcomes[0]["bit_flip"]
    (d,) = o.report.elements[o.expected_tensor]
    assert d.differing == 1 and d.first_index == o.expected_index
    assert d.max_ulp and d.max_ulp > 0 and d.max_abs_diff > 0
    # Only the flipped parameter differs: the gradient sum and hence Adam's state stay shared.
    assert list(o.report.differing) == [o.expected_tensor]
    assert f"rank {o.faulty_rank}: 1 of" in o.report.summary()


def test_optimizer_drift_is_localized_to_the_element(outcomes):
    o = outcomes[0]["optimizer_drift"]
    (d,) = o.report.elements[o.expected_tensor]
    assert d.differing == 1 and d.first_index == o.expected_index and d.max_ulp > 0


def test_clean_runs_raise_no_false_alarm(three_ranks):
    runs = three_ranks[0][0]
    assert sum(checks for _, checks, _ in runs) >= 200
    for label, _, failure in runs:
        assert failure is None, f"{label}: {failure.summary()}"
