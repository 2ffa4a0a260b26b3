"""Claim: the suite runs on 2 cores as 2 pytest-xdist workers (the README's test command)
without oversubscribing them. Each worker, and every process it starts, takes its share of
the cores for torch's threads (`conftest.take_this_workers_share_of_the_cores`); a serial run
keeps torch's default. Without the share, 2 workers on 2 cores kept 22% more CPU busy for the
same tests (`benchmarks/README.md`, "bench_cpu_use.py").

The mutants that fail these tests: the share computed wrong, or set for torch but not exported
to the children (the first test); the hook taken out of `conftest.pytest_configure` (the
second, under `-n 2`: each worker then runs torch with every core's thread).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import OMP_NUM_THREADS_GIVEN, take_this_workers_share_of_the_cores


def test_two_workers_each_take_half_the_cores_and_a_serial_run_keeps_torch_s_default(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "1")  # the control: serial, nothing changes
        assert take_this_workers_share_of_the_cores() is None
        assert torch.get_num_threads() == before and "OMP_NUM_THREADS" not in os.environ
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
        share = max(1, (os.cpu_count() or 1) // 2)
        assert take_this_workers_share_of_the_cores() == share == torch.get_num_threads()
        assert os.environ.get("OMP_NUM_THREADS") == str(share)  # what the worker's children inherit
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the developer's own setting wins
        assert take_this_workers_share_of_the_cores() == 3
    finally:
        torch.set_num_threads(before)


def test_this_worker_runs_with_its_share():
    # The hook as pytest ran it in this process. CI runs the suite as 2 workers (README), so
    # there this is a real xdist worker; a serial run has no share to check. (A pytest -n 2 of
    # its own here would cost 12 s of CPU to show the same.)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        pytest.skip("not an xdist worker: a serial run keeps torch's default")
    given = os.environ.get("OMP_NUM_THREADS")  # the hook's, or the developer's own, which wins
    assert given is not None, "no share: this worker's children would run torch on every core"
    share = int(given)
    assert torch.get_num_threads() == share
    if OMP_NUM_THREADS_GIVEN is None:
        assert share == max(1, (os.cpu_count() or 1) // workers)
