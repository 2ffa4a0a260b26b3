"""A rolling digest of the training state: every byte digested within N steps, one slice per step.

A replica check at every step is cheap only if the step does not pay for digesting the whole
state. A tensor's digest changes only when something writes it, so one step digests one slice
(1/N of the state's bytes) and keeps the digests of the other N - 1 slices from the steps
that last covered them; the rolling digest is the digest of all N slice digests. Ranks advance
in lockstep, so equal rolling digests mean: every slice agreed when it was last digested, each
at most N - 1 steps ago. A flipped bit stays until something overwrites it (a parameter's
difference survives every later update: the all-reduced gradient is the same on every rank),
so it is caught when its slice comes round: within N steps.

    digest = RollingDigest(model, optimizer)       # the plan: slices of <= 32 MiB and <= 32 tensors
    coverage = digest.advance(step)                # after optimizer.step(): one slice digested
    digest.value                                   # 16 bytes: what the ranks compare

The state is `distshare.integrity.state`'s (parameters, buffers, optimizer state, its
hyperparameters) laid end to end in name order; slice j is bytes [j, j + 1) x size of that
stream, cut through tensors where it falls. A slice's digest (xxh3-128) is of its pieces'
names, dtypes, shapes and offsets (fixed by the plan), then of their bytes, read through uint8
views of the tensors' own memory made once (no copy, no per-step view: the step pays for the
bytes and a call per piece). The hyperparameters (numbers, not tensors) are digested at every
step (the digest reused while the groups hold the same objects). The plan is checked before
every slice: a tensor no longer the one the optimizer holds, a storage moved (`p.data = ...`),
optimizer state created or dropped (Adam's, at the first step) make it rebuilt, and a rebuild
digests every slice at once, so the bound holds across it.

It runs on the caller's thread between steps, when no optimizer writes: it never reads a
tensor while it is written. Host (CPU) tensors only: `supported` says whether a state qualifies
(device tensors have `dsh128`, sharded ones `lsh128`: the full check serves them).

The ranks compare their rolling digests `batch` checks at a time (`Exchange`): each check's
16 bytes are kept, and when `batch` are held one all_gather of batch x 16 bytes runs in the
background, judged at the next check; the verdict names the first check whose digests differed
(`Verdict.first`), not only whether the batch did. A gather costs about the same for 16 bytes
and for 1 KiB (gloo on 2 CPU ranks: ~0.1 ms of the caller's thread to launch and wait, ~0.3 ms
of the process's CPU in all, gloo's threads included), so batching divides the collective's
cost by `batch` and adds `batch` checks to the bound: a difference present after step t is in
a digested slice by check t + N and reported by check t + N + batch (`bound`).

    exchange = Exchange(group, batch=16)
    verdict = exchange.settle()                   # the batch in flight, if any: None, or its Verdict
    exchange.add(coverage, digest.value)          # launches the gather when `batch` are held
    exchange.flush(); exchange.settle()           # at the end: the partial batch, waited for
"""

from __future__ import annotations

import math
import operator
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import xxhash
from torch import nn

from distshare.integrity.logical import is_dtensor
from distshare.integrity.replicas import ReplicaReport, vote
from distshare.integrity.state import named_state_tensors, unwrap

ALGORITHM = "rxh128"  # rolling xxh3-128: not comparable with any per-tensor digest
_data_ptr = torch.Tensor.data_ptr
SLICE_BYTES = 32 << 20  # one step's share of the state: ~1 ms of xxh3 on one core
# ... and at most this many tensors. A small state's cost is per tensor, not per byte: a
# data_ptr and identity check and an update call each, ~0.5 us warm but several times that
# right after a backward has evicted them from cache. Measured in the 2-rank loop on the tiny
# transformer (117 tensors): the checker's CPU between steps was 0.121 ms a step in one slice,
# 0.072 ms in four (bench_step.py with check_slices=4), for 3 more steps of detection bound.
SLICE_TENSORS = 32
BATCH = 16  # checks whose digests one gather compares: its ~0.3 ms of CPU, / 16, is ~0.4% of a 5 ms step


