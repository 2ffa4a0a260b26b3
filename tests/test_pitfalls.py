"""Claim: each known way of breaking "accumulation == one big batch" is caught by a check that
does not know it is there (the grid, the accounting, an all-reduce count), while its
correct version passes the same check.

The DDP pitfalls run real DistributedDataParallel on 2 spawned gloo ranks.
"""

from __future__ import annotations

import functools
import json

import pytest

from distshare.equivalence import pitfalls
from distshare.testing.selftest import pitfall_rows_of


@pytest.fixture(scope="module")
def ddp():
    return {p.number: p for p in pitfalls.ddp_pitfalls(timeout_s=60)}


@pytest.fixture(scope="module")
def ran():
    """Each single-process pitfall run at most once in the module, when a test first asks for it."""
    return functools.cache(lambda fn: fn())


def _check(p: pitfalls.Pitfall, wrong: str | None, fixed: str | None, key: str = "grad_excess_over_bound") -> None:
    """The verdict, and the numbers it stands on: the pitfall's gradient is further from the
    big batch's than rounding allows (excess over the bound > 1), its fixed version's is not."""
    assert p.detected, p.discrepancy
    assert p.detected_by in ("grid", "accounting", "all-reduce count")
    if wrong is not None and fixed is not None:
        excess, fixed_excess = p.measured[wrong][key], p.measured[fixed][key]
        assert excess > 1 >= fixed_excess, (p.number, wrong, excess, fixed, fixed_excess)


@pytest.mark.slow
def test_1_token_normalization_is_caught_only_with_variable_lengths(ran):
    p = ran(pitfalls.token_normalization)
    _check(p, "wrong", "correct")
    m = p.measured
    assert m["wrong"]["grad_excess_over_bound"] > 1e6
    assert m["correct"]["grad_excess_over_bound"] <= 1
    # The same bug is invisible on fixed-length sentences: why it went unnoticed.
    assert m["wrong_on_fixed_lengths"]["grad_excess_over_bound"] <= 1
    assert p.distshare_avoids


@pytest.mark.slow
def test_2_dividing_by_k_wrongly_scales_the_gradient_by_k(ran):
    p = ran(pitfalls.accumulation_scale)
    _check(p, "forgot", "correct")
    _check(p, "twice", "correct")
    assert p.measured["k4"]["forgot"] == pytest.approx(3.0, rel=1e-9)  # k g vs g: off by k - 1
    assert p.measured["k4"]["twice"] == pytest.approx(0.75, rel=1e-9)  # g / k vs g: off by 1 - 1/k


def test_3_distributed_sampler_duplicates_are_caught_by_the_accounting(ran):
    p = ran(pitfalls.distributed_sampler)
    _check(p, None, None)  # counted, not measured against a bound
    assert p.detected_by == "accounting"
    assert p.measured["padded"]["duplicated"] == 2  # 42 samples on 4 ranks: padded to 44
    assert p.measured["drop_last"]["missing"] == 2
    assert p.measured["distshare_plan"]["ok"]


def test_4_batchnorm_depends_on_the_split_and_groupnorm_does_not(ran):
    p = ran(pitfalls.batchnorm)
    _check(p, "batchnorm", "groupnorm")
    assert p.measured["batchnorm"]["grad_excess_over_bound"] > 1e6
    assert p.measured["groupnorm"]["grad_excess_over_bound"] <= 1
    assert not p.distshare_avoids


@pytest.mark.slow
def test_5_dropout_masks_depend_on_the_split_unless_keyed_to_the_sample(ran):
    p = ran(pitfalls.dropout)
    _check(p, "torch_dropout_two_ranks", "keyed_masks")
    # One CPU process draws masks in order from one stream: k micro-batches get the big
    # batch's masks. Two ranks seeded alike do not.
    assert p.measured["torch_dropout_one_rank"]["grad_excess_over_bound"] <= 1
    assert p.measured["torch_dropout_two_ranks"]["grad_excess_over_bound"] > 1e6
    assert p.measured["torch_dropout_two_ranks"]["param_norm_rel_diff"] > 1e-6
    assert p.measured["keyed_masks"]["grad_excess_over_bound"] <= 1


def test_6_forward_outside_no_sync_all_reduces_every_micro_batch(ddp):
    p = ddp[6]
    _check(p, "outside_no_sync_sum", "inside_no_sync", "excess_over_bound")
    m = p.measured
    assert m["outside_no_sync_sum"]["allreduces"] == 4 * m["inside_no_sync"]["allreduces"]
    assert m["inside_no_sync"]["excess_over_bound"] <= 1
    assert m["outside_no_sync_sum"]["excess_over_bound"] > 1e6
    # Under DDP's default average the gradient survives; only the count shows the waste.
    assert m["outside_no_sync_average"]["excess_over_bound"] <= 1


def test_7_ddp_average_divides_a_globally_normalized_loss_by_w_again(ddp):
    p = ddp[7]
    _check(p, "ddp_average", "sum_hook", "excess_over_bound")
    assert p.measured["ddp_average"]["norm_ratio"] == pytest.approx(0.5, rel=1e-9)
    assert p.measured["sum_hook"]["excess_over_bound"] <= 1


def test_8_join_divides_by_the_initial_world_size(ddp):
    p = ddp[8]
    _check(p, "divide_by_initial_world_size", "divide_by_active_ranks", "excess_over_bound")
    assert p.measured["divide_by_initial_world_size"]["norm_ratio"] == pytest.approx(0.5, rel=1e-9)
    assert p.measured["divide_by_active_ranks"]["excess_over_bound"] <= 1


def test_every_pitfall_has_a_record_that_reads_back(ddp, ran):
    record = ran(pitfalls.distributed_sampler).to_dict()
    assert set(record) >= {"name", "explanation", "discrepancy", "detected_by", "detected", "distshare_avoids"}
    again = json.loads(json.dumps(record))  # plain data: what result.json holds
    assert again["measured"]["padded"]["duplicated"] == 2 and again["detected"] is True
    assert sorted(ddp) == [6, 7, 8]


@pytest.mark.slow
def test_the_selftests_rows_catch_every_pitfall(ran, ddp):
    # `distshare selftest`'s pitfalls group, built from this module's runs: the suite checks it here.
    rows = pitfall_rows_of([ran(fn) for fn in pitfalls.PITFALLS] + [ddp[n] for n in sorted(ddp)])
    assert len(rows) == len(pitfalls.PITFALLS) + 3
    assert all(r.caught for r in rows), [r for r in rows if not r.caught]
