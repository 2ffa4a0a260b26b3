"""Claim: the same `distshare train` runs unchanged under torchrun, as a real subprocess,
on one machine and as two "nodes" on localhost, and the ranks agree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.launcher


def _env() -> dict[str, str]:
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", HF_HUB_OFFLINE="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def test_torchrun_standalone_two_ranks(tmp_path):
    cmd = _torchrun() + [
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "distshare",
        "train",
        "--config",
        "configs/train/transformer.yaml",
        "--steps",
        "6",
        "--json",
        "--no-progress",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, "only rank 0 speaks"
    result = json.loads(lines[0])
    assert result["engine"] == "torch" and result["launcher"] == "torchrun" and result["world_size"] == 2
    assert result["replicas_in_sync"] and result["accounting"]["ok"]
    assert len(set(result["final_fingerprints_by_rank"])) == 1
    assert json.loads((tmp_path / "result.json").read_text())["final_fingerprint"] == result["final_fingerprint"]


def test_torchrun_two_nodes_on_localhost(tmp_path):
    proc = subprocess.run(
        [
            "bash",
            "launch/torchrun_cpu.sh",
            "two-nodes",
            "--steps",
            "4",
            "--json",
            "--no-progress",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    assert result["world_size"] == 2 and result["replicas_in_sync"]
