"""distshare's pytest plugin (registered as the `pytest11` entry point `distshare`).

Installed with distshare, it gives any project's test suite two fixtures:

- `distshare_run`: `distshare_run(fn, world_size=2, *args, **kwargs)` runs the module-level
  `fn(world, *args, **kwargs)` on simulated CPU ranks (real gloo groups) and returns each
  rank's result; a rank's failure fails the test with that rank's message;
- `distshare_timeout`: the bound (seconds) on every collective inside those ranks, 60 by
  default; override the fixture, or pass `--distshare-timeout S`.

Without the entry point (e.g. a source checkout), `pytest -p distshare.testing.pytest_plugin` loads it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("distshare")
    group.addoption(
        "--distshare-timeout",
        type=float,
        default=60.0,
        help="bound in seconds on every collective of distshare_run's simulated ranks (default 60)",
    )


@pytest.fixture
def distshare_timeout(request: pytest.FixtureRequest) -> float:
    return float(request.config.getoption("--distshare-timeout"))


@pytest.fixture
def distshare_run(distshare_timeout: float) -> Callable[..., list[Any]]:
    """Run a module-level function on N simulated ranks; every rank's return value, by rank."""

    # Imported here, not at plugin load: every pytest run in an environment with distshare
    # loads this plugin, and it should not pay for torch unless a test asks for ranks.
    from distshare.testing import run_distributed

    def run(fn: Callable[..., Any], world_size: int = 2, *args: Any, **kwargs: Any) -> list[Any]:
        kwargs.setdefault("timeout_s", distshare_timeout)
        kwargs.setdefault("deadline_s", 4 * distshare_timeout)
        return run_distributed(fn, world_size, *args, **kwargs)

    return run
