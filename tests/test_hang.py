"""Claim: a rank that stops taking part makes the others fail within the configured timeout,
with one line that names the silent rank and the step: for spawned ranks, through the CLI,
and under torchrun. Never an endless wait, and the run directory says it is incomplete.

The hang is real: the faulty rank sleeps forever at the start of step N
(`DISTSHARE_FAULT_HANG=RANK:STEP`, distshare.testing.faults); its peers block in a real gloo
collective until the process group's timeout, then check in at the store and name it.
"""

from __future__ import annotations

import time

import pytest
from conftest import get_launch_command, run_command

from distshare.distributed import watchdog
from distshare.distributed.spawn import run_distributed
from distshare.distributed.world import World
from distshare.errors import RankSilent
from distshare.testing.faults import HANG_ENV, fault_env, hang, hang_point

TIMEOUT = 3  # seconds: every collective's bound in these runs
# Start-up of 2-3 ranks on 2 busy cores, plus the timeout, plus the check-in grace: the
# whole failure must fit in this, with room, or something waited that should not have.
BOUND_S = 60


@pytest.mark.faults
@pytest.mark.slow
def test_the_cli_names_the_silent_rank_and_marks_the_run_incomplete(hung_run):
    # conftest's run (shared with test_failure_records.py): `distshare train --nproc 2 --steps 6
    # --timeout 3` in this process, rank 1 stopping at step 3.
    code, err, wall, run = hung_run["code"], hung_run["err"], hung_run["wall"], hung_run["out"]
    assert hung_run["timeout"] == TIMEOUT
    assert code == 1
    line = f"distshare: error: rank 1 went silent at step 3 (no answer within {TIMEOUT} s)"
    assert err.strip().splitlines() == [line]
    assert TIMEOUT <= wall < BOUND_S, wall  # it waited for the timeout, and not much longer
    # The run failed: its directory must not look complete.
    assert (run / "INCOMPLETE").is_file()
    assert not (run / "result.json").exists() and not (run / "report.md").exists()


@pytest.mark.faults
@pytest.mark.slow
def test_rank_0_going_silent_is_named_by_the_next_rank():
    # Rank 0 usually speaks; here it is the silent one, so rank 1 reports for the survivors.
    start = time.monotonic()
    with pytest.raises(RankSilent) as info:
        run_distributed(hang, 3, faulty_rank=0, inject_at=2, timeout_s=TIMEOUT)
    assert (info.value.ranks, info.value.step) == ([0], 2)
    assert str(info.value) == f"rank 0 went silent at step 2 (no answer within {TIMEOUT} s)"
    assert time.monotonic() - start < BOUND_S


def _returns_except_rank_one(world: World) -> int:
    if world.rank == 1:
        time.sleep(600)  # after the last collective: nothing left in which a peer could time out
    return world.rank


@pytest.mark.faults
@pytest.mark.slow
def test_a_rank_silent_after_its_peers_returned_is_named_by_the_parent():
    start = time.monotonic()
    with pytest.raises(RankSilent, match="rank 1 went silent after the other ranks returned"):
        run_distributed(_returns_except_rank_one, 2, timeout_s=2)
    assert time.monotonic() - start < 30


def test_only_collective_failures_are_explained():
    # A mistake in user code is not a hang, whatever world is being watched.
    watchdog.watch(0, 2, timeout_s=1.0)
    try:
        err = ValueError("Timed out thinking")
        assert watchdog.explain(err) is err
        assert watchdog.is_collective_failure(RuntimeError("Timed out waiting 3000ms for recv operation"))
        assert not watchdog.is_collective_failure(RuntimeError("shape mismatch"))
    finally:
        watchdog.forget()


@pytest.mark.parametrize("text", ["", "1", "a:3", "1:-2", "1:3:4"])
def test_a_malformed_hang_switch_hangs_nothing(monkeypatch, text):
    monkeypatch.setenv(HANG_ENV, text)
    assert hang_point() is None


def _launch(launcher: str) -> list[str]:
    """`distshare train` on 2 ranks under a real launcher."""
    if launcher == "torchrun":
        return [*get_launch_command("torchrun"), "train"]
    if launcher == "accelerate":
        return [*get_launch_command("accelerate"), "train", "--engine", "accelerate"]
    return [*get_launch_command(), "train", "--engine", "ray", "--nproc", "2"]


@pytest.mark.faults
@pytest.mark.launcher
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate", "ray"])
def test_every_launcher_names_the_silent_rank(tmp_path, launcher):
    env = fault_env(hang_at="1:3")
    cmd = _launch(launcher) + ["--config", "configs/train/transformer.yaml", "--steps", "6", "--timeout", str(TIMEOUT)]
    cmd += ["--no-progress", "--out", str(tmp_path)]
    start = time.monotonic()
    proc = run_command(cmd, timeout=180, **env)
    wall = time.monotonic() - start
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("distshare:")]
    # One line from us (rank 0 under torchrun and accelerate, the driver under Ray); the
    # rest of stderr is the launcher's own account of the failed worker.
    assert len(ours) == 1, proc.stderr[-3000:]
    assert ours[0].endswith(f"rank 1 went silent at step 3 (no answer within {TIMEOUT} s)"), proc.stderr[-3000:]
    assert wall < BOUND_S + (60 if launcher == "ray" else 0)  # Ray's own start-up is about 15 s
    assert (tmp_path / "INCOMPLETE").is_file() and not (tmp_path / "result.json").exists()
