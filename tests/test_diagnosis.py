"""Claim: a divergence report says *why*, from the evidence: which kinds of tensors differ, how
(whole tensors or a few elements, one factor or another gradient), when (before any update or
after the ranks agreed), on which ranks. Each rule beside the change of evidence that flips it
to another cause; `distshare.watch` places the checks in a user's own loop; `distshare
compare` diagnoses two checkpoints. The faithful reproductions of public reports are
tests/test_divergences.py."""

from __future__ import annotations

import json
import pickle
import re
import time

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import distshare
from distshare.distributed.spawn import run_distributed
from distshare.integrity.checkpoint import save_checkpoint
from distshare.integrity.diagnosis import Cause, RankFacts, diagnose, kind_of
from distshare.integrity.replicas import ReplicaDivergenceError, ReplicaReport, compare_digests
from distshare.integrity.watch import ReplicaCheckTimeout
from distshare.numerics.diff import localize

# ------------------------------------------------------------------ the rules, on synthetic evidence

STATE = [
    "param/w",
    "param/b",
    "buffer/bn.running_mean",
    "optim/w/exp_avg",
    "optim/w/exp_avg_sq",
    "optim/w/step",
    "optim/b/exp_avg",
    "optim/b/exp_avg_sq",
    "optim/b/step",
    "optim/group0/lr",
]


def _digests(differ: dict[str, set[int]], world: int, names: list[str] = STATE) -> list[dict[str, str]]:
    """Per-rank digests where `differ[name]` are the ranks holding values of their own."""
    return [{n: f"xxh3_128:{r + 1 if r in differ.get(n, ()) else 0}{n}" for n in names} for r in range(world)]


def _report(differ: dict[str, set[int]], world: int = 3, facts=None, elements=None, names=STATE) -> ReplicaReport:
    return compare_digests(_digests(differ, world, names), step=4, facts=facts, elements=elements)


def _facts(world: int, **kw) -> list[RankFacts]:
    return [
        RankFacts(rank=r, updated=True, **{k: v[r] if isinstance(v, list) else v for k, v in kw.items()})
        for r in range(world)
    ]


def test_tensor_kinds_by_name():
    assert [kind_of(n) for n in ("param/a.b", "grad/a", "buffer/bn.running_var", "optim/a/exp_avg")] == [
        "param",
        "grad",
        "buffer",
        "state",
    ]
    assert kind_of("optim/group1/lr") == "hyper" and kind_of("optim/group1.weight/step") == "state"
    assert kind_of("model/bn.running_mean") == "buffer" and kind_of("model/fc.weight") == "param"  # checkpoints
    assert kind_of("extra/scheduler/last_epoch") == "extra" and kind_of("rng/rank0/torch") == "extra"


def test_in_sync_has_no_diagnosis():
    assert _report({}).diagnosis is None and _report({}).in_sync


def test_buffers_only_tells_ddp_broadcast_from_never_synced():
    differ = {"buffer/bn.running_mean": {1}}
    normal = _report(differ, facts=_facts(3, buffer_sync=True)).diagnosis
    never = _report(differ, facts=_facts(3, buffer_sync=False)).diagnosis
    unknown = _report(differ, facts=_facts(3)).diagnosis
    assert normal.cause == never.cause == unknown.cause == Cause.BUFFERS_ONLY
    assert normal.evidence["buffer_sync"] == "broadcast at every forward" and "normal" in normal.explanation
    assert never.evidence["buffer_sync"] == "never" and "never synchronized" in never.explanation
    assert unknown.evidence["buffer_sync"] == "unknown" and "distshare.watch" in unknown.evidence["decide"]
    # What a forward received decides it without the wrapper's flag: equal -> broadcast, not -> never.
    same = [{"buffer/bn.running_mean": "x:1"}] * 3
    assert _report(differ, facts=_facts(3, forward_buffers=same)).diagnosis.evidence["buffer_sync"] != "never"
    apart = [{"buffer/bn.running_mean": f"x:{r}"} for r in range(3)]
    assert _report(differ, facts=_facts(3, forward_buffers=apart)).diagnosis.evidence["buffer_sync"] == "never"
    # Mutant: a parameter differs as well -> no longer buffers only.
    assert _report({**differ, "param/w": {1}}, facts=_facts(3, buffer_sync=True)).diagnosis.cause != Cause.BUFFERS_ONLY


