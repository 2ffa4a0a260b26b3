"""Helpers for users' own tests: run a function on N simulated CPU ranks (real gloo groups),
and assert that every rank holds the same training state.

    from distshare.testing import assert_replicas_in_sync, run_distributed

    def check(world):                       # module-level: ranks are fresh processes
        model = build_my_model()
        ...train a few steps under DDP...
        assert_replicas_in_sync(model, optimizer)   # a collective: every rank calls it
        return True

    def test_my_ddp_loop():
        assert run_distributed(check, world_size=2) == [True, True]

`assert_replicas_in_sync` raises `ReplicaDivergenceError` on every rank when any tensor of
the state (parameters, buffers, optimizer state) differs; its message names the tensors,
the ranks and the first differing element. A rank's error reaches the test as a
`RankError` carrying that message. The same helpers are pytest fixtures too
(`distshare_run`, see `distshare.testing.pytest_plugin`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from distshare.distributed import spawn
from distshare.distributed.world import World
from distshare.equivalence import assert_accumulation_equivalent
from distshare.errors import RankError
from distshare.integrity.replicas import (
    ReplicaDivergenceError,
    ReplicaReport,
    assert_replicas_in_sync,
    compare_replicas,
)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    *args: Any,
    timeout_s: float = 60.0,
    deadline_s: float | None = 300.0,
    **kwargs: Any,
) -> list[Any]:
    """Run `fn(world, *args, **kwargs)` on `world_size` CPU ranks; each rank's return value.

    `timeout_s` bounds every collective inside the ranks; `deadline_s` the whole run, so a
    test never hangs (a test suite's defaults: tighter than `distshare.distributed.spawn`'s).
    """
    return spawn.run_distributed(fn, world_size, *args, timeout_s=timeout_s, deadline_s=deadline_s, **kwargs)


__all__ = [
    "RankError",
    "ReplicaDivergenceError",
    "ReplicaReport",
    "World",
    "assert_accumulation_equivalent",
    "assert_replicas_in_sync",
    "compare_replicas",
    "run_distributed",
]
