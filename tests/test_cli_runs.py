"""Claim: `distshare verify` (the main job) and `distshare train` run end to end, write
results that can be read again, and say OK only when every check holds."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distshare.cli import main
from distshare.commands.verify import _checks
from distshare.config import load_config
from distshare.data import build_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def verified(tmp_path_factory):
    out = tmp_path_factory.mktemp("verify")
    proc = subprocess.run(
        [sys.executable, "-m", "distshare", "verify", "--json", "--no-progress", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    return proc, out


def test_verify_passes_and_says_so_in_json(verified):
    proc, _ = verified
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
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
    # The headline number is the final parameters' measured difference, finite (a NaN would
    # compare false everywhere), and zero exactly when the states are bitwise equal.
    final = sp["final_params"]
    assert result["max_abs_diff_vs_single_process"] == final["max_abs_diff"]
    assert math.isfinite(final["max_abs_diff"]) and math.isfinite(final["norm_rel_diff"])
    assert result["bitwise_equal_to_single_process"] == final["bitwise_equal"] == (final["max_abs_diff"] == 0.0)
    # The equivalence is reported as measured, with the bound beside it.
    assert sp["step0_grads"]["bitwise_equal"] or sp["step0_grads"]["norm_rel_diff"] <= sp["rounding_bound"]


def test_verify_writes_files_that_read_back(verified):
    _, out = verified
    result = json.loads((out / "result.json").read_text())
    assert result["ok"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(result["steps"]))
    assert all(r["replicas_in_sync"] for r in rows)
    assert "Verdict: **OK**" in (out / "report.md").read_text()
    assert (out / "loss.png").stat().st_size > 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["plan"]["world_size"] == 2
    reloaded = load_config(out / "config.yaml")  # the resolved config is a valid config
    assert reloaded.plan.resolve().micro_batch == config["plan"]["micro_batch"]


def test_verify_prints_one_verdict_line(tmp_path, capsys):
    code = main(["verify", "--no-progress", "--out", str(tmp_path), "--set", "steps=4", "--nproc", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and lines[-1].startswith("distshare verify: OK")
    assert "3 ranks" in lines[-1]


def test_train_on_cnn_with_allreduce(tmp_path, capsys):
    code = main(
        [
            "train",
            "--config",
            "configs/train/cnn.yaml",
            "--nproc",
            "2",
            "--sync",
            "allreduce",
            "--steps",
            "5",
            "--json",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["ok"] and result["sync"] == "allreduce" and result["steps"] == 5
    assert (tmp_path / "result.json").exists()


def test_the_equivalence_check_can_fail(verified):
    """A gradient twice too large (dividing by W one time too few) must fail check 4."""
    from distshare.commands.verify import FirstStepProbe
    from distshare.distributed.world import World
    from distshare.training import train

    cfg = load_config(None, ["plan.global_batch=12", "plan.accum_steps=1", "steps=2", "model.dtype=float64"])
    good = train(cfg, World(), progress=False, keep_state=True, components=[FirstStepProbe()])
    doubled = {k: 2 * v for k, v in FirstStepProbe.of(good)["grads"].items()}
    bad = dataclasses.replace(good, extras={FirstStepProbe.KEY: {**FirstStepProbe.of(good), "grads": doubled}})
    summary = {
        "replicas_in_sync": True,
        "replicas_summary": "",
        "accounting": {"ok": True, "summary": ""},
        "plan": {"global_batch": 12},
    }
    _, info = build_dataset(cfg.data)
    assert _checks(cfg, [good], good, summary, info)[3]["ok"]
    assert not _checks(cfg, [bad], good, summary, info)[3]["ok"]


def test_batchnorm_running_stats_are_reported_as_diverged(tmp_path, capsys):
    """BatchNorm's running statistics are state too, and under DDP each rank updates them
    from its own micro-batches: the check must say so, naming the buffers, with exit 1."""
    code = main(
        [
            "train",
            "--config",
            "configs/train/cnn.yaml",
            "--set",
            "model.norm=batch",
            "--nproc",
            "2",
            "--steps",
            "2",
            "--json",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert code == 1 and not result["ok"] and not result["replicas_in_sync"]
    differing = result["first_divergence"]["differing"]
    assert differing and all(name.startswith("buffer/") and "running_" in name for name in differing)
    assert "running_mean" in result["replicas_summary"]
