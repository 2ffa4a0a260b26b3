"""Claim: a worker that dies mid-run costs time, not correctness. One rank is killed
(`os._exit`, no goodbye) right after step 12 of 20; the launcher restarts the workers
(`torchrun --max-restarts 1`, Ray Train's `FailureConfig(max_failures=1)`); they resume
from the newest verified checkpoint (step 10) and end with the bitwise final fingerprint of
a run that was never interrupted. The report says that a restart happened and from where.

Without a restart budget the same fault ends the run: the fault is real."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import get_launch_command, rank0_json, read_metrics, run_command
from small_split import SMALL_SPLIT

from distshare.testing.faults import fault_env

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


def _distshare(*args: str) -> list[str]:
    return [*get_launch_command(), *args]


@pytest.fixture(scope="module")
def uninterrupted(twenty_steps_straight) -> dict:
    """RUN on 2 spawned ranks, never interrupted (conftest's run, shared with test_resume.py)."""
    return twenty_steps_straight


def _assert_restarted_and_exact(
    proc: subprocess.CompletedProcess[str], uninterrupted: dict, out: Path, says_so: bool = True
) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    if says_so:  # Ray keeps its workers' stderr to itself (log_to_driver=False); its count says it
        assert "fault injected: exiting after step 12" in proc.stderr  # the worker really died
    result = rank0_json(proc)
    assert result["restarts"] == 1  # the workers really started twice
    assert result["resume"]["from_step"] == 10 and result["resume"]["restart"] == 1
    assert result["final_fingerprint"] == uninterrupted["final_fingerprint"]  # bitwise, as if never stopped
    assert result["losses"] == uninterrupted["losses"] and result["accounting"]["ok"]
    assert "restart 1 (the launcher restarted the workers): continued from step 10" in (out / "report.md").read_text()
    steps = [row["step"] for row in read_metrics(out)]
    assert steps == list(range(20))  # nothing lost, nothing twice
    return result


def test_torchrun_restarts_a_dead_worker_from_the_last_checkpoint(uninterrupted, tmp_path):
    ck = tmp_path / "ckpt"
    cmd = [*get_launch_command("torchrun", max_restarts=1), "train"]
    # No --out: each attempt's rank 0 picks runs/train-<time>; the restarted one must continue the first's.
    proc = run_command([*cmd, *RUN, *CHECKPOINTS, "--checkpoint-dir", str(ck)], cwd=tmp_path, **KILL)
    runs = sorted((tmp_path / "runs").iterdir()) if (tmp_path / "runs").is_dir() else []
    assert len(runs) == 1, f"{runs}: the first attempt's run directory was left behind\n{proc.stderr[-2000:]}"
    out = runs[0]
    result = _assert_restarted_and_exact(proc, uninterrupted, out)
    assert not (out / "INCOMPLETE").exists() and result["run_dir"].endswith(out.name)
    assert result["engine"] == "torch" and result["launcher"] == "torchrun"


def test_without_a_restart_budget_the_dead_worker_ends_the_run(tmp_path):
    cmd = [*get_launch_command("torchrun"), "train"]
    args = [*RUN, *CHECKPOINTS, "--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path)]
    proc = run_command([*cmd, *args], **KILL)
    assert proc.returncode != 0 and "fault injected: exiting after step 12" in proc.stderr
    assert not (tmp_path / "result.json").exists()  # no report claims a finished run


def test_ray_train_restarts_a_dead_worker_from_the_last_checkpoint(uninterrupted, tmp_path):
    pytest.importorskip("ray")
    out, ck = tmp_path / "out", tmp_path / "ckpt"
    args = ["train", "--engine", "ray", "--nproc", "2", "--max-failures", "1", *RUN, *CHECKPOINTS]
    proc = run_command(_distshare(*args, "--checkpoint-dir", str(ck), "--out", str(out)), timeout=300, **KILL)
    result = _assert_restarted_and_exact(proc, uninterrupted, out, says_so=False)
    assert result["engine"] == "ray"


def test_a_spawned_checkpoint_resumes_under_torchrun_bitwise(uninterrupted, tmp_path):
    """Resume is exact across engines too: 10 steps on spawned ranks, 10 more under torchrun."""
    ck = tmp_path / "ckpt"
    first = run_command(
        _distshare(
            "train", "--nproc", "2", *RUN, "--steps", "10", "--checkpoint-dir", str(ck), "--out", str(tmp_path / "a")
        )
    )
    assert first.returncode == 0, first.stderr[-2000:]
    cmd = [*get_launch_command("torchrun"), "train"]
    proc = run_command([*cmd, *RUN, "--checkpoint-dir", str(ck), "--resume", str(ck), "--out", str(tmp_path / "b")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = rank0_json(proc)
    assert result["launcher"] == "torchrun" and result["resume"]["from_step"] == 10 and result["restarts"] == 0
    assert result["final_fingerprint"] == uninterrupted["final_fingerprint"]
