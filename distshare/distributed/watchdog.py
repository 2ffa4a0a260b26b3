"""Naming the rank that went silent: what the others do when a collective times out.

The process group's timeout (`--timeout`, config `timeout_s`) already bounds every
collective, so a rank that stops taking part cannot make the others wait forever. But gloo
only says "Timed out waiting 5000ms for recv operation": it does not know *who* failed to
show up, and with N ranks that is the one thing a user needs. So when a collective fails,
each surviving rank checks in at the process group's store (the rendezvous every rank
already shares: a file for spawned ranks, the launcher's TCP store under torchrun,
`accelerate launch` and Ray Train) and waits a
short grace for its peers to check in too. A rank that never checks in is the silent one:

    rank 1 went silent at step 7 (no answer within 5 s)

Why a check-in and not `torch.distributed.monitored_barrier`: that barrier needs rank 0 to
collect the answers and the same gloo connections that just timed out; the store is
served by the launcher (torchrun's agent) or a file, so it answers even when rank 0 is the
silent one. Why not a heartbeat written every step: a rank can be alive (threads running)
and still absent from the collective; the check-in asks the question that matters, "are
you here, at the point where the others are stuck?", and costs nothing while all is well.

The step comes from `note_step`, which the per-rank runner's step marker (a training-loop
component) calls once per step: a plain attribute write, no communication. All survivors
stopped at the collective where the silent rank was missing, so their step is where it went
silent.

The grace is the one assumption: survivors reach the failed collective within it of each
other (entry times differ by at most the compute between two collectives, milliseconds for
the models here). A survivor slower than that would be named too; the grace is
clamp(timeout / 4, 1 s, 5 s), so the whole failure takes at most the timeout plus 5 s.
"""

from __future__ import annotations

import contextlib
import json
import time

import torch.distributed as dist

from distshare.distributed import launchers
from distshare.errors import RankSilent

# Words of gloo's (and the store's) messages for a collective that a peer never completed:
# a timeout, or the connection a peer dropped when it gave up or died.
_COLLECTIVE_FAILURE = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe")


def grace_s(timeout_s: float) -> float:
    """How long a survivor waits for its peers to check in after its collective failed."""
    return min(max(1.0, timeout_s / 4), 5.0)


class Watchdog:
    """One rank's view: its place, the last step it began, and where to check in."""

    def __init__(self, rank: int, world_size: int, timeout_s: float, store: dist.Store | None) -> None:
        self.rank, self.world_size, self.timeout_s, self.store = rank, world_size, timeout_s, store
        self.step: int | None = None  # the step this rank began last (None: before the first)

    def check_in(self) -> RankSilent | None:
        """Say "here, at step S" and wait for the peers; a `RankSilent` naming who stayed away.

        None when every rank checked in (the collective failed for another reason: every
        rank is here, so no one is silent) or when there is no store to ask.
        """
        if self.store is None or self.world_size < 2:
            return None
        try:
            self.store.set(f"in/{self.rank}", json.dumps({"step": self.step}))
            deadline = time.monotonic() + grace_s(self.timeout_s)
            missing = [r for r in range(self.world_size) if r != self.rank]
            while True:
                missing = [r for r in missing if not self.store.check([f"in/{r}"])]
                if not missing or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            if not missing:
                return None
            here = [r for r in range(self.world_size) if r not in missing]
            steps = [json.loads(self.store.get(f"in/{r}"))["step"] for r in here]
        except Exception:  # noqa: BLE001 - the store is gone too: say nothing rather than guess
            return None
        known = [s for s in steps if s is not None]
        step = min(known) if known else None
        # The lowest surviving rank speaks (rank 0 unless rank 0 is the silent one).
        return RankSilent(missing, step, self.timeout_s, reporter=min(here) == self.rank)


_active: Watchdog | None = None
_generation = 0  # process groups made in this process: every rank makes them in the same order


def watch(rank: int, world_size: int, timeout_s: float) -> Watchdog:
    """Start watching the default process group just made (called by `init_world`)."""
    global _active, _generation
    _generation += 1
    store = None
    with contextlib.suppress(Exception):  # no store to ask: failures keep gloo's own message
        base = dist.distributed_c10d._get_default_store()
        # torchrun's store outlives a restart; a key from the last attempt must not answer.
        restart = launchers.restart_count()
        store = dist.PrefixStore(f"distshare/watchdog/{restart}/{_generation}/", base)
    _active = Watchdog(rank, world_size, timeout_s, store)
    return _active


def forget() -> None:
    """Stop explaining failures by the last process group (the CLI calls it after each command)."""
    global _active
    _active = None


def ensure_watching(rank: int, world_size: int, timeout_s: float) -> None:
    """Watch the default process group unless it is watched already (`init_world` watches the
    groups it makes; accelerate and Ray Train make their own)."""
    if _active is None:
        watch(rank, world_size, timeout_s)


def note_step(step: int) -> None:
    """This rank is at `step`: remembered for a later "went silent at step"."""
    if _active is not None:
        _active.step = step


def is_collective_failure(exc: BaseException) -> bool:
    """Does `exc` look like a collective (or the store) giving up on a peer?"""
    return isinstance(exc, RuntimeError) and any(w in str(exc).lower() for w in _COLLECTIVE_FAILURE)


def explain(exc: BaseException) -> BaseException:
    """The error to report for `exc`: a `RankSilent` naming who went silent, or `exc` itself.

    Only a collective failure under a watched process group is explained; the check-in runs
    once per failure (the answer is remembered on the exception), so every layer that
    catches it may ask.
    """
    cached = getattr(exc, "_distshare_explained", None)
    if cached is not None:
        return cached
    explained: BaseException = exc
    if _active is not None and is_collective_failure(exc):
        explained = _active.check_in() or exc
    with contextlib.suppress(AttributeError):
        exc._distshare_explained = explained  # type: ignore[attr-defined]
    return explained
