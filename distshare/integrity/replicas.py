"""Cross-rank comparison of training state: are all replicas bit-identical, and if not, where and why.

A collective: every rank calls `compare_replicas` at the same point. In the common case
(all in sync) one 16-byte combined digest per rank travels, never a tensor. When digests
disagree it narrows down in two more rounds:

1. the per-tensor digests (a few dozen bytes per tensor), and what each rank knows of itself
   (`RankFacts`: has it updated yet, does its DDP wrapper sync buffers, which tensors it
   changed since the ranks last agreed), say which tensors differ; a majority vote per
   tensor names the odd ranks: with 3 or more ranks the odd one out, with 2 ranks there is
   no majority and both are named;
2. for the differing tensors only (at most `locate` of them, taken from every kind in turn:
   parameters, gradients, hyperparameters, buffers, optimizer state), the reference values
   (the majority's, or rank 0's when there is no majority) are broadcast, and every odd rank
   compares its own values against them: how many elements differ, the first differing
   (multi-)index, the largest absolute difference and ULP distance, one factor that explains
   the whole tensor if there is one.

Then `distshare.integrity.diagnosis` reads all of it and names the likely cause
(`ReplicaReport.diagnosis`). Every rank ends with the same report, so every rank takes the
same decision (raise or go on).

Each rank remembers, per model, what its last check saw (whether the check before the first
update agreed, its own digests at the last check that agreed, the first divergence): a first
check before training (`step=None`) is what later diagnoses build on.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distshare.errors import VerificationFailed
from distshare.integrity.diagnosis import (
    BEFORE_FIRST_STEP,
    KIND_WORDS,
    KINDS,
    STEPS_TAKEN,
    Diagnosis,
    RankFacts,
    diagnose,
    kind_of,
    parameter_of,
)
from distshare.integrity.fingerprint import check_comparable, combined_fingerprint, fingerprint_many
from distshare.integrity.state import local_shard, named_state_tensors, unwrap
from distshare.integrity.wrapper_facts import buffer_sync, wrapper_notes
from distshare.numerics.diff import TensorDiff, localize

BUFFER_MODES = ("compare", "separate", "ignore")
GRAD_MODES = (False, True, "on_divergence")
Extra = Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None


@dataclass
class ReplicaReport:
    """What every rank's digests say: in sync, or which tensors differ on which ranks, where, and why."""

    world_size: int
    # Combined fingerprint of each rank (index = rank), of what `in_sync` judges: buffers
    # compared apart (buffers="separate") and gradients digested late are not in it.
    combined: list[str]
    differing: dict[str, list[int]] = field(default_factory=dict)  # tensor -> ranks off the majority
    step: int | None = None
    majority: dict[str, bool] = field(default_factory=dict)  # tensor -> did a strict majority agree?
    elements: dict[str, list[TensorDiff]] = field(default_factory=dict)  # tensor -> per odd rank, vs reference
    diagnosis: Diagnosis | None = None  # the likely cause, whenever something differs
    # Kinds compared and reported that do not count against `in_sync` (buffers="separate").
    separate: list[str] = field(default_factory=list)

    @property
    def in_sync(self) -> bool:
        return not any(kind_of(n) not in self.separate for n in self.differing)

    @property
    def identical(self) -> bool:
        """Nothing differs, not even what is reported separately."""
        return not self.differing

    @property
    def odd_ranks(self) -> list[int]:
        """Every rank named for at least one tensor."""
        return sorted({r for ranks in self.differing.values() for r in ranks})

    def summary(self, limit: int = 5) -> str:
        """One line: the diagnosis first, then the locations (parameters first)."""
        if self.identical:
            return f"all {self.world_size} replicas identical ({self.combined[0]})"
        at = f" at step {self.step}" if self.step is not None else ""
        if not at and self.diagnosis is not None and self.diagnosis.evidence.get("check") == BEFORE_FIRST_STEP:
            at = f" {BEFORE_FIRST_STEP}"
        apart = " and ".join(KIND_WORDS[k] for k in self.separate)
        head = "replicas differ" if not self.in_sync else f"replicas in sync but for {apart} (checked apart)"
        why = f"{self.diagnosis.describe()} | " if self.diagnosis is not None else ""
        return f"{head}{at}: {why}{self.locations(limit)}"

    def locations(self, limit: int = 5) -> str:
        """Where: parameters and their optimizer state, then gradients, buffers, hyperparameters, extra."""
        by_kind: dict[str, list[str]] = {k: [] for k in KINDS}
        for name in sorted(self.differing):
            by_kind[kind_of(name)].append(name)
        params = by_kind["param"]
        own = {parameter_of(n) for n in params}
        state_own = [n for n in by_kind["state"] if parameter_of(n) in own]
        state_other = [n for n in by_kind["state"] if parameter_of(n) not in own]
        parts = []
        if params:
            lead = _plural(len(params), "parameter")
            if state_own:
                lead += f" and their {_plural(len(state_own), 'optimizer-state tensor')}"
            parts.append(f"{lead}: {self._entries(params, limit)}")
        if state_other:
            n = len({parameter_of(x) for x in state_other})
            parts.append(
                f"optimizer state of {_plural(n, 'parameter')} ({_plural(len(state_other), 'tensor')}): "
                f"{self._entries(state_other, limit)}"
            )
        for kind, word in (("grad", "gradients"), ("buffer", "buffers"), ("hyper", "hyperparameters")):
            if by_kind[kind]:
                parts.append(f"{word} ({len(by_kind[kind])}): {self._entries(by_kind[kind], limit)}")
        if by_kind["extra"]:
            parts.append(f"extra state ({len(by_kind['extra'])}): {self._entries(by_kind['extra'], limit)}")
        return f"{len(self.differing)} tensor(s) differ: " + "; ".join(parts)

    def _entries(self, names: list[str], limit: int) -> str:
        shown = []
        for name in names[:limit]:
            ranks = self.differing[name]
            text = f"{name} on rank{'s' if len(ranks) > 1 else ''} {_ranks(ranks)}"
            if ranks and not self.majority.get(name, True):
                text += " (no majority)"
            found = self.elements.get(name)
            if found:
                text += " [" + "; ".join(d.describe() for d in found) + "]"
            shown.append(text)
        more = f", and {len(names) - limit} more" if len(names) > limit else ""
        return ", ".join(shown) + more

    @classmethod
    def from_dict(cls, d: dict) -> ReplicaReport:
        """Inverse of `to_dict` (reads reports written before `majority`/`elements`/`diagnosis` existed too)."""
        diagnosis = d.get("diagnosis")
        return cls(
            world_size=d["world_size"],
            combined=d["combined"],
            differing=d["differing"],
            step=d["step"],
            majority=d.get("majority", {}),
            elements={k: [TensorDiff(**e) for e in v] for k, v in d.get("elements", {}).items()},
            diagnosis=Diagnosis.from_dict(diagnosis) if diagnosis else None,
            separate=d.get("separate", []),
        )

    def to_dict(self) -> dict:
        return {
            "world_size": self.world_size,
            "in_sync": self.in_sync,
            "step": self.step,
            "combined": self.combined,
            "differing": self.differing,
            "majority": self.majority,
            "elements": {k: [asdict(e) for e in v] for k, v in self.elements.items()},
            "diagnosis": self.diagnosis.to_dict() if self.diagnosis is not None else None,
            "separate": self.separate,
            "summary": self.summary(),
        }


