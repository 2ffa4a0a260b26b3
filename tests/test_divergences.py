"""Claim: every publicly reported cause of silent divergence reproduced in
`distshare.testing.divergences` is caught at the check where it first shows, named by the
right kinds of tensors and ranks, and diagnosed as its cause; and its fixed code never raises
a false alarm.

Two worlds, each running every reproduction bug and fixed (one start-up each): 3 ranks, where
a strict majority names the one misbehaving rank alone, and 2 ranks, where there is no
majority and both ranks are named. The 2-rank world also runs them all again under
`distshare.watch` (checks from optimizer step hooks instead of explicit calls).

The diagnosis tests (`-k diagnosis`) are the specification of `report.diagnosis`: a cause per
reproduction, and with 3 ranks the culprit rank where one rank's code misbehaved.
"""

from __future__ import annotations

import pytest

from distshare.distributed.spawn import run_distributed
from distshare.testing.divergences import BASELINE, REPRODUCTIONS, STEPS, run_all
from distshare.testing.selftest import diagnosis_rows_of

pytestmark = [pytest.mark.faults, pytest.mark.slow]  # every test here spawns ranks that diverge on purpose

KINDS = ("param", "grad", "buffer", "optim")  # the state every check compares (extra state aside)
NAMES = sorted(REPRODUCTIONS)


def _both_checkers(world):
    """Every reproduction with explicit checks, then under distshare.watch."""
    return run_all(world), run_all(world, checker="watch")


@pytest.fixture(scope="module")
def three_ranks():
    return run_distributed(run_all, 3, timeout_s=60, deadline_s=300)


@pytest.fixture(scope="module")
def two_ranks_both_checkers():
    return run_distributed(_both_checkers, 2, timeout_s=60, deadline_s=300)


@pytest.fixture(scope="module")
def two_ranks(two_ranks_both_checkers):
    return [compared for compared, _ in two_ranks_both_checkers]


@pytest.fixture(scope="module")
def watched(two_ranks_both_checkers):
    """Rank by rank, the outcomes of the 2-rank world's runs under distshare.watch."""
    return [watched for _, watched in two_ranks_both_checkers]


@pytest.fixture(params=[3, 2], ids=["3-ranks", "2-ranks"])
def per_rank(request):
    """Every rank's outcomes, by rank; the world size is `len(per_rank)`."""
    return request.getfixturevalue("three_ranks" if request.param == 3 else "two_ranks")


def _outcome(per_rank, name, fixed, rank=0):
    (o,) = [o for o in per_rank[rank] if o.name == name and o.fixed == fixed]
    return o


def test_every_reproduction_cites_its_reports():
    for repro in REPRODUCTIONS.values():
        assert repro.fn.__name__ == repro.name and repro.fn.__doc__
        for report in repro.reports:
            assert report in repro.fn.__doc__, f"{repro.name}: {report} is not cited in its docstring"


def test_the_selftests_rows_name_every_cause_and_pass_every_fix(three_ranks):
    # `distshare selftest`'s diagnosis group (its 3-rank part; the HSDP part is checked in
    # tests/test_hsdp_replicas.py), built from this module's world: the suite checks it here.
    rows = diagnosis_rows_of(three_ranks[0])
    assert {r.verdict for r in rows} == {f"diagnosis ({name})" for name in REPRODUCTIONS}
    assert sorted(r.clean for r in rows) == [False] * len(REPRODUCTIONS) + [True] * len(REPRODUCTIONS)
    assert all(r.caught for r in rows), [r for r in rows if not r.caught]


def test_every_rank_reaches_the_same_report(per_rank):
    for rank_outcomes in per_rank[1:]:
        for a, b in zip(per_rank[0], rank_outcomes, strict=True):
            seen = [(o.name, o.fixed, o.detected_at, o.checks, o.raised, o.raised_at) for o in (a, b)]
            assert seen[0] == seen[1]
            assert (a.report and a.report.to_dict()) == (b.report and b.report.to_dict()), a.name


@pytest.mark.parametrize("name", NAMES)
def test_bug_is_detected_at_the_first_check_it_shows(per_rank, name):
    repro, o = REPRODUCTIONS[name], _outcome(per_rank, name, fixed=False)
    assert o.report is not None, f"{name}: no check failed in {o.checks}"
    assert o.detected_at == repro.detect_at, o.report.summary()
    found = {tensor.split("/")[0] for tensor in o.report.differing} & set(KINDS)
    assert found == set(repro.kinds), o.report.summary()
    if repro.stops_at is None:  # the loop ran to the end, checked after every step
        assert o.raised is None and o.checks == STEPS + 1
    else:  # DDP itself ended it, at a later forward: the divergence came first, silently
        assert o.raised_at == repro.stops_at and "Expected to have finished reduction" in o.raised
        assert o.checks == repro.stops_at + 1 and o.detected_at < o.raised_at


@pytest.mark.parametrize("name", NAMES)
def test_bug_names_the_misbehaving_ranks(per_rank, name):
    o = _outcome(per_rank, name, fixed=False)
    world_size = len(per_rank)
    if world_size == 3 and o.culprit is not None:  # a strict majority: the one rank alone
        assert o.report.odd_ranks == [o.culprit], o.report.summary()
        assert all(o.report.majority.values())
    else:  # every rank its own way (3 ranks), or no majority (2 ranks): every rank named
        assert o.report.odd_ranks == list(range(world_size)), o.report.summary()
        assert not any(o.report.majority.values())


@pytest.mark.parametrize("name", NAMES)
def test_fixed_code_raises_no_false_alarm(per_rank, name):
    o = _outcome(per_rank, name, fixed=True)
    assert o.report is None, o.report.summary()
    assert o.detected_at is None and o.raised is None
    assert o.checks == STEPS + 1  # the baseline and one check after every step, all in sync


