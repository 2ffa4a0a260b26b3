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
the state (parameters, buffers, optimizer state) differs; its message starts with the likely
cause and its fix (`report.diagnosis`), then names the tensors, the ranks and the first
differing element. Call it once before training too (the starting point), and with
`grads=True` right after `optimizer.step()`; or let `distshare.watch(model, optimizer)` place
the checks. On an FSDP2 / HSDP model the same calls compare each shard with its copies in
the other replica groups; `assert_sharded_init(model, expected=...)` checks the initial
state itself, against a digest computed in one process. A rank's error reaches the test as a
`RankError` carrying that message. The same helpers are pytest fixtures too
(`distshare_run`, see `distshare.testing.pytest_plugin`).

Also here, for distshare's own tests: `distshare.testing.faults` (fault injection: in-process
faults, and a plugin that makes launched ranks die or hang). No production module imports it.
"""

from __future__ import annotations

from distshare.distributed.spawn import run_distributed
from distshare.distributed.world import World
from distshare.equivalence import LoopContext, LoopResult, assert_accumulation_equivalent, assert_loop_equivalent
from distshare.errors import RankError
from distshare.integrity.data_parallel import DataParallelReport, NotDataParallelError, assert_data_parallel
from distshare.integrity.replicas import (
    ReplicaDivergenceError,
    ReplicaReport,
    assert_replicas_in_sync,
    compare_replicas,
)
from distshare.integrity.sharded_init import InitMismatchError, InitReport, assert_sharded_init, check_sharded_init

__all__ = [
    "DataParallelReport",
    "InitMismatchError",
    "InitReport",
    "NotDataParallelError",
    "assert_data_parallel",
    "RankError",
    "ReplicaDivergenceError",
    "ReplicaReport",
    "World",
    "LoopContext",
    "LoopResult",
    "assert_accumulation_equivalent",
    "assert_loop_equivalent",
    "assert_replicas_in_sync",
    "assert_sharded_init",
    "check_sharded_init",
    "compare_replicas",
    "run_distributed",
]
