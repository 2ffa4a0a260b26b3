"""Simulated ranks on one CPU: run a function on N processes joined by a gloo process group.

This is how a laptop stands in for a cluster: every rank is a real process with a real
`torch.distributed` gloo group over loopback, meeting at a file rendezvous (no port to pick,
so tests can run in parallel). The caller gets each rank's return value; a rank's
exception is re-raised with its rank; and nothing waits forever: the collectives carry
the timeout (the survivors name a rank that went silent: `distshare.distributed.watchdog`), and
the caller gives up on ranks that neither answer nor exit.

Ranks are forked from a server process that has imported torch and distshare once
(multiprocessing's "forkserver", started at the first call and kept while the caller lives):
a fresh interpreter per rank spends about 2 s of CPU importing them, more than most test
worlds run. A rank still starts as a fresh spawn would: the caller's environment, working
directory, `sys.path`, stdout and stderr as they are at the call (the server was started at an
earlier one), nothing of the caller's memory. That is on Linux; elsewhere, and with
`DISTSHARE_START_METHOD=spawn`, every rank is a fresh interpreter (`start_context`).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distshare.distributed import watchdog
from distshare.errors import DistshareError, RankError, RankSilent, UsageError

# What the server imports before it forks any rank: what every rank function needs;
# `torch._dynamo`, which torch.optim imports when the first optimizer is made (2.0 s of CPU,
# measured, in every rank that trains); and `datasets`, which distshare.data imports only where
# a data set is built (most ranks build one).
PRELOAD = ["torch", "torch._dynamo", "datasets", "distshare.distributed.world", "distshare.training"]
START_METHODS = ("forkserver", "spawn")


def share_of_cores(processes: int) -> int:
    """Torch threads for each of `processes` that share this machine's cores (at least one)."""
    return max(1, (os.cpu_count() or 1) // processes)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    *args: Any,
    timeout_s: float = 60.0,
    deadline_s: float | None = 300.0,
    **kwargs: Any,
) -> list[Any]:
    """Run `fn(world, *args, **kwargs)` on `world_size` gloo ranks; return results by rank.

    `fn` must be importable by name (a module-level function): ranks are fresh processes.
    `timeout_s` bounds every collective inside the ranks, so a rank that stops taking part
    makes its peers fail, naming it (`RankSilent`); `deadline_s` bounds the whole run from
    outside, for code that might hang outside a collective (the defaults suit a test; a
    training run of unknown length passes `deadline_s=None`). Ranks still silent
    `timeout_s` (plus a grace) after a peer returned are named too: no collective is left to
    time out for them.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = start_context()
    results: queue.Queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="distshare-rdzv-") as tmp:
        init_method = Path(tmp, "rendezvous").as_uri()
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(fn, rank, world_size, init_method, timeout_s, results, args, kwargs, _Caller()),
                name=f"distshare-rank{rank}",
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        try:
            out = _collect(procs, results, world_size, deadline_s, silence_s=timeout_s)
        except BaseException:
            _stop(procs, grace_s=0.5)  # the run failed: peers may be stuck waiting for the dead
            raise
        _stop(procs, grace_s=10)
        return out


def _collect(
    procs: list, results: queue.Queue, world_size: int, deadline_s: float | None, silence_s: float
) -> list[Any]:
    # Waits while ranks are alive; a rank that died without a word fails the run at once,
    # and the optional deadline catches a rank that hangs outside any collective. Once one
    # rank has returned, the others had their last collective with it: a rank that has not
    # returned within the collective timeout (and a grace) after that is silent.
    out: dict[int, Any] = {}
    deadline = None if deadline_s is None else time.monotonic() + deadline_s
    first_result_at: float | None = None
    while len(out) < world_size:
        if _receive(results, out, wait_s=0.2):
            first_result_at = first_result_at or time.monotonic()
            continue
        gone = [r for r, p in enumerate(procs) if r not in out and p.exitcode is not None]
        if gone:
            while _receive(results, out, wait_s=0.5):  # its result or error may still be in the pipe
                pass
            gone = [r for r in gone if r not in out]
            if gone:
                raise RankError(gone[0], f"exited with code {procs[gone[0]].exitcode} before returning a result")
        if deadline is not None and time.monotonic() > deadline:
            waiting = [r for r in range(world_size) if r not in out]
            raise DistshareError(f"ranks {waiting} gave no result within {deadline_s:.0f}s")
        if first_result_at is not None and time.monotonic() - first_result_at > silence_s + watchdog.grace_s(silence_s):
            waiting = [r for r in range(world_size) if r not in out]
            raise RankSilent(waiting, None, silence_s, when="after the other ranks returned")
    return [out[r] for r in range(world_size)]


def _receive(results: queue.Queue, out: dict[int, Any], wait_s: float) -> bool:
    """Take one rank's message into `out` (re-raising its error); False if none came."""
    try:
        rank, ok, payload = results.get(timeout=wait_s)
    except queue.Empty:
        return False
    if not ok:
        message, tb, code, silent = payload
        if silent is not None:  # a survivor named the rank that went silent: that is the error
            raise silent
        raise RankError(rank, message, tb, code)
    out[rank] = pickle.loads(payload)
    return True