_IMMUTABLE = (bool, int, float, str, type(None))


def _frozen(value: Any) -> bool:
    """Can this value change only by being replaced (so identity means the same value)?"""
    return isinstance(value, _IMMUTABLE) or (isinstance(value, tuple) and all(_frozen(v) for v in value))


def _same_items(now: tuple, then: tuple) -> bool:
    """The same keys holding the very same objects."""
    return len(now) == len(then) and all(a[0] == b[0] and a[1] is b[1] for a, b in zip(now, then, strict=True))


@dataclass
class Coverage:
    """What one `advance` digested: which step's state, which slice, how much of it."""

    state_step: int  # the state after this step's optimizer update
    slice: int  # 0-based
    slices: int
    bytes: int  # digested now
    state_bytes: int  # the whole state
    tensors: int  # tensors with bytes in this slice
    first: str  # the first and last of them, in name order
    last: str
    rebuilt: bool = False  # the plan was rebuilt: every slice digested now

    def describe(self) -> str:
        what = "every slice (plan rebuilt)" if self.rebuilt else f"slice {self.slice + 1} of {self.slices}"
        return (
            f"state of step {self.state_step}: {what}, {self.bytes} of {self.state_bytes} bytes, "
            f"{self.tensors} tensor(s) from {self.first} to {self.last}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Piece:
    name: str
    tensor: torch.Tensor
    ptr: int
    header: bytes
    view: memoryview  # the piece's bytes, in the tensor's memory
    entries: dict | None = None  # optimizer state: its parameter's state dict (entries[key] must stay it)
    key: str = ""  # and its key there


def supported(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> str | None:
    """None if the rolling digest can cover this state, else why not (in words)."""
    for name, t in named_state_tensors(model, optimizer, shards=False):
        if is_dtensor(t):
            return f"{name} is sharded (DTensor): compared by logical digests"
        if t.device.type != "cpu":
            return f"{name} is on {t.device}: device tensors are digested where they live (dsh128)"
        if not t.is_contiguous() and not name.startswith("optim/group"):
            return f"{name} is not contiguous: no view of its memory to digest in place"
    return None


class RollingDigest:
    """The slices of one rank's state, the digest of each as last taken, and the rolling digest."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        slices: int = 0,
        slice_bytes: int = SLICE_BYTES,
        buffers: bool = True,
    ) -> None:
        self.model, self.optimizer = unwrap(model), optimizer
        self.want_slices, self.slice_bytes, self.buffers = slices, slice_bytes, buffers
        self.counter = 0  # advances so far: slice = counter mod slices, the same on every rank
        self.rebuilds = 0
        self._build()

    # ------------------------------------------------------------------------------ the plan

    def _live(self) -> Iterable[tuple[str, torch.Tensor]]:
        """The state's tensors that the model and optimizer hold (not the hyperparameter numbers)."""
        for name, t in named_state_tensors(self.model, self.optimizer, buffers=self.buffers, shards=False):
            if not name.startswith("optim/group"):
                yield name, t

    def _build(self) -> None:
        owners: dict[int, dict] = {}  # id of an optimizer state tensor -> the state dict holding it
        self._loose = False  # optimizer state held as numbers, not tensors: digested every step
        for entries in self.optimizer.state.values() if self.optimizer is not None else ():
            for value in entries.values():
                if isinstance(value, torch.Tensor):
                    owners[id(value)] = entries
                else:
                    self._loose = True
        tensors = []
        for name, t in self._live():
            if name.startswith("optim/") and id(t) not in owners:
                continue  # a number made into a tensor for the name: not the optimizer's memory
            tensors.append((name, t, owners.get(id(t))))
        self.state_bytes = sum(t.numel() * t.element_size() for _, t, _ in tensors)
        by_bytes, by_count = math.ceil(self.state_bytes / self.slice_bytes), math.ceil(len(tensors) / SLICE_TENSORS)
        n = self.want_slices or max(1, by_bytes, by_count)
        self.slices = max(1, min(n, self.state_bytes)) if self.state_bytes else 1
        size = math.ceil(self.state_bytes / self.slices) if self.state_bytes else 0
        self.plan: list[list[_Piece]] = [[] for _ in range(self.slices)]
        start = 0  # of the tensor in the whole stream
        for name, t, owner in tensors:
            held, t = t, t.detach()  # `held`: the object the model / optimizer holds (identity checks)
            nbytes = t.numel() * t.element_size()
            flat = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if nbytes else memoryview(b"")
            head = f"{name}|{t.dtype}|{tuple(t.shape)}|".encode()
            pos = 0
            while True:  # the tensor's pieces, one per slice it spans (an empty tensor: one piece)
                j = min((start + pos) // size, self.slices - 1) if size else 0
                end = min(nbytes, (j + 1) * size - start) if j < self.slices - 1 else nbytes
                key = name.rsplit("/", 1)[1]
                piece = _Piece(name, held, t.data_ptr(), head + f"{pos}|".encode(), flat[pos:end], owner, key)
                self.plan[j].append(piece)
                pos = end
                if pos >= nbytes:
                    break
            start += nbytes
        self._facts = [self._slice_facts(pieces) for pieces in self.plan]
        self._headers = [b"".join(p.header for p in pieces) for pieces in self.plan]
        self._views = [[p.view for p in pieces] for pieces in self.plan]
        # Per slice, what `_stale` compares, as parallel lists (map() over them: no Python loop per piece).
        self._held = [[p.tensor for p in pieces] for pieces in self.plan]
        self._ptrs = [[p.ptr for p in pieces] for pieces in self.plan]
        owned = [[p for p in pieces if p.entries is not None] for pieces in self.plan]
        self._owned = [([p.entries for p in o], [p.key for p in o], [p.tensor for p in o]) for o in owned]
        self._state_keys = self._structure()
        self._hyper_seen: list[tuple] | None = None  # the param groups' items when last digested, if reusable
        self._hyper_digest = b""
        self.digests: list[bytes] = [b""] * self.slices
        self.taken_at: list[int | None] = [None] * self.slices  # the state step each slice digest is of
        self.rebuilds += 1

    @staticmethod
    def _slice_facts(pieces: list[_Piece]) -> tuple[int, int, str, str]:
        """(bytes, tensors, first name, last name) of some pieces: what a `Coverage` reports."""
        names = sorted({p.name for p in pieces})
        return sum(p.view.nbytes for p in pieces), len(names), names[0] if names else "", names[-1] if names else ""

    def _structure(self) -> tuple:
        """What a rebuild depends on that is cheap to look at: the optimizer's state entries."""
        opt = self.optimizer
        if opt is None:
            return ()
        return (id(opt.state), len(opt.state), sum(map(len, opt.state.values())), len(opt.param_groups))

    def _stale(self, j: int) -> bool:
        """Has this slice's memory moved, or the optimizer's state changed shape, since the plan?"""
        if self._structure() != self._state_keys:
            return True
        if list(map(_data_ptr, self._held[j])) != self._ptrs[j]:
            return True  # a storage moved (`p.data = ...`)
        entries, keys, held = self._owned[j]  # optimizer state replaced: entries[key] is no longer it
        return not all(map(operator.is_, map(dict.get, entries, keys), held))

    # ------------------------------------------------------------------------------ digesting

    def _hyper(self) -> bytes:
        """The optimizer's hyperparameters (learning rate, betas, ...): small, digested every step.

        Their digest is reused while every group holds the very same immutable objects (a
        scheduler that sets `group["lr"]` stores a new float): a repr per value costs more than
        the slice of a small model.
        """
        if self.optimizer is None:
            return b""
        groups = [tuple(g.items()) for g in self.optimizer.param_groups]
        last = self._hyper_seen
        if last is not None and len(last) == len(groups) and all(map(_same_items, groups, last)):
            return self._hyper_digest
        digest = self._hyper_fresh()
        frozen = not self._loose and all(_frozen(v) for g in groups for k, v in g if k != "params")
        self._hyper_seen, self._hyper_digest = (groups if frozen else None), digest
        return digest

    def _hyper_fresh(self) -> bytes:
        h = xxhash.xxh3_128()
        for i, group in enumerate(self.optimizer.param_groups):
            for key in sorted(group):
                value = group[key]
                if key == "params" or value is None or isinstance(value, str):
                    continue
                if isinstance(value, torch.Tensor):
                    h.update(f"{i}|{key}|{value.dtype}|".encode())
                    h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
                else:
                    h.update(f"{i}|{key}|{value!r}|".encode())  # repr: exact for floats, ints, tuples
        if self._loose:  # e.g. a step count kept as a Python number
            for j, entries in enumerate(self.optimizer.state.values()):
                numbers = sorted((k, repr(v)) for k, v in entries.items() if not isinstance(v, torch.Tensor))
                h.update(f"{j}|{numbers}".encode())
        return h.digest()

    def _slice(self, j: int) -> bytes:
        # The pieces' headers (name, dtype, shape, offset) are fixed by the plan: hashed first, as
        # one string, then the pieces' bytes in plan order (no Python loop per piece).
        h = xxhash.xxh3_128(self._headers[j])
        deque(map(h.update, self._views[j]), maxlen=0)
        return h.digest()

    def advance(self, step: int) -> Coverage:
        """Digest the next slice (every slice if the plan had to be rebuilt) of the state after `step`."""
        j = self.counter % self.slices
        rebuilt = self._stale(j)
        if rebuilt:
            self._build()
            j = self.counter % self.slices
        todo = range(self.slices) if rebuilt else (j,)
        for k in todo:
            self.digests[k] = self._slice(k)
            self.taken_at[k] = step
        self.hyper = self._hyper()
        self.counter += 1
        facts = self._slice_facts([p for k in todo for p in self.plan[k]]) if rebuilt else self._facts[j]
        return Coverage(step, j, self.slices, facts[0], self.state_bytes, facts[1], facts[2], facts[3], rebuilt)

    def full(self) -> bytes:
        """The rolling digest of the state as it is now, every slice digested afresh (changes nothing)."""
        return self._combine([self._slice(k) for k in range(self.slices)], self._hyper())

    @property
    def value(self) -> bytes:
        """16 bytes: the digest of every slice's digest as last taken, and of the hyperparameters."""
        return self._combine(self.digests, getattr(self, "hyper", b""))

    def _combine(self, digests: list[bytes], hyper: bytes) -> bytes:
        h = xxhash.xxh3_128()
        h.update(f"{ALGORITHM}|{self.slices}|".encode())
        for d in digests:
            h.update(d)
        h.update(hyper)
        return h.digest()


def bound(slices: int, batch: int, every: int = 1) -> dict[str, int]:
    """The detection bound, in steps, of rolling checks every `every` steps, `batch` per gather.

    A difference present after step t is in the state every later check digests; its slice is
    digested within `slices` checks (by step t + slices x every), that check's digest is in a
    batch whose last check is at most batch - 1 checks later, and the batch is judged at the
    check after its last: by step t + (slices + batch) x every.
    """
    every = max(every, 1)
    return {"digested_within_steps": slices * every, "reported_within_steps": (slices + batch) * every}


# ---------------------------------------------------------------------------------------------
# The exchange: every rank's digests of `batch` checks, compared by one gather in the background.


@dataclass
class Verdict:
    """One gather's comparison: the checks it compared (in order) and the first whose digests differed."""

    compared: list[Coverage]
    first: int | None = None  # index into `compared`: the first check whose digests differ; None: all agreed
    digests: list[str] = field(default_factory=list)  # that check's rolling digest per rank (hex)

    @property
    def agreed(self) -> bool:
        return self.first is None

    @property
    def differing(self) -> Coverage | None:
        """The first check whose digests differed: which step's state, which slice."""
        return None if self.first is None else self.compared[self.first]

    @property
    def steps(self) -> list[int]:
        """The state steps the compared digests covered."""
        return [c.state_step for c in self.compared]

    def coverage(self) -> dict[str, Any]:
        """The first differing check's `Coverage`, with the steps its gather compared: a report's `coverage`."""
        assert self.differing is not None
        return {**self.differing.to_dict(), "compared_steps": [self.steps[0], self.steps[-1]], "batch": len(self.steps)}


def first_difference(rows: list[bytes], width: int = 16) -> int | None:
    """The index of the first `width`-byte value on which the ranks' `rows` (one per rank) differ."""
    if all(r == rows[0] for r in rows):
        return None  # the common case, decided without a loop over the batch
    for i in range(max(len(r) for r in rows) // width):
        if len({r[i * width : (i + 1) * width] for r in rows}) > 1:
            return i
    return 0  # rows of different lengths: the ranks are not in lockstep (named at the first check)


@dataclass
class _Flight:
    compared: list[Coverage]
    work: Any  # the all_gather's Work; None in one process
    gathered: list[torch.Tensor]


class Exchange:
    """The ranks' rolling digests, `batch` checks at a time, compared by one all_gather in the background.

    Every rank must call `add`, `flush` and `settle` at the same points (they are collectives
    on `group`; `group=None`: one process, nothing to compare with).
    """

    def __init__(self, group: Any, batch: int = BATCH, timeout_s: float = 120.0) -> None:
        if batch < 1:
            raise ValueError(f"batch={batch}: expected a positive number of checks per gather")
        self.group, self.batch, self.timeout_s = group, batch, timeout_s
        self.held: list[tuple[Coverage, bytes]] = []  # this rank's digests not yet sent
        self.in_flight: _Flight | None = None
        self.compared = 0  # digests compared so far (each: one check of one step's state)
        self.gathers = 0
        self.waited_for: list[Coverage] = []  # the checks of the last gather waited for (a timeout names them)

    def add(self, coverage: Coverage, value: bytes) -> None:
        """Hold one check's rolling digest; with `batch` held, start their gather (none may be in flight)."""
        self.held.append((coverage, value))
        if len(self.held) >= self.batch:
            self.flush()

    def flush(self) -> None:
        """Start the gather of the digests held, however few (the run's end); settle the last one first."""
        if not self.held:
            return
        if self.in_flight is not None:
            raise RuntimeError("a rolling exchange is still in flight: settle it before the next one")
        held, self.held = self.held, []
        # A fresh buffer per gather: gloo reads it in the background, so nothing may write it again.
        mine = torch.frombuffer(bytearray(b"".join(v for _, v in held)), dtype=torch.uint8)
        compared = [c for c, _ in held]
        self.gathers += 1
        if self.group is None:
            self.in_flight = _Flight(compared, None, [mine])
            return
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(self.group))]
        work = dist.all_gather(gathered, mine, group=self.group, async_op=True)
        self.in_flight = _Flight(compared, work, gathered)

    def settle(self) -> Verdict | None:
        """Wait (bounded) for the gather in flight and judge it; None when none was in flight.

        A timeout raises the backend's RuntimeError (the callers name the steps it covered:
        `waited_for`); the flight is dropped then, never waited for again.
        """
        flight, self.in_flight = self.in_flight, None
        if flight is None:
            return None
        self.waited_for = flight.compared
        if flight.work is not None:
            flight.work.wait(timedelta(seconds=self.timeout_s))  # the group's timeout bounds it too
        rows = [t.numpy().tobytes() for t in flight.gathered]
        self.compared += len(flight.compared)
        first = first_difference(rows)
        if first is None:
            return Verdict(flight.compared)
        return Verdict(flight.compared, first, [r[first * 16 : (first + 1) * 16].hex() for r in rows])


def mark_unlocalized(report: ReplicaReport, verdict: Verdict) -> None:
    """The full check after a rolling difference found every tensor equal (overwritten since, on
    every rank): still a divergence, named by the slice whose digests differed, without elements."""
    odd, _, strict = vote([f"xxh3_128:{d}" for d in verdict.digests])
    where = f"extra/rolling/slice{verdict.differing.slice}"
    report.differing = {where: odd}
    report.majority = {where: strict}
