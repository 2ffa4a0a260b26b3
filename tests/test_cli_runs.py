"""Claim: `distshare verify` (the main job) and `distshare train` run end to end, write
results that can be read again, and say OK only when every check holds."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import yaml
from conftest import rank0_json, read_metrics, read_result, run_cli

from distshare.commands import verify
from distshare.commands.verify import _checks
from distshare.config import load_config
from distshare.distributed.world import World
from distshare.training import train


@pytest.fixture(scope="module")
def verified(tmp_path_factory):
    """The README's main job, `distshare verify` with its defaults, in a fresh process."""
    out = tmp_path_factory.mktemp("verify")
    proc = run_cli("verify", "--json", "--no-progress", "--out", str(out), timeout=300)
    return proc, out


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest |a - b| over every element of every tensor: computed here, not by distshare."""
    assert set(a) == set(b)
    return max(float((a[n].double() - b[n].double()).abs().max()) for n in a)


@pytest.mark.slow
def test_verify_passes_and_says_so_in_json(verified):
    proc, out = verified
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = rank0_json(proc)
    for key in (
        "ok",
        "world_size",
        "steps",
        "replicas_in_sync",
        "final_fingerprint",
        "max_abs_diff_vs_single_process",
        "bitwise_equal_to_single_process",
    ):
        assert key in result
    assert result["ok"] and result["world_size"] == 2 and result["replicas_in_sync"]
    assert {c["name"] for c in result["checks"] if c["ok"]} == {c["name"] for c in result["checks"]}
    sp = result["single_process"]
    # The headline number is the final parameters' distance, reported consistently: a finite
    # figure, the one in the parameter comparison, zero exactly when the two are bitwise equal.
    max_abs = result["max_abs_diff_vs_single_process"]
    assert math.isfinite(max_abs) and math.isfinite(sp["final_params"]["norm_rel_diff"])  # a NaN compares false
    assert max_abs == sp["final_params"]["max_abs_diff"]
    assert result["bitwise_equal_to_single_process"] == sp["final_params"]["bitwise_equal"] == (max_abs == 0.0)
    # The equivalence is reported as measured, with the bound beside it.
    assert sp["step0_grads"]["bitwise_equal"] or sp["step0_grads"]["norm_rel_diff"] <= sp["rounding_bound"]
    assert read_result(out) == result  # printed, and written where it reads back


@pytest.mark.slow
def test_verify_writes_files_that_read_back(verified):
    _, out = verified
    result = read_result(out)
    assert result["ok"]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(result["steps"]))
    assert all(r["replicas_in_sync"] for r in rows)
    assert "Verdict: **OK**" in (out / "report.md").read_text()
    assert (out / "loss.png").stat().st_size > 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["plan"]["world_size"] == 2
    reloaded = load_config(out / "config.yaml")  # the resolved config is a valid config
    assert reloaded.plan.resolve().micro_batch == config["plan"]["micro_batch"]


@pytest.mark.slow
def test_verify_prints_one_verdict_line_and_the_distance_it_measured(tmp_path, cli, monkeypatch):
    """The reported distance to one process is the true one: the test trains the one process
    itself and measures the distance to the ranks' final state."""
    ranks_state = {}

    def keep_ranks_state(cfg, results, ref, summary):
        ranks_state.update(results[0].extras["partition"].states[-1])
        return _checks(cfg, results, ref, summary)

    monkeypatch.setattr(verify, "_checks", keep_ranks_state)
    code, out, _ = cli("verify", "--no-progress", "--out", str(tmp_path), "--set", "steps=4", "--nproc", "3")
    lines = out.strip().splitlines()
    assert code == 0 and lines[-1].startswith("distshare verify: OK")
    assert "3 ranks" in lines[-1]

    # One process on the same global batches, whole (W = 1, k = 1), trained here.
    cfg = load_config(tmp_path / "config.yaml")
    cfg = dataclasses.replace(cfg, plan=dataclasses.replace(cfg.plan, world_size=1, accum_steps=1, micro_batch=None))
    one = train(cfg, World(), progress=False, keep_state=True)
    result = read_result(tmp_path)
    assert result["single_process"]["final_fingerprint"] == one.final_fingerprint
    measured = _max_abs_diff(ranks_state, one.state)
    assert result["max_abs_diff_vs_single_process"] == measured
    bitwise = all(torch.equal(ranks_state[n], one.state[n]) for n in one.state)
    assert result["bitwise_equal_to_single_process"] == bitwise


def test_train_on_cnn_with_allreduce(tmp_path, cli):
    args = ["--config", "configs/train/cnn.yaml", "--nproc", "2", "--sync", "allreduce", "--steps", "5"]
    code, out, _ = cli("train", *args, "--json", "--no-progress", "--out", str(tmp_path))
    result = json.loads(out)
    assert code == 0 and result["ok"] and result["sync"] == "allreduce" and result["steps"] == 5
    assert read_result(tmp_path)["final_fingerprint"] == result["final_fingerprint"]


@pytest.mark.slow
def test_batchnorm_running_stats_are_reported_as_diverged(tmp_path, cli):
    """BatchNorm's running statistics are state too, and under DDP each rank updates them
    from its own micro-batches: the check must say so, naming the buffers, with exit 1."""
    args = ["--config", "configs/train/cnn.yaml", "--set", "model.norm=batch", "--nproc", "2", "--steps", "2"]
    # One run, read twice: its table as printed, and result.json (the object --json prints).
    code, out, _ = cli("train", *args, "--no-progress", "--out", str(tmp_path))
    result = read_result(tmp_path)
    assert code == 1 and not result["ok"] and not result["replicas_in_sync"]
    differing = result["first_divergence"]["differing"]
    assert differing and all(name.startswith("buffer/") and "running_" in name for name in differing)
    assert "running_mean" in result["replicas_summary"]
    # And why: DDP's normal per-forward broadcast (read from distshare's own DDP wrapper), in
    # result.json and on the table's "why" line.
    diagnosis = result["replicas_diagnosis"]
    assert diagnosis["cause"] == "buffers_only" and diagnosis["evidence"]["buffer_sync"] == "broadcast at every forward"
    assert result["first_divergence"]["diagnosis"] == diagnosis
    (why,) = [line for line in out.splitlines() if line.lstrip().startswith("why")]
    assert "buffers_only: " in why and "DDP's normal behaviour" in why and "Fix: " in why
    # The fix it names: buffers checked apart, everything else still checked (and in sync).
    separate = [*args, "--set", "check_buffers=separate"]
    code, out, _ = cli("train", *separate, "--json", "--no-progress", "--out", str(tmp_path / "separate"))
    result = json.loads(out)
    assert code == 0 and result["ok"] and result["first_divergence"] is None
    assert "4 buffer(s) differ at the last check (buffers_only), checked apart" in result["replicas_summary"]