class ReplicaDivergenceError(VerificationFailed):
    """Replicas that should be identical are not; the message starts with the likely cause."""

    def __init__(self, report: ReplicaReport) -> None:
        super().__init__(report.summary())
        self.report = report

    def __reduce__(self):  # picklable with its report (it crosses from a rank to its parent)
        return (type(self), (self.report,))


def vote(digests: list[str | None]) -> tuple[list[int], int, bool]:
    """Majority vote over one tensor's digests by rank: (odd ranks, reference rank, majority?).

    The reference is the first rank holding the most common digest; on a tie (2 ranks, or a
    3-way split) there is no majority: every rank is named and rank 0 (or the first rank
    holding the tensor) is the reference the others are compared against.
    """
    check_comparable(digests)
    counts = Counter(digests)
    top, top_count = counts.most_common(1)[0]
    tie = sum(1 for c in counts.values() if c == top_count) > 1
    if len(counts) == 1 and top is not None:
        return [], 0, True
    if tie or top is None:
        reference = next((r for r, d in enumerate(digests) if d is not None), 0)
        return list(range(len(digests))), reference, False
    return [r for r, d in enumerate(digests) if d != top], digests.index(top), True


def compare_digests(
    per_rank: list[dict[str, str]],
    step: int | None = None,
    facts: list[RankFacts] | None = None,
    elements: dict[str, list[TensorDiff]] | None = None,
    separate: list[str] | None = None,
    unfingerprinted: tuple[str, ...] = (),
) -> ReplicaReport:
    """Majority vote per tensor over every rank's digests, and the diagnosis (pure; no communication).

    Each rank's combined fingerprint leaves out the `separate` kinds and the `unfingerprinted`
    ones (gradients digested late, as evidence only)."""
    differing, majority = _vote_all(per_rank)
    separate = list(separate or [])
    report = ReplicaReport(
        world_size=len(per_rank),
        combined=[_combined(d, [*separate, *unfingerprinted]) for d in per_rank],
        differing=differing,
        step=step,
        majority=majority,
        elements=elements or {},
        separate=separate,
    )
    if differing:
        names = set().union(*per_rank)
        report.diagnosis = diagnose(differing, majority, report.elements, names, len(per_rank), step, facts or [])
    return report


