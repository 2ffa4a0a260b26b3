"""Claim: a run that fails leaves a record a person can act on. Its `INCOMPLETE` marker says why
it ended (hang, interrupted, error); `metrics.jsonl` holds every step that ran, also the ones
whose global loss was never reduced; an interrupt prints the exact command that resumes it, and
that command works; a launcher's restart continues the first attempt's run directory instead of
leaving an orphan; every file of a run directory gets the same permissions.

The interrupt is a real KeyboardInterrupt raised inside the training loop at a chosen step (this
module is loaded as a plugin of the loop, `DISTSHARE_PLUGINS`); the hang is real (a rank sleeps
in a gloo collective until the timeout, `distshare.testing.faults`).
"""

from __future__ import annotations

import json
import os
import shlex
import stat
from pathlib import Path

import pytest
import torch
from conftest import free_port, read_metrics
from small_split import SMALL_SPLIT

from distshare.report import INCOMPLETE, RUN_DIR_LINK
from distshare.training.loop import Component

INTERRUPT_ENV = "DISTSHARE_TEST_INTERRUPT_AT"  # "STEP": Ctrl-C arrives as step STEP starts (first attempt only)
SCALE_ENV = "DISTSHARE_TEST_SCALE_AT"  # "RANK:STEP": that rank's first weight x (1 + 1e-4) before STEP
RUN = [*SMALL_SPLIT, "--steps", "6", "--no-progress"]


class _CtrlC(Component):
    def __init__(self, step: int) -> None:
        self.step = step

    def before_step(self, loop, step: int) -> None:
        if step == self.step:
            raise KeyboardInterrupt


class _Scale(Component):
    """The mutant: one rank's replica drifts by a 1e-4 scale of one weight."""

    def __init__(self, step: int) -> None:
        self.step = step

    def before_step(self, loop, step: int) -> None:
        if step == self.step:
            with torch.no_grad():
                next(loop.run.model.parameters()).mul_(1 + 1e-4)


def distshare_components(cfg, world, attempt):  # the plugin hook: `DISTSHARE_PLUGINS=test_failure_records`
    out: list[Component] = []
    text = os.environ.get(INTERRUPT_ENV)
    if text and attempt == 0:
        out.append(_CtrlC(int(text)))
    rank, _, step = os.environ.get(SCALE_ENV, "").partition(":")
    if step and int(rank) == world.rank:
        out.append(_Scale(int(step)))
    return out


@pytest.fixture
def interrupt_at(monkeypatch):
    def arm(step: int | None) -> None:
        if step is None:
            monkeypatch.delenv(INTERRUPT_ENV, raising=False)
            return
        monkeypatch.setenv("DISTSHARE_PLUGINS", "test_failure_records")
        monkeypatch.setenv(INTERRUPT_ENV, str(step))

    return arm


@pytest.mark.slow
def test_an_interrupt_says_the_resume_command_and_that_command_resumes(cli, interrupt_at, tmp_path):
    ck, out = tmp_path / "ckpt", tmp_path / "run"
    interrupt_at(4)  # after step-000004 was written (every 2 steps)
    code, _, err = cli("train", *RUN, "--checkpoint-dir", str(ck), "--checkpoint-every", "2", "--out", str(out))
    assert code == 130
    (line,) = err.strip().splitlines()
    prefix = "distshare: interrupted: resume from step-000004 with: "
    assert line.startswith(prefix), line
    command = shlex.split(line.removeprefix(prefix))
    assert command[:2] == ["distshare", "train"] and f"--resume={ck}" in command
    marker = (out / INCOMPLETE).read_text()
    assert marker.startswith(line.removeprefix("distshare: ")), marker  # the marker says the same
    assert not (out / "result.json").exists()
    # The command it printed, run as printed, continues the run from step 4 to its end.
    interrupt_at(None)
    code, stdout, err = cli(*command[1:], "--json")
    assert code == 0, err
    result = json.loads(stdout.splitlines()[-1])
    assert result["resume"]["from_step"] == 4 and len(result["losses"]) == 6


def test_an_interrupt_without_checkpoints_says_there_is_nothing_to_resume(cli, interrupt_at, tmp_path):
    interrupt_at(3)
    code, _, err = cli("train", *RUN, "--out", str(tmp_path))
    assert code == 130
    assert err.strip() == (
        "distshare: interrupted: no checkpoint was written (no --checkpoint-dir): "
        "give --checkpoint-dir DIR to make a run resumable"
    )
    # Steps 0..2 ran inside the loss log's first window: their rows are there, loss unknown.
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["loss"] is None and "unreduced" in r and r["global_items"] > 0 for r in rows)


@pytest.mark.faults
@pytest.mark.slow
def test_a_hang_is_named_in_the_marker_and_the_steps_before_it_are_in_the_metrics(hung_run):
    # conftest's run (shared with test_hang.py): `distshare train --nproc 2 --steps 6 --timeout 3`,
    # rank 1 sleeping at the start of step 3.
    out = hung_run["out"]
    assert hung_run["code"] == 1 and hung_run["timeout"] == 3
    marker = (out / INCOMPLETE).read_text()
    assert marker.splitlines()[0] == "hang: rank 1 went silent at step 3 (no answer within 3 s)", marker
    rows = read_metrics(out)  # was a 0-byte file: steps 0..2 had run
    assert [r["step"] for r in rows] == [0, 1, 2] and all(r["loss"] is None for r in rows)


