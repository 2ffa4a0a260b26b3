"""Claim: a Ray run shows and keeps what the other engines show and keep. Its driver draws
the progress bar, writes config.yaml at once and each metrics.jsonl row as it arrives (the
file grows while the run goes), and Ctrl-C ends it like any run: exit 130, "interrupted:
resume from ... with: distshare train ...", config.yaml and the rows so far on disk, and the
same reason in INCOMPLETE.

One real run on a local Ray the command starts itself (as a user's would), interrupted as a
terminal's Ctrl-C does: SIGINT to the whole process group. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ROOT, get_launch_command, subprocess_env
from small_split import SMALL_SPLIT

pytest.importorskip("ray")

START_S = 120.0  # Ray's start-up and the first window of rows: about 20 s on 2 busy cores
STOP_S = 60.0  # Ctrl-C to exit: stop the workers, shut Ray down


def _wait_for(what: str, ok: Callable[[], bool], proc: subprocess.Popen, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not ok():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {within_s:.0f} s")
        time.sleep(0.2)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


@contextlib.contextmanager
def _children_take_ctrl_c() -> Iterator[None]:
    """A process started inside gets SIGINT's default (KeyboardInterrupt) even where this one
    ignores it. A shell without job control starts a background job (`pytest ... &` in a
    script, some CI runners) with SIGINT ignored, and an ignored signal stays ignored across
    fork and exec: the driver would never see this test's Ctrl-C and would train on. A handler
    set here is reset to the default in the child at its exec."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _ignores_sigint(pid: int) -> bool:
    """Whether process `pid` ignores SIGINT (its SigIgn mask in /proc), False where unknown."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    return False


def _ended_or_where_it_waits(proc: subprocess.Popen, err: Path, within_s: float = STOP_S) -> str:
    """The driver's stdout once Ctrl-C has ended it. If it does not end within `within_s`, a
    failure that shows where each of its threads waits (faulthandler's dump on SIGABRT: the
    driver runs with PYTHONFAULTHANDLER=1) and what is left of its session, not a bare timeout."""
    try:
        return proc.communicate(timeout=within_s)[0]
    except subprocess.TimeoutExpired:
        session = "(ps is not available here)\n"
        with contextlib.suppress(OSError, subprocess.SubprocessError):  # a bare machine may lack ps
            ps = ["ps", "-o", "pid,ppid,stat,etime,args", "-s", str(proc.pid)]
            session = subprocess.run(ps, capture_output=True, text=True, timeout=10).stdout
        ignored = " It ignores SIGINT: it was started with SIGINT ignored." if _ignores_sigint(proc.pid) else ""
        proc.send_signal(signal.SIGABRT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=10)
        raise AssertionError(
            f"Ctrl-C did not end the driver within {within_s:.0f} s.{ignored} What is left of its session:\n"
            f"{session}\nIts stderr, ending with every thread's stack:\n{err.read_text()[-8000:]}"
        ) from None


@contextlib.contextmanager
def _driver(cmd: list[str], stderr_file: Path) -> Iterator[subprocess.Popen]:
    """`cmd` started as this test's driver: in a session of its own (a terminal's foreground
    job, so that SIGINT to its group is a Ctrl-C), with SIGINT's default, faulthandler on
    (SIGABRT prints every thread's stack), stderr into `stderr_file`. Its whole session is
    killed on the way out if it is still there."""
    with stderr_file.open("w") as stderr, _children_take_ctrl_c():
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=subprocess_env(PYTHONFAULTHANDLER="1"),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_S)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> dict:
    """A long Ray run, watched while it goes, then interrupted: what was seen, and its end."""
    tmp = tmp_path_factory.mktemp("ray-interrupt")
    out, ckpt, err = tmp / "run", tmp / "ckpt", tmp / "stderr.txt"
    args = ["train", "--engine", "ray", "--nproc", "2", *SMALL_SPLIT, "--steps", "100000"]
    args += ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "20", "--out", str(out)]
    metrics = out / "metrics.jsonl"
    seen: dict = {}
    with _driver([*get_launch_command(), *args], err) as proc:
        _wait_for("metrics.jsonl row", lambda: _lines(metrics) >= 1, proc, START_S)
        seen["first"] = _lines(metrics)
        _wait_for("more rows", lambda: _lines(metrics) > seen["first"] + 10, proc, START_S)
        seen["later"] = _lines(metrics)
        _wait_for("checkpoint", lambda: any(ckpt.glob("step-*")), proc, START_S)
        seen["stderr_while_running"] = err.read_text()
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground group
        stdout = _ended_or_where_it_waits(proc, err)
    return {"rc": proc.returncode, "stdout": stdout, "stderr": err.read_text(), "out": out, **seen}


@pytest.mark.launcher
@pytest.mark.slow
def test_ray_streams_metrics_and_progress_while_it_runs(interrupted):
    assert interrupted["later"] > interrupted["first"] >= 1  # rows appear as they run, not at the end
    shown = interrupted["stderr_while_running"]
    assert "ray: 2 Ray Train worker(s)" in shown
    assert "train:" in shown and "step/s" in shown, shown[-2000:]  # the bar, as under the other engines
    assert "loss=" in shown


@pytest.mark.launcher
@pytest.mark.slow
@pytest.mark.faults
def test_ray_ctrl_c_leaves_what_the_other_engines_leave(interrupted):
    out, err = interrupted["out"], interrupted["stderr"]
    assert interrupted["rc"] == 130, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("distshare: interrupted: resume from step-"), err[-3000:]
    assert " with: distshare train " in last and "--engine=ray" in last and "--resume=" in last
    assert "Traceback" not in err
    assert (out / "config.yaml").is_file()
    rows = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    assert len(rows) >= interrupted["later"]  # nothing that arrived was lost
    reason = (out / "INCOMPLETE").read_text().splitlines()[0]
    assert reason == last.removeprefix("distshare: ")
    assert not (out / "result.json").exists()


def test_a_driver_that_ignores_ctrl_c_fails_with_where_it_waits(tmp_path):
    # The mutant of the wait above: a driver stuck after Ctrl-C (here in a thread's sleep) must
    # fail the fixture with its stacks, so that a hang in CI explains itself.
    err = tmp_path / "stderr.txt"
    stuck = "import signal, threading, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    stuck += "threading.Thread(target=time.sleep, args=(60,)).start(); print('up', flush=True); time.sleep(60)"
    with _driver([sys.executable, "-c", stuck], err) as proc:
        assert proc.stdout.readline() == "up\n"
        os.killpg(proc.pid, signal.SIGINT)
        with pytest.raises(AssertionError, match="did not end the driver within 1 s") as failed:
            _ended_or_where_it_waits(proc, err, within_s=1.0)
    message = str(failed.value)
    assert "Fatal Python error: Aborted" in message and "Current thread" in message, message
    assert "It ignores SIGINT" in message, message  # the stuck driver set SIG_IGN itself
    assert message.count("Thread 0x") + message.count("Current thread") == 2, message  # both threads


def test_the_driver_takes_ctrl_c_even_where_the_tests_were_started_with_it_ignored():
    # As a shell without job control starts `pytest ... &`: SIGINT ignored in this process.
    # The control, a child started plainly, inherits the ignored signal (so the fixture's run
    # would train on through its Ctrl-C); one started as the fixture starts its driver does not.
    ask = [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"]
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        plain = subprocess.run(ask, capture_output=True, text=True, timeout=60)
        with _children_take_ctrl_c():
            fixed = subprocess.run(ask, capture_output=True, text=True, timeout=60)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert plain.stdout.strip() == "False", plain.stderr[-2000:]
    assert fixed.stdout.strip() == "True", fixed.stderr[-2000:]
    assert signal.getsignal(signal.SIGINT) is previous  # this process is left as it was
