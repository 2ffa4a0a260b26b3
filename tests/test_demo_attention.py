"""Claims of the attention demos, measured: context, heads-kernels.

Each demo runs once per module (in-process, seed 0). Its numbers are checked against the bars
the demo derives (the order-blind ceiling of 1/2 on mirror pairs; the heads of untrained
models; the rounding bound), every control must fail the claim's test for the reason it was
built for, and every mutant the demo lists must turn the claim's own verdict to `fails`.
"""

from __future__ import annotations

import pytest
from conftest import controls_by_name

from distshare.data import build_dataset
from distshare.demos import FAILS, HOLDS, mutants, run_demo
from distshare.demos.common import trained
from distshare.demos.context import TRAINING, seen_sentences
from distshare.testing.selftest import demo_mutant_row

DEMOS = ("context", "heads-kernels")


@pytest.mark.slow
@pytest.mark.parametrize("name", DEMOS)
def test_claim_holds_and_every_control_fails(findings, name):
    f = findings[name]
    assert f["verdict"] == HOLDS, f["numbers"]
    assert len(f["controls"]) >= 2 and all(c["verdict"] == FAILS for c in f["controls"]), f["controls"]
    assert f["by_construction"]


# --------------------------------------------------------------------------------------- context


@pytest.mark.slow
def test_context_the_verb_alone_names_the_subject_of_pairs_never_trained_on(findings):
    n = findings["context"]["numbers"]
    assert n["trained_on"] == 0 and n["pairs"] >= 10 and n["sentences"] == 2 * n["pairs"]
    assert n["entry_bitwise_equal"]  # the verb enters both sentences of every pair with the same vector
    # Beyond what any answer blind to word order can reach on mirror pairs ...
    assert n["order_blind_ceiling"] == 0.5 and n["verb_readout_accuracy"] > n["order_blind_ceiling"]
    # ... and pairs told apart, both subjects named, which no order-blind answer can do even once.
    assert n["pairs_both_right"] >= 1
    assert n["verb_readout_accuracy"] == n["verb_readout_right"] / n["sentences"]
    assert n["final_train_loss"] < 0.01  # the model learned its training set


@pytest.mark.slow
def test_context_held_out_pairs_are_disjoint_from_everything_training_drew(findings):
    n = findings["context"]["numbers"]
    t = trained(TRAINING, 0)
    # Independently of how the demo decodes the loop's samples: the data set's own text column.
    drawn = set(build_dataset(t.cfg.data)[0]["text"])
    consumed = seen_sentences(t)
    assert consumed <= drawn and len(consumed) == n["training_sentences_distinct"]
    for a, b in n["held_out_pairs"]:
        assert a.split() == b.split()[::-1]  # a mirror pair: the same words, subject and object swapped
        assert a not in drawn and b not in drawn, (a, b)
    assert len(n["held_out_pairs"]) == n["pairs"]


@pytest.mark.slow
def test_context_untrained_and_self_only_attention_leave_the_verb_blind(findings):
    f = findings["context"]
    c = controls_by_name(f)
    untrained, self_only = c["untrained"]["numbers"], c["attention on itself only"]["numbers"]
    for ctrl in (untrained, self_only):
        assert ctrl["trained_on"] == 0 and ctrl["pairs"] == f["numbers"]["pairs"]
        assert ctrl["verb_readout_accuracy"] <= f["numbers"]["order_blind_ceiling"]
    # Why self-only attention is a fair counterfactual: trained the same way, it still names the
    # subject from the whole sentence; only the verb's context is gone.
    assert self_only["sentence_accuracy"] > f["numbers"]["order_blind_ceiling"]
    assert untrained["sentence_accuracy"] <= f["numbers"]["order_blind_ceiling"]


# --------------------------------------------------------------------------------- heads-kernels


@pytest.mark.slow
def test_heads_differ_more_than_the_heads_of_untrained_models(findings):
    n = findings["heads-kernels"]["numbers"]
    assert len(n["reference_untrained_seeds"]) == 16 and 0 not in n["reference_untrained_seeds"]
    for layer in n["heads"]["layers"]:
        assert layer["bar_js"] > 0  # measured on untrained heads, not chosen
        assert layer["smallest_pair_js"] > layer["bar_js"], layer
        assert layer["distinct_views"] == layer["heads"] == 4


@pytest.mark.slow
def test_filters_respond_differently_beyond_rounding(findings):
    f = findings["heads-kernels"]["numbers"]["filters"]
    assert f["distinct_views"] == f["filters"] == 8
    assert f["smallest_pair_max_abs_diff"] > f["tolerance"] > 0


@pytest.mark.slow
def test_heads_kernels_controls_fail_for_their_reason(findings):
    c = controls_by_name(findings["heads-kernels"])
    untrained, copies = c["untrained"]["numbers"], c["started as copies"]["numbers"]
    # Untrained heads: some layer has a pair of heads no more different than random heads are.
    assert any(x["distinct_views"] < x["heads"] for x in untrained["heads"]["layers"])
    assert any(x["smallest_pair_js"] <= x["bar_js"] for x in untrained["heads"]["layers"])
    # Not what the untrained control tests: random filters are already distinct (by_construction).
    assert untrained["filters"]["distinct_views"] == untrained["filters"]["filters"]
    # Started as copies, trained the same way: nothing breaks the symmetry, one view each.
    assert all(x["distinct_views"] == 1 for x in copies["heads"]["layers"])
    assert copies["filters"]["distinct_views"] == 1


# --------------------------------------------------------------------------------------- mutants


REASONS = {
    ("context", "untrained"): lambda n: n["verb_readout_accuracy"] <= n["order_blind_ceiling"],
    ("context", "training sentences"): lambda n: n["trained_on"] == n["sentences"] > 0,
    ("context", "self attention"): lambda n: n["verb_readout_accuracy"] <= n["order_blind_ceiling"],
    ("context", "no positions"): lambda n: n["verb_readout_accuracy"] <= n["order_blind_ceiling"],
    ("heads-kernels", "untrained"): lambda n: any(x["distinct_views"] < x["heads"] for x in n["heads"]["layers"]),
    ("heads-kernels", "one head"): lambda n: all(x["distinct_views"] == 1 for x in n["heads"]["layers"]),
    ("heads-kernels", "one filter"): lambda n: n["filters"]["distinct_views"] == 1,
}


def test_every_mutant_has_its_reason_here():
    listed = {(name, m) for name in DEMOS for m in mutants(name)}
    assert listed == set(REASONS) and all(len(mutants(name)) >= 2 for name in DEMOS)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "mutant", "seed"),
    [(name, m, 0) for name, m in REASONS] + [("context", "training sentences", 1), ("heads-kernels", "untrained", 1)],
)
def test_mutant_turns_the_claim_to_fails(tmp_path, name, mutant, seed):
    f = run_demo(name, tmp_path, seed=seed, mutant=mutant)
    assert f.verdict == FAILS and f.mutant == mutant, f.headline
    assert demo_mutant_row(f).caught  # `distshare selftest`'s row for it: this is where the suite checks it
    assert REASONS[name, mutant](f.numbers), f.headline  # and for the reason the mutant was built for