def test_a_hyperparameter_names_the_rank_that_changed_it_even_without_a_majority():
    lr = localize(torch.tensor(2e-3, dtype=torch.float64), torch.tensor(1e-3, dtype=torch.float64), 1, 0)
    differ = {"optim/group0/lr": {0, 1}, "param/w": {0, 1}, "param/b": {0, 1}}
    facts = _facts(2, changed=[["param/w", "param/b"], ["param/w", "param/b", "optim/group0/lr"]])
    d = _report(differ, world=2, facts=facts, elements={"optim/group0/lr": [lr]}).diagnosis
    assert d.cause == Cause.OPTIMIZER_HYPERPARAMS and d.culprit == 1
    assert "rank 1 0.002 vs rank 0 0.001" in d.explanation and "only rank 1 changed" in d.describe()
    # Mutant: both ranks changed it (a schedule stepped on both, differently): no culprit named.
    both = _facts(2, changed=[["optim/group0/lr"], ["optim/group0/lr"]])
    d = _report(differ, world=2, facts=both).diagnosis
    assert d.culprit is None and "no majority" in d.describe()


def test_before_any_update_it_is_the_initial_weights():
    differ = {"param/w": {0, 1}, "param/b": {0, 1}}
    before = [RankFacts(rank=r, updated=False) for r in range(2)]
    assert _report(differ, world=2, facts=before).diagnosis.cause == Cause.INIT_MISMATCH
    # A later check remembers that the check before the first update failed.
    later = _facts(2, baseline=False)
    assert _report({**differ, "optim/w/exp_avg": {0, 1}}, world=2, facts=later).diagnosis.cause == Cause.INIT_MISMATCH


def test_an_init_mismatch_of_a_sharded_model_names_fully_shard_and_its_fix_not_ddp():
    """HSDP's replica groups (allenai/OLMo-core#319): the same rule, FSDP2's mechanism and fix."""
    differ = {"param/w": {0, 1, 2, 3}, "param/b": {0, 1, 2, 3}}
    before = [RankFacts(rank=r, updated=False) for r in range(4)]
    hsdp = {"kind": "hsdp", "mesh": [2, 2], "replica_groups": 2, "shards": 2}
    for facts in (before, _facts(4)):  # at the first check, and later (moments equal: started apart)
        d = compare_digests(_digests(differ, 4), step=None, facts=facts, layout=hsdp).diagnosis
        assert d.cause == Cause.INIT_MISMATCH and d.evidence["layout"] == "hsdp"
        assert "fully_shard never broadcasts initial weights" in d.explanation and "OLMo-core#319" in d.explanation
        assert d.fix.startswith("build the model under the shared seed before fully_shard") and "init_sync" not in d.fix
    # Without a layout (DDP replicas) the fix is DDP's.
    ddp = compare_digests(_digests(differ, 4), step=None, facts=before).diagnosis
    assert "init_sync" in ddp.fix and "fully_shard never" not in ddp.explanation


def test_parameters_apart_with_equal_moments_started_apart_unless_they_agreed_since():
    differ = {"param/w": {2}, "param/b": {2}}
    assert _report(differ, facts=_facts(3)).diagnosis.cause == Cause.INIT_MISMATCH  # moments prove equal updates
    agreed = _report(differ, facts=_facts(3, last_in_sync="step 2")).diagnosis
    assert agreed.cause == Cause.OPTIMIZER_STATE and "agreed at step 2" in agreed.explanation
    # Without moments (plain SGD) the evidence cannot decide: the diagnosis says what would.
    sgd = ["param/w", "param/b", "optim/group0/lr"]
    d = _report(differ, facts=_facts(3), names=sgd).diagnosis
    assert (
        d.cause == Cause.INIT_MISMATCH and d.alternatives == ["optimizer_state"] and "before the first step" in d.decide
    )


def _flip(t: torch.Tensor, at: int) -> torch.Tensor:
    out = t.clone()
    out.view(-1).view(torch.int32)[at] ^= 1 << 20
    return out


def test_a_few_elements_of_one_rank_are_corruption_whole_tensors_are_not():
    w = torch.randn(32, 32)
    one = {"param/w": [localize(_flip(w, 7), w, 2, 0)]}
    d = _report({"param/w": {2}}, elements=one).diagnosis
    assert d.cause == Cause.CORRUPTION and d.culprit == 2 and "param/w[0, 7]" in d.explanation
    # Mutant: the whole tensor differs (a different gradient, a different init): not corruption.
    whole = {"param/w": [localize(w + 1e-3, w, 2, 0)]}
    assert _report({"param/w": {2}}, elements=whole).diagnosis.cause != Cause.CORRUPTION
    # Mutant: a few elements, but not localized (the count is unknown): not called corruption.
    assert _report({"param/w": {2}}).diagnosis.cause != Cause.CORRUPTION


