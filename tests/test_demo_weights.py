"""Claims of the weight-sharing demos, measured: qkv-shared, conv-shared, one-weight-set, fixed-after-training.
Each demo runs once per module (in-process, seed 0) and its numbers are checked against the bounds the demo derives."""

from __future__ import annotations

import pytest

from distshare.demos import run_demo
from distshare.demos.conv_shared import LocallyConnected, equivariance


@pytest.fixture(scope="module")
def findings(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("demo")
    return {
        name: run_demo(name, out).to_dict()
        for name in ("qkv-shared", "conv-shared", "one-weight-set", "fixed-after-training")
    }


@pytest.mark.slow
def test_qkv_one_weight_set_serves_every_sample(findings):
    n = findings["qkv-shared"]["numbers"]
    assert len(set(n["params_used_by_batch_size"].values())) == 1
    assert n["control_params_used_by_batch_size"]["40"] == 40 * n["control_params_used_by_batch_size"]["1"]
    assert n["storages_per_matrix"] == 1 and n["control_storages_per_matrix"] == n["batch_size"]
    bound = n["rounding_bound_norm_rel"]
    assert n["grad_vs_sum_of_per_sample"]["norm_rel_diff"] <= bound
    assert n["control_grad_vs_sum_of_per_sample"]["norm_rel_diff"] > 1000 * bound


@pytest.mark.slow
def test_inference_changes_no_state_but_train_mode_batch_norm_does(findings):
    n = findings["fixed-after-training"]["numbers"]
    for name in ("transformer, eval", "batch-norm CNN, eval"):
        assert n[name]["params_changed"] == 0 and n[name]["buffers_changed"] == 0
    control = n["control: batch-norm CNN, train mode"]
    assert control["params_changed"] == 0 and control["buffers_changed"] > 0
    assert all(name.startswith("buffer/") for name in control["changed"])


@pytest.mark.slow
def test_conv_is_equivariant_and_small_the_locally_connected_layer_is_neither(findings):
    n = findings["conv-shared"]["numbers"]
    assert n["conv_equivariance"]["max_error_over_bound"] <= 1.0
    assert n["control_equivariance"]["max_error_over_bound"] > 1e3
    p = n["params"]
    assert p["conv"] < p["locally_connected"] < p["dense"]
    side = int(n["image"].split(" x ")[-1])
    assert p["locally_connected"] == side * side * p["conv"]  # one kernel + bias per position, exactly


def test_locally_connected_becomes_equivariant_when_its_positions_share_one_kernel():
    """The flip is caused by the sharing and nothing else: tie the per-position kernels and the
    same layer passes the same test."""
    import torch

    torch.manual_seed(0)
    layer = LocallyConnected(1, 4, 3, 16)
    x = torch.randn(2, 1, 16, 16)
    assert equivariance(layer, x)["max_error_over_bound"] > 1.0
    with torch.no_grad():
        layer.weight[:] = layer.weight[:1]
        layer.bias[:] = layer.bias[:1]
    assert equivariance(layer, x)["max_error_over_bound"] <= 1.0


@pytest.mark.slow
def test_forty_samples_one_weight_set_on_every_rank(findings):
    n = findings["one-weight-set"]["numbers"]
    assert n["updates"] == n["samples"] // n["batch_size"] == 10
    assert n["distinct_weight_states_incl_initial"] == 11 and n["storage_sets_single_process"] == 1
    assert n["each_sample_used_once"]
    assert n["steps_all_ranks_agree"] == 10 and n["control_steps_all_ranks_agree"] == 0
    assert n["copy_per_batch_final_weight_sets"] == 10