def test_what_the_bugs_leave_in_sync(three_ranks):
    """The evidence that tells causes apart: what a bug does *not* touch."""
    by_name = {o.name: o for o in three_ranks[0] if not o.fixed}
    # Initial weights apart, gradients all-reduced: at the baseline only parameters differ.
    assert by_name["init_sync_false"].detected_at == BASELINE
    # Only the replaced parameter trains on local gradients under find_unused_parameters=True.
    assert sorted(by_name["param_replaced_find_unused"].report.differing) == [
        "grad/2.weight",
        "optim/2.weight/momentum_buffer",
        "param/2.weight",
    ]
    # The unfrozen backbone drifts, the head stays in sync.
    assert all(".0." in f".{t.split('/')[1]}" for t in by_name["unfrozen_after_wrap"].report.differing)
    # A skipped step: the step counts differ, the (all-reduced) gradients do not.
    assert any(t.endswith("/step") for t in by_name["step_skipped_one_rank"].report.differing)
    # A flipped bit: one element of one tensor of one rank.
    (diff,) = by_name["bit_flip"].report.elements["param/0.weight"]
    assert list(by_name["bit_flip"].report.differing) == ["param/0.weight"]
    assert diff.differing == 1 and diff.first_index == [3, 1] and diff.rank == 2


def test_watch_sees_every_rank_alike_and_every_bug(watched):
    for rank_outcomes in watched[1:]:
        for a, b in zip(watched[0], rank_outcomes, strict=True):
            assert (a.name, a.fixed, a.detected_at, a.checks) == (b.name, b.fixed, b.detected_at, b.checks)
            assert (a.report and a.report.to_dict()) == (b.report and b.report.to_dict()), a.name
    ran = {(o.name, o.fixed) for o in watched[0]}
    for repro in REPRODUCTIONS.values():  # a bug that skips optimizer.step() on one rank cannot run under watch
        assert ran >= {(repro.name, True)} | ({(repro.name, False)} if repro.watch_safe else set())


@pytest.mark.parametrize("name", NAMES)
def test_watch_detects_the_bug_and_not_the_fix(watched, name):
    repro = REPRODUCTIONS[name]
    if repro.watch_safe:
        o = _outcome(watched, name, fixed=False)
        expected = repro.detect_at if repro.watch_detect_at is None else repro.watch_detect_at
        assert o.report is not None and o.detected_at == expected, o.report and o.report.summary()
        assert o.raised_at == repro.stops_at
    o = _outcome(watched, name, fixed=True)
    assert o.report is None and o.raised is None, o.report and o.report.summary()
    assert o.checks >= STEPS  # a baseline, and one check per step() taken (a step all ranks skip has none)


@pytest.mark.parametrize("name", NAMES)
def test_diagnosis_names_the_cause(per_rank, name):
    repro, o = REPRODUCTIONS[name], _outcome(per_rank, name, fixed=False)
    diagnosis = o.report.diagnosis
    assert diagnosis is not None, o.report.summary()
    assert diagnosis.cause == repro.cause, f"{name}: {diagnosis.cause} ({diagnosis.explanation})"


@pytest.mark.parametrize("name", NAMES)
def test_diagnosis_names_the_culprit_with_a_majority(three_ranks, name):
    o = _outcome(three_ranks, name, fixed=False)
    assert o.report.diagnosis.culprit == o.culprit, f"{name}: {o.report.diagnosis.explanation}"


@pytest.mark.parametrize("name", [n for n in NAMES if REPRODUCTIONS[n].watch_safe])
def test_diagnosis_names_the_cause_under_watch(watched, name):
    o = _outcome(watched, name, fixed=False)
    assert o.report.diagnosis.cause == REPRODUCTIONS[name].cause, o.report.diagnosis.explanation


# What the DDP wrapper shows about each way gradients go unreduced: the message says which.
WRAPPER_NOTE = {
    "module_bypass": "never_forward",
    "gpt2_module_bypass": "never_forward",
    "dtype_after_wrap": "dtype",
    "param_replaced": "replaced",
    "param_replaced_find_unused": "replaced",
    "unfrozen_after_wrap": "joined",
    "unused_param": "unused",
}
BUFFER_SYNC = {"bn_no_buffer_broadcast": "never", "bn_buffers_after_step": "broadcast at every forward"}


@pytest.mark.parametrize("name", sorted(WRAPPER_NOTE))
def test_diagnosis_says_how_the_gradients_escaped_ddp(per_rank, name):
    d = _outcome(per_rank, name, fixed=False).report.diagnosis
    assert set(d.evidence["wrapper"]) == {WRAPPER_NOTE[name]}, d.explanation


@pytest.mark.parametrize("name", sorted(BUFFER_SYNC))
def test_diagnosis_tells_ddp_buffer_broadcast_from_never_synced(per_rank, name):
    d = _outcome(per_rank, name, fixed=False).report.diagnosis
    assert d.evidence["buffer_sync"] == BUFFER_SYNC[name], d.explanation


def test_with_two_ranks_the_culprit_is_named_only_where_evidence_tells_them_apart(two_ranks):
    named = {o.name: o.report.diagnosis.culprit for o in two_ranks[0] if not o.fixed}
    # Only rank 0 stepped the scheduler (its learning rate changed, rank 1's did not); only
    # rank 0's gradients were clipped (the smaller ones, by one factor).
    assert named["scheduler_one_rank"] == 0 and named["clip_one_rank"] == 0
    # A flipped bit, or a skipped step: two copies, nothing to say which is off; none named.
    assert named["bit_flip"] is None and named["step_skipped_one_rank"] is None


# The sharded reproduction (hsdp_init_mismatch, a world of 4) is specified in test_hsdp_replicas.py.