GRADS = ["grad/w", "grad/b"]


def test_gradients_one_factor_apart_were_clipped_other_gradients_were_not_synced():
    gw, gb = torch.randn(8, 8), torch.randn(8)
    names = STATE + GRADS
    differ = {n: {1} for n in ("param/w", "param/b", "grad/w", "grad/b", "optim/w/exp_avg")}
    clipped = {"grad/w": [localize(gw * 0.25, gw, 1, 0)], "grad/b": [localize(gb * 0.25, gb, 1, 0)]}
    d = _report(differ, facts=_facts(3), elements=clipped, names=names).diagnosis
    assert d.cause == Cause.OPTIMIZER_STATE and d.culprit == 1 and "0.25 x rank 0's" in d.explanation
    # Two ranks: the smaller gradients are the clipped ones.
    two = compare_digests(_digests({n: {0, 1} for n in differ}, 2, names), step=1, facts=_facts(2), elements=clipped)
    assert two.diagnosis.culprit == 1 and "smaller" in two.diagnosis.evidence["culprit_evidence"]
    # Mutant: another gradient, not a scaled one -> not synced; all of them -> "all 2 parameters".
    other = {"grad/w": [localize(torch.randn(8, 8), gw, 1, 0)], "grad/b": [localize(gb * 0.25, gb, 1, 0)]}
    d = _report(differ, facts=_facts(3), elements=other, names=names).diagnosis
    assert d.cause == Cause.GRADS_NOT_SYNCED and "all 2 parameters" in d.explanation
    some = {"grad/w": {1}, "param/w": {1}, "optim/w/exp_avg": {1}}
    d = _report(some, facts=_facts(3), names=names).diagnosis
    assert d.cause == Cause.GRADS_NOT_SYNCED and "for 1 parameter (w)" in d.explanation


def test_optimizer_state_apart_step_counts_or_undecided_without_gradients():
    steps = {"optim/w/step": {1}, "optim/b/step": {1}, "optim/w/exp_avg": {1}, "param/w": {1}}
    d = _report(steps, facts=_facts(3, steps=[4, 5, 4])).diagnosis
    assert d.cause == Cause.OPTIMIZER_STATE and "rank 1: 5" in d.explanation and d.culprit == 1
    moments = {"optim/w/exp_avg": {1}, "optim/w/exp_avg_sq": {1}, "param/w": {1}}
    with_grads = _report(moments, facts=_facts(3), names=STATE + GRADS).diagnosis
    assert with_grads.cause == Cause.OPTIMIZER_STATE  # the gradients were compared and agree
    undecided = _report(moments, facts=_facts(3)).diagnosis
    assert undecided.cause == Cause.GRADS_NOT_SYNCED and undecided.alternatives == ["optimizer_state"]
    assert "grads=True" in undecided.decide and "to decide" in undecided.describe()


def test_a_nan_on_one_side_names_the_culprit_of_two():
    w = torch.randn(16)
    bad = w.clone()
    bad[3] = float("nan")
    d = _report({"param/w": {0, 1}}, world=2, elements={"param/w": [localize(bad, w, 1, 0)]}).diagnosis
    assert d.culprit == 1 and "NaN" in d.evidence["culprit_evidence"]


def test_only_extra_state_is_unknown_and_says_what_differs():
    names = [*STATE, "extra/rng/torch"]
    d = _report({"extra/rng/torch": {1}}, facts=_facts(3), names=names).diagnosis
    assert d.cause == Cause.UNKNOWN and "extra/rng/torch" in d.explanation


def test_the_message_starts_with_the_cause_then_parameters_with_their_state_summarized():
    differ = {
        **{f"param/l{i}.weight": {0, 1} for i in range(4)},
        **{f"optim/l{i}.weight/{k}": {0, 1} for i in range(4) for k in ("exp_avg", "exp_avg_sq")},
        **{f"grad/l{i}.weight": {0, 1} for i in range(4)},
        "buffer/bn.running_mean": {0, 1},
    }
    names = sorted(differ) + ["optim/group0/lr"]
    message = str(ReplicaDivergenceError(compare_digests(_digests(differ, 2, names), step=3, facts=_facts(2))))
    assert message.startswith("replicas differ at step 3: grads_not_synced: the gradients the optimizer used differ")
    where = message.split(" | ", 1)[1]
    assert where.startswith("17 tensor(s) differ: 4 parameters and their 8 optimizer-state tensors: param/l0.weight")
    assert where.index("gradients (4)") < where.index("buffers (1)")
    assert "\n" not in message


