"""Claim: the suite runs on 2 cores as 2 pytest-xdist workers (the README's test command)
without oversubscribing them. Each worker, and every process it starts, takes its share of
the cores for torch's threads (`conftest.pytest_configure`); a serial run keeps torch's
default. Without the share, 2 workers on 2 cores kept 22% more CPU busy for the same tests
(`benchmarks/README.md`, "bench_cpu_use.py").

The mutant that fails this test: `pytest_configure` removed from `conftest.py` (each worker
then runs torch with every core's thread, as its children do).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, subprocess_env

pytest.importorskip("xdist")

PROBE = "tests/scripts/probe_threads.py"


def _clean_env() -> dict[str, str]:
    # The probe must not inherit this run's own worker setting or its thread share (the suite
    # may itself run under xdist).
    env = subprocess_env()
    for key in [k for k in env if k.startswith("PYTEST_XDIST") or k == "OMP_NUM_THREADS"]:
        del env[key]
    return env


def _default_threads() -> int:
    code = "import torch; print(torch.get_num_threads())"
    return int(subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True).stdout)


def _probe(tmp_path, *pytest_args: str) -> list[dict]:
    out = tmp_path / "probe"
    out.mkdir()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "python_files=probe_*.py", PROBE]
    env = {**_clean_env(), "PROBE_OUT": str(out)}
    proc = subprocess.run([*cmd, *pytest_args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]


@pytest.mark.slow
def test_two_workers_each_take_their_share_of_the_cores_and_so_do_their_children(tmp_path):
    share = max(1, (os.cpu_count() or 1) // 2)
    if share == _default_threads():
        pytest.skip(f"torch's default here is already {share} thread: no share to see")
    records = _probe(tmp_path, "-n", "2")
    assert {r["worker"] for r in records} == {"gw0", "gw1"}, records
    assert all(r["torch_threads"] == share and r["child_threads"] == share for r in records), records


@pytest.mark.slow
def test_a_serial_run_keeps_torch_s_default(tmp_path):
    (record,) = _probe(tmp_path)
    # The control: no workers, no share: torch's default, as a plain interpreter has it.
    assert record["worker"] == "main"
    assert record["torch_threads"] == record["child_threads"] == _default_threads(), record