def _vote_all(per_rank: list[dict[str, str]]) -> tuple[dict[str, list[int]], dict[str, bool]]:
    """(tensor -> ranks off the majority, tensor -> was there a strict majority) for the differing tensors."""
    differing: dict[str, list[int]] = {}
    majority: dict[str, bool] = {}
    for name in sorted(set().union(*per_rank)):
        odd, _, strict = vote([d.get(name) for d in per_rank])
        if odd:
            differing[name] = odd
            majority[name] = strict
    return differing, majority


# ------------------------------------------------------------------------- what a rank remembers


@dataclass
class _History:
    """One rank's memory of its checks of one model (the module itself holds no such state)."""

    baseline: bool | None = None  # the check before the first update: in sync?
    last_in_sync: str | None = None  # the last check that agreed ("step 3", "before the first step")
    digests: dict[str, str] | None = None  # this rank's digests then
    prior: dict[str, Any] | None = None  # the first divergence: {"at", "diagnosis"}


_histories: weakref.WeakKeyDictionary[nn.Module, _History] = weakref.WeakKeyDictionary()


@dataclass
class Snapshot:
    """One rank's state as a check sees it: the digests and the tensors behind them."""

    digests: dict[str, str]
    tensors: dict[str, torch.Tensor]
    updated: bool | None  # has an update happened (None: no optimizer, no gradient: cannot tell)
    optimizer: torch.optim.Optimizer | None = None
    steps_taken: int | None = None  # distshare.watch's count of optimizer.step() calls
    forward_buffers: dict[str, str] | None = None  # buffers as the last training forward received them (watch)
    # grads="on_divergence": the gradients are digested only once the state is found to differ
    # (they are still in .grad then: the same point of the step), so a check that agrees costs
    # nothing for them. A gradient that differs has already made the state differ by then.
    late_grads: nn.Module | None = None


def check_modes(grads: bool | str, buffers: str) -> None:
    """Refuse a `grads` or `buffers` option that is none of the known ones (ValueError)."""
    if buffers not in BUFFER_MODES:
        raise ValueError(f"buffers={buffers!r}: expected one of {', '.join(BUFFER_MODES)}")
    if grads not in GRAD_MODES:
        raise ValueError(f"grads={grads!r}: expected True, False or 'on_divergence'")


def take_snapshot(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    grads: bool | str = False,
    buffers: str = "compare",
    extra: Extra = None,
    steps_taken: int | None = None,
) -> Snapshot:
    """This rank's state, digested (local: no communication)."""
    check_modes(grads, buffers)
    tensors = dict(named_state_tensors(model, optimizer, grads is True, buffers != "ignore", extra))
    if steps_taken is not None:  # distshare.watch counts optimizer.step() calls: state no optimizer keeps
        tensors[STEPS_TAKEN] = torch.tensor(steps_taken, dtype=torch.int64)
    inner = unwrap(model)
    has_grads = any(p.grad is not None for p in inner.parameters())
    updated = bool(optimizer is not None and optimizer.state) or has_grads or bool(steps_taken)
    known = optimizer is not None or has_grads or steps_taken is not None
    return Snapshot(
        digests=fingerprint_many(tensors),
        tensors=tensors,
        updated=updated if known else None,
        optimizer=optimizer,
        steps_taken=steps_taken,
        late_grads=inner if grads == "on_divergence" else None,
    )