def test_report_and_error_round_trip_with_the_diagnosis():
    report = _report({"param/w": {2}, "param/b": {2}}, facts=_facts(3))
    again = ReplicaReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again.diagnosis == report.diagnosis and again.summary() == report.summary()
    err = pickle.loads(pickle.dumps(ReplicaDivergenceError(report)))
    assert str(err) == report.summary() and err.report.diagnosis.cause == "init_mismatch"


def test_diagnose_is_pure_and_never_guesses_without_differences():
    d = diagnose({"param/w": [1]}, {"param/w": True}, {}, STATE, 3)
    assert d.cause in set(Cause) and d.explanation and d.fix


# ---------------------------------------------------------------- distshare.watch, on real gloo ranks


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _loop(world, model, wrapped, optimizer, steps, rank_fault=None):
    data = torch.Generator().manual_seed(world.rank)
    for step in range(steps):
        optimizer.zero_grad()
        wrapped(torch.randn(8, 6, generator=data)).pow(2).mean().backward()
        optimizer.step()
        if rank_fault is not None:
            rank_fault(step)


def _watched(world):
    out = {}
    # A clean DDP loop: a baseline, then every 2nd step; every check agrees.
    model = _bn_model()
    ddp = DistributedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with distshare.watch(ddp, opt, every=2, buffers="separate") as w:
        _loop(world, model, ddp, opt, 6)
    out["clean"] = (w.checks, w.in_sync, [r.step for r in w.reports], w.reports[-1].identical)
    # The same loop, buffers compared (the default): DDP's per-forward broadcast, seen by the
    # wrapper's flag; with the bare model passed, by what each forward received.
    for label, passed in (("normal wrapper", "ddp"), ("normal bare", "model")):
        model = _bn_model()
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        w = distshare.watch(ddp if passed == "ddp" else model, opt, raise_on_divergence=False)
        _loop(world, model, ddp, opt, 3)
        w.close()
        out[label] = w.reports[-1]  # step 2 (at step 0 no forward had yet received changed buffers)
        out[label + " first"] = w.first_divergence
    model = _bn_model()
    with pytest.warns(FutureWarning):
        ddp = DistributedDataParallel(model, broadcast_buffers=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = distshare.watch(model, opt, raise_on_divergence=False)
    _loop(world, model, ddp, opt, 3)
    w.close()
    out["never bare"] = w.reports[-1]
    out["never bare first"] = w.first_divergence
    # A doubled optimizer.step() on the last rank: counted, checked at the same points, caught.
    model = nn.Sequential(nn.Linear(6, 2))
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = distshare.watch(ddp, opt, raise_on_divergence=False)

    def doubled(step):
        if step == 1 and world.rank == world.world_size - 1:
            opt.step()

    _loop(world, model, ddp, opt, 4, doubled)
    w.close()
    out["doubled"] = w.first_divergence
    # A divergence raises from optimizer.step() on every rank, with the report.
    model = nn.Sequential(nn.Linear(6, 2))
    ddp = DistributedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    w = distshare.watch(ddp, opt, every=1, extra=lambda: {"rng": torch.get_rng_state()})
    data = torch.Generator().manual_seed(world.rank)
    try:
        for _ in range(3):
            opt.zero_grad()
            ddp.module(torch.randn(8, 6, generator=data)).pow(2).mean().backward()  # DDP bypassed
            opt.step()
        out["raised"] = None
    except ReplicaDivergenceError as exc:
        out["raised"] = exc.report
    w.remove()
    return out


@pytest.fixture(scope="module")
def watched():
    return {w: run_distributed(_watched, w, timeout_s=60, deadline_s=240) for w in (2, 3)}


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_watch_checks_a_clean_loop_at_its_points_and_every_rank_agrees(watched, world):
    per_rank = watched[world]
    checks, in_sync, steps, identical = per_rank[0]["clean"]
    assert (checks, in_sync, steps) == (4, True, [None, 1, 3, 5])  # a baseline, then every 2nd step
    assert not identical  # buffers differ (DDP's per-forward broadcast), reported apart: in sync
    for key in ("normal wrapper", "never bare", "doubled", "raised"):
        reports = [r[key] for r in per_rank]
        assert all(r is not None and r.to_dict() == reports[0].to_dict() for r in reports), key


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_watch_tells_ddp_buffer_broadcast_from_buffers_never_synced(watched, world):
    out = watched[world][0]
    for key in ("normal wrapper", "normal bare"):
        d = out[key].diagnosis
        assert d.cause == "buffers_only" and d.evidence["buffer_sync"] == "broadcast at every forward", key
    never = out["never bare"].diagnosis
    assert never.cause == "buffers_only" and never.evidence["buffer_sync"] == "never"
    # At step 0, with only the bare module, no forward has yet received changed buffers: the
    # two cannot be told apart, and the diagnosis says what would tell them.
    for key in ("normal bare first", "never bare first"):
        first = out[key]
        assert first.step == 0 and first.diagnosis.evidence["buffer_sync"] == "unknown", key
        assert "DDP-wrapped model" in first.diagnosis.evidence["decide"]
    assert out["normal wrapper first"].diagnosis.evidence["buffer_sync"] == "broadcast at every forward"


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_watch_catches_a_doubled_step_without_losing_step_with_its_peers(watched, world):
    report = watched[world][0]["doubled"]
    assert report.step == 2 and "optim/steps_taken" in report.differing
    assert report.diagnosis.cause == "optimizer_state" and f"rank {world - 1}: 4" in report.diagnosis.explanation
    if world == 3:
        assert report.diagnosis.culprit == 2


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_watch_raises_from_the_step_with_the_gradients_as_evidence(watched, world):
    report = watched[world][0]["raised"]
    assert report.step == 0 and report.diagnosis.cause == "grads_not_synced"
    assert any(n.startswith("grad/") for n in report.differing)  # digested once the state differed
    assert "extra/rng" not in report.differing  # extra state compared, and equal (same seed everywhere)


# ------------------------------------------------------------------------- two checkpoints, compared


def _adam_state(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, opt


def test_compare_diagnoses_two_checkpoints(tmp_path, cli):
    model, opt = _adam_state(0)
    save_checkpoint(tmp_path / "a", model, opt, step=0)
    with torch.no_grad():
        model[0].weight.view(-1).view(torch.int32)[5] ^= 1 << 20
    save_checkpoint(tmp_path / "flipped", model, opt, step=0)
    other, other_opt = _adam_state(1)
    save_checkpoint(tmp_path / "seed1", other, other_opt, step=0)
    code, out, _ = cli("compare", str(tmp_path / "a"), str(tmp_path / "flipped"), "--json")
    assert code == 1 and json.loads(out)["diagnosis"]["cause"] == "corruption"
    code, out, _ = cli("compare", str(tmp_path / "a"), str(tmp_path / "seed1"))
    assert code == 1 and "why: init_mismatch" in out
    code, out, _ = cli("compare", str(tmp_path / "a"), str(tmp_path / "a"), "--json")
    assert code == 0 and json.loads(out)["diagnosis"] is None


def test_watch_refuses_bad_options_and_leaves_no_hook_behind():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for options, words in (
        ({"every": 0}, "every=0"),
        ({"buffers": "seperate"}, "expected one of compare, separate, ignore"),
        ({"grads": "yes"}, "grads='yes'"),
    ):
        with pytest.raises(ValueError, match=re.escape(words)):
            distshare.watch(model, opt, **options)
    model(torch.randn(3, 2)).sum().backward()
    opt.step()  # no hook of a watch that never started runs here
    # One process: a watch checks (trivially in sync) and counts; close() makes no second check.
    with distshare.watch(model, opt, every=2) as w:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(3, 2)).sum().backward()
            opt.step()
    assert (w.steps, w.iterations, w.checks, [r.step for r in w.reports]) == (3, 3, 3, [None, 1, 2])
    assert w.in_sync and not w._handles


def _one_rank_skips_the_step(world):
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    distshare.watch(model, opt, timeout_s=3)
    model(torch.randn(3, 2)).sum().backward()
    if world.rank != 0:
        time.sleep(8)  # never steps, stays alive past rank 0's timeout: the check's peers wait for nobody
        return None
    start = time.monotonic()
    try:
        opt.step()  # the check in the step hook waits for rank 1, which never comes
    except ReplicaCheckTimeout as exc:
        return str(exc), time.monotonic() - start
    return "no timeout", None


@pytest.mark.slow
def test_a_watch_check_a_rank_never_reaches_ends_in_its_timeout_naming_what_to_look_for():
    message, waited = run_distributed(_one_rank_skips_the_step, 2, timeout_s=30, deadline_s=60)[0]
    assert "timed out after 3 s: some rank did not reach it (it skipped an optimizer.step()" in message
    assert waited < 10  # the watch's own timeout, not the process group's 30 s
