"""Claim: a worker that dies mid-run costs time, not correctness. One rank is killed
(`os._exit`, no goodbye) right after step 12 of 20; the launcher restarts the workers
(`torchrun --max-restarts 1`, Ray Train's `FailureConfig(max_failures=1)`); they resume
from the newest verified checkpoint (step 10) and end with the bitwise final fingerprint of
a run that was never interrupted. The report says that a restart happened and from where.

Without a restart budget the same fault ends the run: the fault is real."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from small_split import SMALL_SPLIT

from distshare.testing.faults import fault_env

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.faults, pytest.mark.launcher, pytest.mark.slow]

# The run of tests/test_resume.py: 2 ranks, G = 16 = W 2 x k 2 x b 4, float64, 20 steps.
RUN = [
    *SMALL_SPLIT,
    "--steps",
    "20",
    "--check-every",
    "5",
    "--no-progress",
    "--json",
]
KILL = fault_env(exit_at="1:12")  # rank 1 dies right after step 12; the newest checkpoint then is step 10
CHECKPOINTS = ["--checkpoint-every", "5"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    for key in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(key, None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(cmd: list[str], timeout: float = 240, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=timeout)


def _json(proc: subprocess.CompletedProcess[str]) -> dict:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, f"expected one JSON line (rank 0 speaks): {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[0])


def _torchrun(*args: str) -> list[str]:
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    return [*([exe] if exe else [sys.executable, "-m", "torch.distributed.run"]), *args]


def _distshare(*args: str) -> list[str]:
    return [sys.executable, "-m", "distshare", *args]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = _run(_distshare("train", "--engine", "torch", "--nproc", "2", *RUN, "--out", str(out)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return _json(proc)


def _assert_restarted_and_exact(
    proc: subprocess.CompletedProcess[str], uninterrupted: dict, out: Path, says_so: bool = True
) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    if says_so:  # Ray keeps its workers' stderr to itself (log_to_driver=False); its count says it
        assert "fault injected: exiting after step 12" in proc.stderr  # the worker really died
    result = _json(proc)
    assert result["restarts"] == 1  # the workers really started twice
    assert result["resume"]["from_step"] == 10 and result["resume"]["restart"] == 1
    assert result["final_fingerprint"] == uninterrupted["final_fingerprint"]  # bitwise, as if never stopped
    assert result["losses"] == uninterrupted["losses"] and result["accounting"]["ok"]
    assert "restart 1 (the launcher restarted the workers): continued from step 10" in (out / "report.md").read_text()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(20))  # nothing lost, nothing twice
    return result


def test_torchrun_restarts_a_dead_worker_from_the_last_checkpoint(uninterrupted, tmp_path):
    out, ck = tmp_path / "out", tmp_path / "ckpt"
    cmd = _torchrun("--standalone", "--nproc_per_node", "2", "--max-restarts", "1", "-m", "distshare", "train")
    proc = _run([*cmd, *RUN, *CHECKPOINTS, "--checkpoint-dir", str(ck), "--out", str(out)], **KILL)
    result = _assert_restarted_and_exact(proc, uninterrupted, out)
    assert result["engine"] == "torch" and result["launcher"] == "torchrun"


def test_without_a_restart_budget_the_dead_worker_ends_the_run(tmp_path):
    cmd = _torchrun("--standalone", "--nproc_per_node", "2", "-m", "distshare", "train")
    proc = _run([*cmd, *RUN, *CHECKPOINTS, "--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path)], **KILL)
    assert proc.returncode != 0 and "fault injected: exiting after step 12" in proc.stderr
    assert not (tmp_path / "result.json").exists()  # no report claims a finished run


def test_ray_train_restarts_a_dead_worker_from_the_last_checkpoint(uninterrupted, tmp_path):
    pytest.importorskip("ray")
    out, ck = tmp_path / "out", tmp_path / "ckpt"
    args = ["train", "--engine", "ray", "--nproc", "2", "--max-failures", "1", *RUN, *CHECKPOINTS]
    proc = _run(_distshare(*args, "--checkpoint-dir", str(ck), "--out", str(out)), timeout=300, **KILL)
    result = _assert_restarted_and_exact(proc, uninterrupted, out, says_so=False)
    assert result["engine"] == "ray"


def test_a_spawned_checkpoint_resumes_under_torchrun_bitwise(uninterrupted, tmp_path):
    """Resume is exact across engines too: 10 steps on spawned ranks, 10 more under torchrun."""
    ck = tmp_path / "ckpt"
    first = _run(
        _distshare(
            "train", "--nproc", "2", *RUN, "--steps", "10", "--checkpoint-dir", str(ck), "--out", str(tmp_path / "a")
        )
    )
    assert first.returncode == 0, first.stderr[-2000:]
    cmd = _torchrun("--standalone", "--nproc_per_node", "2", "-m", "distshare", "train")
    proc = _run([*cmd, *RUN, "--checkpoint-dir", str(ck), "--resume", str(ck), "--out", str(tmp_path / "b")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = _json(proc)
    assert result["launcher"] == "torchrun" and result["resume"]["from_step"] == 10 and result["restarts"] == 0
    assert result["final_fingerprint"] == uninterrupted["final_fingerprint"]
