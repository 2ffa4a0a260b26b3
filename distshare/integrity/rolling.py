"""A rolling digest of the training state: every byte digested within N steps, one slice per step.

A replica check at every step is cheap only if the step does not pay for digesting the whole
state. A tensor's digest changes only when something writes it, so one step digests one slice
(1/N of the state's bytes) and keeps the digests of the other N - 1 slices from the steps
that last covered them; the rolling digest is the digest of all N slice digests. Ranks advance
in lockstep, so equal rolling digests mean: every slice agreed when it was last digested, each
at most N - 1 steps ago. A flipped bit stays until something overwrites it (a parameter's
difference survives every later update: the all-reduced gradient is the same on every rank),
so it is caught when its slice comes round: within N steps.

    digest = RollingDigest(model, optimizer)       # the plan: slices of ~32 MiB (slice_bytes)
    coverage = digest.advance(step)                # after optimizer.step(): one slice digested
    digest.value                                   # 16 bytes: what the ranks compare

The state is `distshare.integrity.state`'s (parameters, buffers, optimizer state, its
hyperparameters) laid end to end in name order; slice j is bytes [j, j + 1) x size of that
stream, cut through tensors where it falls. Each piece is hashed (xxh3-128) with its name,
dtype, shape and offset, from a uint8 view of the tensor's own memory made once (no copy, no
per-step view: the step pays for the bytes and a call per piece). The hyperparameters
(numbers, not tensors) are digested at every step. The plan is checked before every
slice: a tensor no longer the one the optimizer holds, a storage moved (`p.data = ...`),
optimizer state created or dropped (Adam's, at the first step) make it rebuilt, and a rebuild
digests every slice at once, so the bound holds across it.

It runs on the caller's thread between steps, when no optimizer writes: it never reads a
tensor while it is written. Host (CPU) tensors only: `supported` says whether a state qualifies
(device tensors have `dsh128`, sharded ones `lsh128`: the full check serves them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import xxhash
from torch import nn

from distshare.integrity.logical import is_dtensor
from distshare.integrity.state import named_state_tensors, unwrap

ALGORITHM = "rxh128"  # rolling xxh3-128: not comparable with any per-tensor digest
_data_ptr = torch.Tensor.data_ptr
SLICE_BYTES = 32 << 20  # one step's share of the state: ~1 ms of xxh3 on one core


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
        n = self.want_slices or max(1, math.ceil(self.state_bytes / self.slice_bytes))
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
        # Per slice, what `_stale` compares, as parallel lists (map() over them: no Python loop per piece).
        self._held = [[p.tensor for p in pieces] for pieces in self.plan]
        self._ptrs = [[p.ptr for p in pieces] for pieces in self.plan]
        self._owned = [[(p.entries, p.key, p.tensor) for p in pieces if p.entries is not None] for pieces in self.plan]
        self._state_keys = self._structure()
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
        return (id(opt.state), len(opt.state), sum(len(s) for s in opt.state.values()), len(opt.param_groups))

    def _stale(self, j: int) -> bool:
        """Has this slice's memory moved, or the optimizer's state changed shape, since the plan?"""
        if self._structure() != self._state_keys:
            return True
        if list(map(_data_ptr, self._held[j])) != self._ptrs[j]:
            return True  # a storage moved (`p.data = ...`)
        return any(entries.get(key) is not t for entries, key, t in self._owned[j])  # state replaced

    # ------------------------------------------------------------------------------ digesting

    def _hyper(self) -> bytes:
        """The optimizer's hyperparameters (learning rate, betas, ...): small, digested every step."""
        if self.optimizer is None:
            return b""
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
        h = xxhash.xxh3_128()
        update = h.update
        for p in self.plan[j]:
            update(p.header)
            update(p.view)
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
