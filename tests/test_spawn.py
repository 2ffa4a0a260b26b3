"""Claim: simulated ranks never hang the caller: a failing rank is re-raised with its rank,
a rank that dies is noticed, and a rank that stops taking part makes its peers time out."""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch
import torch.distributed as dist

from distshare.distributed.spawn import START_METHODS, run_distributed, start_context
from distshare.distributed.world import World
from distshare.errors import DistshareError, RankError, RankSilent, UsageError


def _sum_of_ranks(world: World) -> float:
    t = torch.tensor([float(world.rank)])
    dist.all_reduce(t)
    return float(t)


def _fail_on_rank_one(world: World) -> None:
    if world.rank == 1:
        raise ValueError("boom on purpose")
    dist.barrier()


def _die_on_rank_one(world: World) -> None:
    if world.rank == 1:
        os._exit(3)
    dist.barrier()


def _rank_one_goes_silent(world: World) -> None:
    if world.rank == 1:
        time.sleep(60)  # never joins the collective below
    dist.all_reduce(torch.ones(1))


def _hang_forever(world: World) -> None:
    time.sleep(600)


def test_results_come_back_by_rank():
    assert run_distributed(_sum_of_ranks, 3, timeout_s=30) == [3.0, 3.0, 3.0]


@pytest.mark.faults
def test_an_exception_is_reraised_with_its_rank():
    with pytest.raises(RankError) as info:
        run_distributed(_fail_on_rank_one, 2, timeout_s=10)
    assert info.value.rank == 1 and "boom on purpose" in str(info.value)
    assert "ValueError" in info.value.traceback_text


@pytest.mark.faults
def test_a_dead_rank_is_noticed_and_named():
    start = time.monotonic()
    with pytest.raises(DistshareError) as info:
        run_distributed(_die_on_rank_one, 2, timeout_s=10)
    err = info.value
    # Rank 1 died; rank 0, left alone in the barrier, is not to blame. Either the parent saw
    # rank 1 go (its exit code says how), or rank 0's watchdog named it as the silent peer.
    if isinstance(err, RankError):
        assert err.rank == 1 and "exited with code 3" in str(err), str(err)
    else:
        assert isinstance(err, RankSilent) and err.ranks == [1], f"{type(err).__name__}: {err}"
    assert time.monotonic() - start < 30  # noticed, not waited out


@pytest.mark.faults
@pytest.mark.slow
def test_a_silent_rank_makes_the_others_time_out():
    start = time.monotonic()
    with pytest.raises(RankSilent) as info:
        run_distributed(_rank_one_goes_silent, 2, timeout_s=3)
    assert info.value.ranks == [1]  # rank 0 waited in the all-reduce, gave up, and names rank 1
    assert time.monotonic() - start < 45


@pytest.mark.faults
@pytest.mark.slow
def test_the_deadline_bounds_a_hang_outside_collectives():
    start = time.monotonic()
    with pytest.raises(DistshareError, match="no result within"):
        run_distributed(_hang_forever, 2, timeout_s=5, deadline_s=8)
    assert time.monotonic() - start < 30


def _what_the_rank_sees(world: World) -> tuple[str | None, str, str]:
    # One write per line: two ranks printing with print() under PYTHONUNBUFFERED can interleave
    # a line's text and its newline.
    os.write(1, f"rank {world.rank} on stdout\n".encode())
    os.write(2, f"rank {world.rank} on stderr\n".encode())
    return os.environ.get("DISTSHARE_TEST_CALL"), os.getcwd(), sys.path[0]


@pytest.mark.parametrize("method", START_METHODS)
def test_a_rank_starts_with_the_callers_environment_directory_and_streams_as_they_are_at_the_call(
    method, tmp_path, monkeypatch
):
    # The forkserver was started by an earlier call, with that call's environment, directory
    # and streams; a rank forked from it must still see this call's (as a spawned rank does).
    # Mutant: `_Caller.adopt` a no-op -> the rank reads "first" and prints to the old streams.
    monkeypatch.setenv("DISTSHARE_START_METHOD", method)
    monkeypatch.setenv("DISTSHARE_TEST_CALL", "first")
    run_distributed(_what_the_rank_sees, 2, timeout_s=30)
    monkeypatch.setenv("DISTSHARE_TEST_CALL", "second")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    saved = os.dup(1), os.dup(2)
    with out.open("w") as o, err.open("w") as e:
        os.dup2(o.fileno(), 1)
        os.dup2(e.fileno(), 2)
        try:
            seen = run_distributed(_what_the_rank_sees, 2, timeout_s=30)
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    assert seen == [("second", str(tmp_path), str(tmp_path))] * 2
    assert sorted(out.read_text().splitlines()) == ["rank 0 on stdout", "rank 1 on stdout"]
    assert sorted(err.read_text().splitlines()) == ["rank 0 on stderr", "rank 1 on stderr"]


def test_an_unknown_start_method_is_one_line(monkeypatch):
    monkeypatch.setenv("DISTSHARE_START_METHOD", "fork")
    with pytest.raises(UsageError, match=r"^DISTSHARE_START_METHOD='fork': expected one of forkserver, spawn$"):
        run_distributed(_sum_of_ranks, 2)


def test_ranks_fork_from_the_server_on_linux_and_spawn_elsewhere(monkeypatch):
    monkeypatch.delenv("DISTSHARE_START_METHOD", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert start_context().get_start_method() == "forkserver"
    monkeypatch.setattr(sys, "platform", "darwin")  # forking after torch's frameworks load can crash there
    assert start_context().get_start_method() == "spawn"
    monkeypatch.setenv("DISTSHARE_START_METHOD", "spawn")
    monkeypatch.setattr(sys, "platform", "linux")
    assert start_context().get_start_method() == "spawn"


@pytest.mark.parametrize("method", START_METHODS)
def test_a_caller_without_python_streams_still_starts_ranks(method, monkeypatch):
    # Under pythonw, or a host that took them away, sys.stdout and sys.stderr are None: there
    # is nothing to flush before the ranks start. Mutant: flush them unconditionally -> AttributeError.
    monkeypatch.setenv("DISTSHARE_START_METHOD", method)
    monkeypatch.setattr(sys, "stdout", None)
    monkeypatch.setattr(sys, "stderr", None)
    assert run_distributed(_sum_of_ranks, 2, timeout_s=30) == [1.0, 1.0]
