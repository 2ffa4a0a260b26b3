"""Claim: the same `distshare train` runs unchanged under torchrun, as a real subprocess,
on one machine and as two "nodes" on localhost, and the ranks agree."""

from __future__ import annotations

import pytest
from conftest import get_launch_command, rank0_json, read_result, run_command

pytestmark = [pytest.mark.launcher, pytest.mark.slow]  # every test here starts torchrun


def test_torchrun_standalone_two_ranks(tmp_path):
    cmd = get_launch_command("torchrun", nproc_per_node=2)
    cmd += ["train", "--config", "configs/train/transformer.yaml", "--steps", "6", "--json", "--no-progress"]
    proc = run_command([*cmd, "--out", str(tmp_path)], timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = rank0_json(proc)  # only rank 0 speaks
    assert result["engine"] == "torch" and result["launcher"] == "torchrun" and result["world_size"] == 2
    assert result["replicas_in_sync"] and result["accounting"]["ok"]
    assert len(set(result["final_fingerprints_by_rank"])) == 1
    assert read_result(tmp_path)["final_fingerprint"] == result["final_fingerprint"]


def test_torchrun_two_nodes_on_localhost(tmp_path):
    # The launch script itself: it starts two torchrun "nodes" on a free port.
    script = ["bash", "launch/torchrun_cpu.sh", "two-nodes", "--steps", "4", "--json", "--no-progress"]
    proc = run_command([*script, "--out", str(tmp_path)], timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = rank0_json(proc)
    assert result["world_size"] == 2 and result["replicas_in_sync"]
    assert read_result(tmp_path)["final_fingerprint"] == result["final_fingerprint"]