def test_an_error_is_named_in_the_marker(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("DISTSHARE_PLUGINS", "no_such_plugin_module")  # found inside the engine, after the run began
    code, _, err = cli("train", *RUN, "--out", str(tmp_path))
    assert code == 2
    first = (tmp_path / INCOMPLETE).read_text().splitlines()[0]
    assert first.startswith("bad input: DISTSHARE_PLUGINS: cannot import no_such_plugin_module"), first


def test_a_restarted_attempt_continues_the_first_attempts_run_directory(cli, interrupt_at, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no --out: runs/train-<time>, as a user who gives none gets
    ck = tmp_path / "ckpt"
    args = ["train", *RUN, "--checkpoint-dir", str(ck), "--checkpoint-every", "2"]
    interrupt_at(4)
    assert cli(*args)[0] == 130
    (first,) = (tmp_path / "runs").iterdir()
    assert (ck / RUN_DIR_LINK).read_text().strip() == str(first.resolve())
    # The launcher's restart of the same command: what torchrun sets for a worker it restarted
    # (a world of one here, a real gloo group; tests/test_restart.py restarts under torchrun itself).
    interrupt_at(None)
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "TORCHELASTIC_RESTART_COUNT": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setattr("time.strftime", lambda fmt, *a: "20991231-235959" if "%H%M%S" in fmt else "then")
    code, stdout, err = cli(*args, "--json")
    assert code == 0, err
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [first.name]  # no second, no orphan
    result = json.loads((first / "result.json").read_text())
    assert result["resume"]["from_step"] == 4 and result["restarts"] == 1
    assert not (first / INCOMPLETE).exists()
    assert [r["step"] for r in read_metrics(first)] == list(range(6))


def test_every_file_of_a_run_directory_has_the_same_permissions(cli, tmp_path):
    code, _, err = cli("train", *RUN, "--steps", "2", "--out", str(tmp_path))
    assert code == 0, err
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in Path(tmp_path).iterdir()}
    assert {"report.md", "result.json", "config.yaml", "metrics.jsonl"} <= set(modes)
    assert modes["result.json"] == modes["report.md"] == modes["config.yaml"], modes  # were 0600 vs 0644
    assert len(set(modes.values())) == 1, modes


# ---------------------------------------------------------------- what the checkpoint commands say


@pytest.fixture(scope="module")
def every_rank(tmp_path_factory) -> Path:
    """2 spawned ranks, 4 steps, a checkpoint every 2, each rank writing its replica too; rank 1's
    replica scaled by 1 + 1e-4 before step 3: identical replicas at step-000002, not at step-000004."""
    ck = tmp_path_factory.mktemp("every_rank") / "ckpt"
    mp = pytest.MonkeyPatch()
    mp.setenv("DISTSHARE_PLUGINS", "test_failure_records")
    mp.setenv(SCALE_ENV, "1:3")
    try:
        from distshare.cli import main

        args = ["train", "--nproc", "2", *SMALL_SPLIT, "--steps", "4", "--check-every", "0", "--no-progress"]
        args += ["--checkpoint-dir", str(ck), "--checkpoint-every", "2", "--save-every-rank", "--out", str(ck.parent)]
        assert main(args) == 1  # the mutant is caught: replicas diverged
    finally:
        mp.undo()
    return ck


@pytest.mark.slow
def test_save_every_rank_writes_each_ranks_replica_and_compare_tells_them_apart(cli, every_rank):
    ck = every_rank
    assert sorted(p.name for p in (ck / "rank1").iterdir()) == ["step-000002", "step-000004"]
    code, out, err = cli("compare", str(ck / "rank0" / "step-000002"), str(ck / "rank1" / "step-000002"))
    assert code == 0 and "identical" in out.splitlines()[-1], out + err  # before the mutant: one state
    code, out, _ = cli("compare", str(ck / "rank0" / "step-000004"), str(ck / "rank1" / "step-000004"))
    assert code == 1 and "differ" in out.splitlines()[-1], out  # rank 1's own replica, not a copy of rank 0's


@pytest.mark.slow
def test_checksum_says_the_steps_its_name_says(cli, every_rank):
    code, out, _ = cli("checksum", str(every_rank / "step-000004"))
    assert code == 0
    assert out.splitlines()[0].startswith(f"{every_rank / 'step-000004'}  (after 4 steps (0..3), "), out
    code, out, _ = cli("checksum", "--json", str(every_rank / "step-000002"))
    assert json.loads(out)["checkpoints"][0]["steps_done"] == 2


@pytest.mark.slow
def test_compare_names_the_sides_in_order(cli, every_rank):
    # Two checkpoints of one run: A's loss history holds 2 steps, B's 4; A is said first.
    code, out, _ = cli("compare", str(every_rank / "step-000002"), str(every_rank / "step-000004"))
    assert code == 1
    (line,) = [r for r in out.splitlines() if r.strip().startswith("run/losses")]
    assert line.split(None, 2)[2] == "A float64 [2], B float64 [4]", line


def test_save_every_rank_needs_a_checkpoint_dir(cli):
    code, _, err = cli("train", "--save-every-rank", "--steps", "1")
    assert code == 2
    assert err.strip() == (
        "distshare: error: --save-every-rank writes into the checkpoint directory: give --checkpoint-dir DIR too"
    )