def _optimizer_steps(optimizer: torch.optim.Optimizer | None) -> int | None:
    """The largest `step` count in the optimizer's state (Adam's; SGD keeps none)."""
    if optimizer is None:
        return None
    counts = [float(s["step"]) for s in optimizer.state.values() if "step" in s]
    return int(max(counts)) if counts else None


# ------------------------------------------------------------------------------ the comparison


def compare_replicas(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    grads: bool | str = False,
    step: int | None = None,
    group: dist.ProcessGroup | None = None,
    locate: bool | int = 16,
    buffers: str = "compare",
    extra: Extra = None,
) -> ReplicaReport:
    """Collective: compare every rank's training state by digests; localize and diagnose differences.

    `model` may be the DDP wrapper (its buffer sync setting is then evidence) or the bare
    module. `grads=True` compares the gradients too: call it right after `optimizer.step()`,
    before the next `zero_grad`, to compare the gradients the optimizer just used;
    `grads="on_divergence"` digests them only when the rest of the state differs (free while
    replicas agree; a gradient that differs has made the state differ by then). A first
    check before training (`step=None`) is the starting point later diagnoses build on.
    `buffers`: "compare" (default), "separate" (compared and reported, but a buffer
    difference leaves `in_sync` true: BatchNorm under DDP) or "ignore". `extra`: further
    state to compare (a scheduler's or GradScaler's `state_dict()`, RNG states; a mapping,
    or a function returning one).

    First one 16-byte combined digest per rank travels (a single all_gather); only when
    those disagree do the per-tensor digests follow, then (with `locate`) the values of up
    to that many differing tensors (True: all, False/0: none).
    """
    snapshot = take_snapshot(model, optimizer, grads, buffers, extra)
    return compare_snapshot(model, snapshot, step, group, locate, buffers)


def compare_snapshot(
    model: nn.Module,
    snapshot: Snapshot,
    step: int | None = None,
    group: dist.ProcessGroup | None = None,
    locate: bool | int = 16,
    buffers: str = "compare",
) -> ReplicaReport:
    """Collective: `compare_replicas` for a snapshot this rank has already taken."""
    history = _histories.setdefault(unwrap(model), _History())
    separate = ["buffer"] if buffers == "separate" else []
    local = snapshot.digests
    if not (dist.is_available() and dist.is_initialized()):
        report = compare_digests([local], step, separate=separate)
        _remember(history, report, snapshot, step)
        return report
    world_size = dist.get_world_size(group)
    combined = _combined(local, separate)
    mine = _payload(combined, local, separate)
    if dist.get_backend(group) == "nccl":
        mine = mine.cuda()
    everyone = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(everyone, mine, group=group)
    if all(torch.equal(t, mine) for t in everyone):
        report = ReplicaReport(world_size=world_size, combined=[combined] * world_size, step=step, separate=separate)
        _remember(history, report, snapshot, step)
        return report
    # They differ: from here on every piece of evidence is worth its cost.
    facts = _facts(dist.get_rank(group), model, snapshot, history)
    if snapshot.late_grads is not None:  # now that they are evidence
        named = snapshot.late_grads.named_parameters()
        grads = {f"grad/{n}": local_shard(p.grad) for n, p in named if p.grad is not None}
        local = {**local, **fingerprint_many(grads)}
        snapshot.tensors.update(grads)
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, (local, facts), group=group)
    per_rank = [g[0] if g else {} for g in gathered]
    all_facts = [g[1] for g in gathered if g]
    differing, _ = _vote_all(per_rank)
    elements: dict[str, list[TensorDiff]] = {}
    if locate and differing:
        limit = len(differing) if locate is True else int(locate)
        elements = _locate(_by_kind_in_turn(differing, limit), per_rank, snapshot.tensors, group)
    for f in all_facts:  # the tensors each rank changed since they agreed: only those that differ matter
        if f.changed is not None:
            f.changed = [n for n in f.changed if n in differing]
    # Each rank's fingerprint stays that of its state alone, without gradients digested late.
    late = ("grad",) if snapshot.late_grads is not None else ()
    report = compare_digests(per_rank, step, all_facts, elements, separate, late)
    _remember(history, report, snapshot, step)
    return report


def _combined(digests: dict[str, str], leave_out: list[str]) -> str:
    """One rank's combined fingerprint, without the kinds in `leave_out`."""
    return combined_fingerprint({n: d for n, d in digests.items() if kind_of(n) not in leave_out})


