"""The scenario runner the launched integration scripts share (`trainer_ddp.py`, `lightning_ddp.py`).

Each scenario trains once; rank 0 prints one JSON row per scenario for the test to read. The
last scenario runs as a user's script would: a divergence ends the run (a non-zero exit).
Imported by name: a launched script's own folder is first on `sys.path`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from distshare import ReplicaDivergenceError


def run_scenarios(train: Callable[[str, str], Any], scenarios: list[str], out: str) -> None:
    """`train(scenario, out)` for each scenario -> the callback it trained with; one row each."""
    for i, scenario in enumerate(scenarios):
        start = time.perf_counter()
        if i == len(scenarios) - 1:  # as a user's script: a divergence ends the run
            check, error = train(scenario, out), None
        else:
            try:
                check, error = train(scenario, out), None
            except ReplicaDivergenceError as exc:
                check, error = None, exc
        if torch.distributed.get_rank() == 0:
            row = {
                "scenario": scenario,
                "world_size": torch.distributed.get_world_size(),
                "in_sync": error is None and check.watcher.in_sync,
                "checks": check.watcher.checks if check else None,
                "error": str(error) if error else None,
                "cause": str(error.report.diagnosis.cause) if error and error.report.diagnosis else None,
                "seconds": round(time.perf_counter() - start, 2),
            }
            sys.stdout.write(json.dumps(row) + "\n")  # one write: the line arrives whole, whoever else prints
            sys.stdout.flush()
