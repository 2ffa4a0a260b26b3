"""Run by `tests/test_parallel_suite.py` through pytest itself (`-o python_files=probe_*.py`):
each test process writes what its torch and the processes it starts would use for threads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def _child_threads() -> int:
    # A process this test starts, as a CLI run or a launcher would be started.
    code = "import torch; print(torch.get_num_threads())"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_probe_threads():
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    record = {"worker": worker, "torch_threads": torch.get_num_threads(), "child_threads": _child_threads()}
    Path(os.environ["PROBE_OUT"], f"{worker}.json").write_text(json.dumps(record))


def test_probe_threads_again():  # a second test, so that both workers of `-n 2` get one
    test_probe_threads()
