"""Claims of the attention demos, measured: context, heads-kernels. Each demo runs once per module
(in-process, seed 0) and its numbers are checked against the bounds the demo derives."""

from __future__ import annotations

import pytest

from distshare.demos import run_demo


@pytest.fixture(scope="module")
def findings(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("demo")
    return {name: run_demo(name, out).to_dict() for name in ("context", "heads-kernels")}


@pytest.mark.slow
def test_context_comes_from_positions(findings):
    n = findings["context"]["numbers"]
    pe, ctrl, bound = n["with_positions"], n["control_without_positions"], n["rounding_bound_rel_distance"]
    assert pe["entry_bitwise_equal"] and ctrl["entry_bitwise_equal"]
    assert pe["exit_rel_distance"] > 1e3 * bound and ctrl["exit_rel_distance"] <= bound
    assert pe["predicted_subjects"] == ["cat", "mouse"]
    assert ctrl["predicted_subjects"][0] == ctrl["predicted_subjects"][1]  # the same answer for both
    assert pe["grammar_accuracy"] == 1.0 and ctrl["grammar_accuracy"] <= 0.5


@pytest.mark.slow
def test_heads_and_filters_are_several_views(findings):
    n = findings["heads-kernels"]["numbers"]
    for layer in n["heads"]["layers"]:
        assert layer["distinct_views"] == layer["heads"] > 1 and layer["mean_pairwise_js_divergence"] > 0
    assert n["filters"]["distinct_views"] == n["filters"]["filters"] > 1
    assert all(layer["distinct_views"] == 1 for layer in n["control_heads"]["layers"])
    assert n["control_filters"]["distinct_views"] == 1