def _stop(procs: list, grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    init_method: str,
    timeout_s: float,
    results: queue.Queue,
    args: tuple,
    kwargs: dict,
    caller: _Caller,
) -> None:
    caller.adopt()
    # Simulated ranks share the machine's cores; without this each would start one
    # intra-op thread per core and they would fight over them.
    import torch

    torch.set_num_threads(share_of_cores(world_size))
    # tqdm's default lock is a multiprocessing semaphore, registered with the parent's
    # resource tracker: a rank killed after going silent would leak it, and the tracker
    # would add a warning to the one-line error. A thread lock does (one bar per rank).
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback_interface())
    from distshare.distributed.world import close_world, init_world

    world = None
    try:
        world = init_world(rank, world_size, init_method, timeout_s)
        value = fn(world, *args, **kwargs)
        # Pickled here with the plain pickler: tensors travel as bytes, not as shared-memory
        # handles that die with this process before the parent reads them.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the parent
        tb = traceback.format_exc()
        exc = watchdog.explain(exc)  # a timed-out collective: which peer went silent?
        known = isinstance(exc, DistshareError)
        message = str(exc) if known else f"{type(exc).__name__}: {exc}"
        code = exc.exit_code if known else 1
        silent = None
        if isinstance(exc, RankSilent):
            silent = RankSilent(exc.ranks, exc.step, exc.timeout_s, reporter=True, when=exc.when)
        results.put((rank, False, (message, tb, code, silent)))
    finally:
        if world is not None:
            with contextlib.suppress(Exception):  # peers may be gone already
                close_world(world)


def start_context() -> Any:
    """The multiprocessing context ranks start in: forkserver (preloaded) on Linux, else spawn,
    unless `DISTSHARE_START_METHOD` names one.

    Not forkserver by default elsewhere: on macOS a process forked after frameworks that torch
    loads have started can crash in the Objective-C runtime (Python's own default there is spawn).
    """
    available = [m for m in START_METHODS if m in mp.get_all_start_methods()]
    default = "forkserver" if sys.platform.startswith("linux") and "forkserver" in available else "spawn"
    method = os.environ.get("DISTSHARE_START_METHOD") or default
    if method not in available:
        raise UsageError(f"DISTSHARE_START_METHOD={method!r}: expected one of {', '.join(available)}")
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)  # read when the server starts: the first call
    return ctx


class _Caller:
    """What a rank takes from its caller at the call: the environment, stdout and stderr.

    A spawned rank inherits them; a rank forked from the server would have the server's, from
    the call that started it (multiprocessing itself hands on the working directory and
    `sys.path`). The two descriptors travel as multiprocessing passes descriptors to a child.
    """

    def __init__(self, environ: dict[str, str] | None = None, streams: tuple = ()) -> None:
        self.environ = dict(os.environ) if environ is None else environ
        self.streams = streams  # in the rank: the caller's stdout and stderr, not yet taken

    def __reduce__(self) -> tuple:
        from multiprocessing import reduction

        for stream in (sys.stdout, sys.stderr):
            if stream is not None:  # None under pythonw, or where a host took them away
                stream.flush()
        return (_Caller, (self.environ, (reduction.DupFd(1), reduction.DupFd(2))))

    def adopt(self) -> None:
        """In the rank: the caller's environment and streams in place of the server's."""
        if os.environ != self.environ:
            os.environ.clear()
            os.environ.update(self.environ)
        for stream, target in zip(self.streams, (1, 2), strict=True):
            fd = stream.detach()
            if fd != target:
                os.dup2(fd, target)
                os.close(fd)


def _loopback_interface() -> str:
    """Name of the loopback interface, so gloo never tries a route off this machine."""
    try:
        names = os.listdir("/sys/class/net")
    except OSError:
        return "lo"
    return "lo" if "lo" in names else next((n for n in names if n.startswith("lo")), "lo")