def _payload(combined: str, local: dict[str, str], separate: list[str]) -> torch.Tensor:
    """What the first round gathers: the combined digest (16 bytes), and with buffers="separate"
    the separate tensors' combined digest beside it (32 bytes)."""
    digests = [combined]
    if separate:
        digests.append(_combined(local, [k for k in KINDS if k not in separate]))
    raw = b"".join(bytes.fromhex(d.split(":", 1)[1]) for d in digests)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _facts(rank: int, model: nn.Module, snapshot: Snapshot, history: _History) -> RankFacts:
    """What this rank knows of itself: read only once replicas are found to differ."""
    changed = None
    if history.digests is not None:
        before = history.digests
        changed = [n for n, d in snapshot.digests.items() if before.get(n) != d]
    steps = snapshot.steps_taken if snapshot.steps_taken is not None else _optimizer_steps(snapshot.optimizer)
    return RankFacts(
        rank=rank,
        updated=snapshot.updated,
        buffer_sync=buffer_sync(model),
        forward_buffers=snapshot.forward_buffers,
        changed=changed,
        steps=steps,
        baseline=history.baseline,
        last_in_sync=history.last_in_sync,
        prior=history.prior,
        wrapper=wrapper_notes(model, snapshot.updated),
    )


def _remember(history: _History, report: ReplicaReport, snapshot: Snapshot, step: int | None) -> None:
    label = BEFORE_FIRST_STEP if snapshot.updated is False else (f"step {step}" if step is not None else "a check")
    if snapshot.updated is False and history.baseline is None:
        history.baseline = report.in_sync
    if report.in_sync:
        history.last_in_sync, history.digests = label, snapshot.digests  # a fresh dict per check: no copy
    elif history.prior is None and report.diagnosis is not None:
        history.prior = {"at": label, "diagnosis": report.diagnosis.to_dict()}


def _by_kind_in_turn(differing: dict[str, list[int]], limit: int) -> list[str]:
    """Up to `limit` differing tensors, one of each kind in turn (parameters, gradients,
    hyperparameters, buffers, extra, optimizer state), so every kind is seen element by element."""
    order = ("param", "grad", "hyper", "buffer", "extra", "state")
    queues = {k: sorted(n for n in differing if kind_of(n) == k) for k in order}
    out: list[str] = []
    while len(out) < limit and any(queues.values()):
        for queue in queues.values():
            if queue and len(out) < limit:
                out.append(queue.pop(0))
    return sorted(out)


def _locate(
    names: list[str],
    per_rank: list[dict[str, str]],
    tensors: dict[str, torch.Tensor],
    group: dist.ProcessGroup | None,
) -> dict[str, list[TensorDiff]]:
    """Broadcast each differing tensor from its reference rank; odd ranks compare; gather the findings."""
    rank = dist.get_rank(group)
    found: dict[str, TensorDiff] = {}
    for name in names:
        odd, reference, _ = vote([d.get(name) for d in per_rank])
        payload: list[Any] = [None]
        if rank == reference:
            t = tensors.get(name)
            payload = [t.detach().cpu() if t is not None else None]
        # One object broadcast per differing tensor, from the rank whose copy is the reference.
        dist.broadcast_object_list(payload, src=_global_rank(reference, group), group=group)
        if rank in odd and rank != reference:
            found[name] = localize(tensors.get(name), payload[0], rank, reference)
    everyone: list[dict[str, TensorDiff] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, found, group=group)
    out: dict[str, list[TensorDiff]] = {}
    for per in everyone:
        for name, d in (per or {}).items():
            out.setdefault(name, []).append(d)
    return {name: sorted(ds, key=lambda d: d.rank) for name, ds in sorted(out.items())}


def assert_replicas_in_sync(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    step: int | None = None,
    grads: bool = False,
    buffers: str = "compare",
    extra: Extra = None,
) -> ReplicaReport:
    """Collective: raise `ReplicaDivergenceError` on every rank unless all replicas agree.

    Every rank must call it at the same point (it gathers from all of them). The error
    carries the full report; its message starts with the likely cause and its fix, then names
    the tensors, the ranks and the elements. Call it once before training (it remembers that
    the replicas started equal) and with `grads=True` right after `optimizer.step()`.
    """
    report = compare_replicas(model, optimizer, grads=grads, step=step, buffers=buffers, extra=extra)
    if not report.in_sync:
        raise ReplicaDivergenceError(report)
    return report


def _global_rank(group_rank: int, group: dist.ProcessGroup | None) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def _ranks(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"
