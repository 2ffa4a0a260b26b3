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

Sharded models (FSDP2 / HSDP, parameters that are `DTensor`s) are compared by what each rank
holds: its local shard of every sharded tensor goes against the same shard in the other
replica groups (the ranks whose mesh coordinates differ only on the dimensions the tensor is
replicated along), and the tensors no mesh cuts (buffers, step counts, hyperparameters) go
against every rank. The mesh is read from the model's own `DTensor`s: no group to pass (an
explicit `group=` still compares shard against shard across that group alone). Under pure
FSDP every shard is held once: the report says so (`ReplicaReport.layout`) and counts none of
them as checked; `distshare.check_sharded_init` checks those against a reference digest.
A differing element is named in the logical tensor (the shard's offset applied), with its
replica group and shard (`ReplicaReport.sites`).

Each rank remembers, per model, what its last check saw (whether the check before the first
update agreed, its own digests at the last check that agreed, the first divergence): a first
check before training (`step=None`) is what later diagnoses build on.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
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
from distshare.integrity.logical import is_dtensor
from distshare.integrity.state import named_state_tensors, unwrap
from distshare.integrity.wrapper_facts import buffer_sync, wrapper_notes
from distshare.numerics.diff import TensorDiff, describe, localize

BUFFER_MODES = ("compare", "separate", "ignore")
GRAD_MODES = (False, True, "on_divergence")
Extra = Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None


@dataclass
class ShardSite:
    """Where one rank's differing shard of a sharded tensor sits in the logical tensor.

    Replica groups and shards are named by mesh coordinates: `replica_group` on the mesh
    dimensions the tensor is replicated along (HSDP's replicate dimension), `shard` on those it
    is cut along. The `TensorDiff` beside it gives its first differing element in the logical
    tensor (this shard's `offset` applied); `local_index` is the same element in the shard.
    """

    rank: int  # ranks in the group compared (the world, or an explicit group)
    reference_rank: int
    replica_group: list[int]
    reference_group: list[int]
    shard: list[int]
    shards: int  # how many shards the tensor is cut into
    offset: list[int]  # the shard's global offset in the logical tensor
    shape: list[int]  # the logical tensor's shape
    local_index: list[int] | None = None
    global_ranks: list[int] | None = None  # [rank, reference_rank] in the world, when a group was passed

    def describe(self, d: TensorDiff) -> str:
        """ "shard 1 of 2, replica group 1 (rank 3) vs replica group 0 (rank 1): 1 of 26 element(s)
        differ, first at logical [9, 1] (group 0 ..., group 1 ...), ...; [2, 1] in the shard"."""
        mine, ref = _coordinate(self.replica_group), _coordinate(self.reference_group)
        rank, reference = self.global_ranks or (self.rank, self.reference_rank)
        head = f"shard {_coordinate(self.shard)} of {self.shards}, " if self.shards > 1 else ""
        head += f"replica group {mine} (rank {rank}) vs replica group {ref} (rank {reference})"
        body = describe(d, sides=(f"group {ref}", f"group {mine}")).replace("first at [", "first at logical [", 1)
        if self.local_index is not None and self.shards > 1:
            body += f"; [{', '.join(str(i) for i in self.local_index)}] in the shard"
        return f"{head}: {body}"


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
    # A sharded model's layout as the check saw it (None: no DTensor): kind ("hsdp", "fsdp",
    # "replicated"), mesh, replica groups, shards, and what was compared: "compared" sharded
    # tensors (each shard against its copies in the other replica groups), "held_once" (no
    # replica: nothing to compare), "replicated" (plain tensors, against every rank).
    layout: dict[str, Any] | None = None
    sites: dict[str, list[ShardSite]] = field(default_factory=dict)  # tensor -> per odd rank: group, shard
    # A difference first seen by a rolling every-step check (distshare.integrity.rolling): the
    # state step and slice whose digests differed (`Coverage.to_dict()`); this report is the full
    # check that followed, at `step`. None: this check alone found it.
    coverage: dict[str, Any] | None = None

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
            if self.layout is not None and self.layout.get("by_mesh"):
                return self.layout_line()
            return f"all {self.world_size} replicas identical ({self.combined[0]})"
        at = f" at step {self.step}" if self.step is not None else ""
        if self.coverage is not None:
            c = self.coverage
            at += f" (first seen in the state of step {c['state_step']}, slice {c['slice'] + 1} of {c['slices']})"
        if not at and self.diagnosis is not None and self.diagnosis.evidence.get("check") == BEFORE_FIRST_STEP:
            at = f" {BEFORE_FIRST_STEP}"
        apart = " and ".join(KIND_WORDS[k] for k in self.separate)
        head = "replicas differ" if not self.in_sync else f"replicas in sync but for {apart} (checked apart)"
        why = f"{self.diagnosis.describe()} | " if self.diagnosis is not None else ""
        return f"{head}{at}: {why}{self.locations(limit)}"

    def layout_line(self) -> str:
        """What a check of a sharded model compared, honestly: shards held once are not "identical"."""
        lay = self.layout or {}
        mesh = " x ".join(str(n) for n in lay.get("mesh", []))
        dims = f" ({', '.join(lay['dims'])})" if lay.get("dims") else ""
        parts = []
        if lay.get("compared"):
            groups, tensors = lay.get("replica_groups", 0), _plural(lay["compared"], "sharded tensor")
            parts.append(
                f"{tensors}: each shard identical in its {groups} replica groups"
                if self.identical
                else f"{tensors} compared shard by shard across {groups} replica groups"
            )
        if lay.get("held_once"):
            parts.append(
                f"{_plural(lay['held_once'], 'tensor')} sharded once: nothing to compare (no replica group holds "
                "a copy; distshare.check_sharded_init(model, expected) checks them against a reference)"
            )
        if lay.get("replicated"):
            same = "identical" if self.identical else "compared"
            parts.append(f"{_plural(lay['replicated'], 'replicated tensor')} {same} across {self.world_size} ranks")
        return f"{str(lay.get('kind', 'sharded')).upper()} mesh {mesh}{dims}: " + "; ".join(parts)

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
                sites = {s.rank: s for s in self.sites.get(name, [])}
                text += " [" + "; ".join(sites[d.rank].describe(d) if d.rank in sites else d.describe() for d in found)
                text += "]"
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
            layout=d.get("layout"),
            sites={k: [ShardSite(**s) for s in v] for k, v in d.get("sites", {}).items()},
            coverage=d.get("coverage"),
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
            "layout": self.layout,
            "sites": {k: [asdict(s) for s in v] for k, v in self.sites.items()},
            "coverage": self.coverage,
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
    classes: Classes | None = None,
    layout: dict[str, Any] | None = None,
    sites: dict[str, list[ShardSite]] | None = None,
) -> ReplicaReport:
    """Majority vote per tensor over every rank's digests, and the diagnosis (pure; no communication).

    Each rank's combined fingerprint leaves out the `separate` kinds and the `unfingerprinted`
    ones (gradients digested late, as evidence only). `classes` (tensor -> a key per rank):
    only ranks with the same key hold copies of each other (the same shard of a sharded
    tensor); a tensor not in it is held whole by every rank."""
    differing, majority = _vote_all(per_rank, classes)
    separate = list(separate or [])
    report = ReplicaReport(
        world_size=len(per_rank),
        combined=[_combined(d, [*separate, *unfingerprinted]) for d in per_rank],
        differing=differing,
        step=step,
        majority=majority,
        elements=elements or {},
        separate=separate,
        layout=layout,
        sites=sites or {},
    )
    if differing:
        names = set().union(*per_rank)
        report.diagnosis = diagnose(
            differing, majority, report.elements, names, len(per_rank), step, facts or [], layout
        )
    return report


# tensor -> one key per rank: ranks with equal keys hold copies of one another (the same shard).
Classes = Mapping[str, list[Any]]


def _members(keys: list[Any] | None, world_size: int) -> list[list[int]]:
    """The ranks holding copies of one another, class by class (all ranks when `keys` is None)."""
    if keys is None:
        return [list(range(world_size))]
    by_key: dict[Any, list[int]] = {}
    for rank, key in enumerate(keys):
        by_key.setdefault(key, []).append(rank)
    return list(by_key.values())


def _votes(name: str, per_rank: list[dict[str, str]], classes: Classes | None) -> list[tuple[list[int], int, bool]]:
    """Per class of copies holding `name` (2 ranks or more): (odd ranks, reference rank, majority?)."""
    digests = [d.get(name) for d in per_rank]
    out = []
    for members in _members((classes or {}).get(name), len(per_rank)):
        if len(members) < 2:
            continue  # a shard held once: no copy to compare it with
        odd, reference, strict = vote([digests[r] for r in members])
        out.append(([members[i] for i in odd], members[reference], strict))
    return out


def _vote_all(
    per_rank: list[dict[str, str]], classes: Classes | None = None
) -> tuple[dict[str, list[int]], dict[str, bool]]:
    """(tensor -> ranks off the majority, tensor -> was there a strict majority) for the differing tensors."""
    differing: dict[str, list[int]] = {}
    majority: dict[str, bool] = {}
    for name in sorted(set().union(*per_rank)):
        votes = [v for v in _votes(name, per_rank, classes) if v[0]]
        if votes:
            differing[name] = sorted(r for odd, _, _ in votes for r in odd)
            majority[name] = all(strict for _, _, strict in votes)
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
    # The sharded tensors (FSDP2 / HSDP DTensors) by name; `tensors` holds their local shards.
    sharded: dict[str, Any] = field(default_factory=dict)


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
    tensors, sharded = _split_shards(
        named_state_tensors(model, optimizer, grads is True, buffers != "ignore", extra, shards=False)
    )
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
        sharded=sharded,
    )


def _split_shards(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(name -> what this rank holds: a DTensor's local shard, any other tensor as it is; name -> the DTensors)."""
    tensors: dict[str, torch.Tensor] = {}
    sharded: dict[str, Any] = {}
    for name, t in named:
        if is_dtensor(t):
            sharded[name] = t
            tensors[name] = t.to_local()
        else:
            tensors[name] = t
    return tensors, sharded


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
    # A sharded model over the whole mesh: each shard against its copies (None: every rank holds
    # every tensor whole, or an explicit group whose ranks are the copies).
    classes, layout = _mesh_classes(snapshot.sharded, len(snapshot.tensors), group)
    combined = _combined(local, separate)
    mine = _payload(combined, local, separate, classes)
    if dist.get_backend(group) == "nccl":
        mine = mine.cuda()
    everyone = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(everyone, mine, group=group)
    if _agree(everyone, classes):
        combined_all = [bytes(t.cpu()[:16].tolist()).hex() for t in everyone]
        algo = combined.split(":", 1)[0]
        report = ReplicaReport(
            world_size=world_size,
            combined=[f"{algo}:{c}" for c in combined_all],
            step=step,
            separate=separate,
            layout=layout,
        )
        _remember(history, report, snapshot, step)
        return report
    # They differ: from here on every piece of evidence is worth its cost.
    facts = _facts(dist.get_rank(group), model, snapshot, history)
    if snapshot.late_grads is not None:  # now that they are evidence
        named = [(f"grad/{n}", p.grad) for n, p in snapshot.late_grads.named_parameters() if p.grad is not None]
        grads, sharded_grads = _split_shards(named)
        local = {**local, **fingerprint_many(grads)}
        snapshot.tensors.update(grads)
        snapshot.sharded.update(sharded_grads)
        if classes is not None:
            classes, layout = _mesh_classes(snapshot.sharded, len(snapshot.tensors), group)
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, (local, facts), group=group)
    per_rank = [g[0] if g else {} for g in gathered]
    all_facts = [g[1] for g in gathered if g]
    differing, _ = _vote_all(per_rank, classes)
    elements: dict[str, list[TensorDiff]] = {}
    sites: dict[str, list[ShardSite]] = {}
    if locate and differing:
        limit = len(differing) if locate is True else int(locate)
        names = _by_kind_in_turn(differing, limit)
        jobs = [(n, odd, ref) for n in names for odd, ref, _ in _votes(n, per_rank, classes) if odd]
        elements, sites = _locate(jobs, snapshot.tensors, snapshot.sharded, group)
    for f in all_facts:  # the tensors each rank changed since they agreed: only those that differ matter
        if f.changed is not None:
            f.changed = [n for n in f.changed if n in differing]
    # Each rank's fingerprint stays that of its state alone, without gradients digested late.
    late = ("grad",) if snapshot.late_grads is not None else ()
    report = compare_digests(per_rank, step, all_facts, elements, separate, late, classes, layout, sites)
    _remember(history, report, snapshot, step)
    return report


# ------------------------------------------------------------------------- sharded models


def _roles(t: Any) -> dict[int, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Global rank -> (replica group, shard) of a DTensor: its mesh coordinates on the dimensions
    the tensor is replicated along, and on the others (cut, or pending a reduction)."""
    from torch.distributed.tensor import Replicate

    mesh = t.device_mesh.mesh
    out = {}
    for coordinate in itertools.product(*(range(n) for n in mesh.shape)):
        replicated = [isinstance(p, Replicate) for p in t.placements]
        group = tuple(c for c, r in zip(coordinate, replicated, strict=True) if r)
        shard = tuple(c for c, r in zip(coordinate, replicated, strict=True) if not r)
        out[int(mesh[coordinate])] = (group, shard)
    return out


def _layout(t: Any) -> dict[str, Any]:
    """A DTensor's mesh in a report's words: kind, mesh shape and names, replica groups, shards."""
    from torch.distributed.tensor import Replicate

    shape = list(t.device_mesh.mesh.shape)
    names = t.device_mesh.mesh_dim_names
    replicas = math.prod(n for n, p in zip(shape, t.placements, strict=True) if isinstance(p, Replicate))
    shards = math.prod(n for n, p in zip(shape, t.placements, strict=True) if not isinstance(p, Replicate))
    kind = "hsdp" if replicas > 1 and shards > 1 else "fsdp" if shards > 1 else "replicated"
    return {
        "kind": kind,
        "mesh": shape,
        "dims": list(names) if names else None,
        "replica_groups": replicas,
        "shards": shards,
    }


def _mesh_classes(
    sharded: Mapping[str, Any], tensors: int, group: dist.ProcessGroup | None
) -> tuple[dict[str, list[Any]] | None, dict[str, Any] | None]:
    """(tensor -> each rank's shard, the layout) of a sharded model checked over its whole mesh.

    (None, layout) when `group` is not the mesh's ranks (an explicit group, e.g. HSDP's
    replicate group: its ranks are the copies, compared shard against shard); (None, None)
    for a model without DTensors.
    """
    if not sharded:
        return None, None
    first = next((t for n, t in sharded.items() if kind_of(n) == "param"), next(iter(sharded.values())))
    layout = _layout(first)
    ranks = [_global_rank(g, group) for g in range(dist.get_world_size(group))]
    classes: dict[str, list[Any]] = {}
    counts = {"compared": 0, "held_once": 0, "replicated": tensors - len(sharded)}
    seen: dict[tuple, dict] = {}  # one mesh walk per (mesh, placements), not per tensor
    for name, t in sharded.items():
        key = (id(t.device_mesh), tuple(t.placements))
        roles = seen[key] if key in seen else seen.setdefault(key, _roles(t))
        if set(roles) != set(ranks):
            return None, {**layout, "by_mesh": False}
        keys = [roles[r][1] for r in ranks]
        classes[name] = keys
        sizes = Counter(keys).values()
        counts["replicated" if len(sizes) == 1 else "compared" if max(sizes) > 1 else "held_once"] += 1
    return classes, {**layout, **counts, "by_mesh": True}


def _signature(classes: Mapping[str, list[Any]], rank: int) -> tuple:
    """Which shard of every sharded tensor `rank` holds: ranks with equal signatures hold copies."""
    return tuple(classes[n][rank] for n in sorted(classes))


def _agree(everyone: list[torch.Tensor], classes: Mapping[str, list[Any]] | None) -> bool:
    """Do the first round's payloads agree: all equal, or (sharded) the replicated part equal
    everywhere and the sharded part equal among the ranks holding the same shards."""
    rows = [bytes(t.cpu().tolist()) for t in everyone]
    if classes is None:
        return all(r == rows[0] for r in rows)
    # [combined | separate? | replicated | sharded]: the combined digest mixes shards, skip it.
    if any(r[16:-16] != rows[0][16:-16] for r in rows):
        return False
    held: dict[tuple, bytes] = {}  # the shards' digest of the first rank holding each set of shards
    return all(held.setdefault(_signature(classes, rank), r[-16:]) == r[-16:] for rank, r in enumerate(rows))


def _site(t: Any, d: TensorDiff, group: dist.ProcessGroup | None) -> tuple[TensorDiff, ShardSite]:
    """A differing shard's first element in the logical tensor (its offset applied), and where the shard sits."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(tuple(t.shape), t.device_mesh, t.placements)
    roles = _roles(t)
    ranks = [_global_rank(d.rank, group), _global_rank(d.reference_rank, group)]
    mine, reference = roles[ranks[0]], roles[ranks[1]]
    local = d.first_index
    logical = None
    if local is not None and len(local) == len(offset):
        logical = [i + int(o) for i, o in zip(local, offset, strict=True)]
    site = ShardSite(
        rank=d.rank,
        reference_rank=d.reference_rank,
        replica_group=list(mine[0]),
        reference_group=list(reference[0]),
        shard=list(mine[1]),
        shards=_layout(t)["shards"],
        offset=[int(o) for o in offset],
        shape=list(t.shape),
        local_index=local,
        global_ranks=ranks if ranks != [d.rank, d.reference_rank] else None,
    )
    return dataclasses.replace(d, first_index=logical if logical is not None else local), site


def _combined(digests: dict[str, str], leave_out: list[str]) -> str:
    """One rank's combined fingerprint, without the kinds in `leave_out`."""
    return combined_fingerprint({n: d for n, d in digests.items() if kind_of(n) not in leave_out})


def _payload(
    combined: str, local: dict[str, str], separate: list[str], classes: Mapping[str, Any] | None = None
) -> torch.Tensor:
    """What the first round gathers: the combined digest (16 bytes), and with buffers="separate"
    the separate tensors' combined digest beside it (32 bytes); for a sharded model then the
    combined digests of the replicated tensors and of this rank's shards (16 bytes each)."""
    digests = [combined]
    if separate:
        digests.append(_combined(local, [k for k in KINDS if k not in separate]))
    if classes is not None:
        digests.append(_combined({n: d for n, d in local.items() if n not in classes}, separate))
        digests.append(_combined({n: d for n, d in local.items() if n in classes}, separate))
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
    jobs: list[tuple[str, list[int], int]],
    tensors: dict[str, torch.Tensor],
    sharded: Mapping[str, Any],
    group: dist.ProcessGroup | None,
) -> tuple[dict[str, list[TensorDiff]], dict[str, list[ShardSite]]]:
    """Broadcast each differing tensor (or shard) from its reference rank; odd ranks compare; gather the findings.

    `jobs`: (tensor, odd ranks, reference rank), one per set of copies that disagree (a
    sharded tensor: one per shard). A shard's finding is given in the logical tensor, with
    where the shard sits (`ShardSite`)."""
    rank = dist.get_rank(group)
    found: dict[str, tuple[TensorDiff, ShardSite | None]] = {}
    for name, odd, reference in jobs:
        payload: list[Any] = [None]
        if rank == reference:
            t = tensors.get(name)
            payload = [t.detach().cpu() if t is not None else None]
        # One object broadcast per differing tensor, from the rank whose copy is the reference.
        dist.broadcast_object_list(payload, src=_global_rank(reference, group), group=group)
        if rank in odd and rank != reference:
            d = localize(tensors.get(name), payload[0], rank, reference)
            found[name] = _site(sharded[name], d, group) if name in sharded else (d, None)
    everyone: list[dict[str, tuple[TensorDiff, ShardSite | None]] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, found, group=group)
    out: dict[str, list[TensorDiff]] = {}
    sites: dict[str, list[ShardSite]] = {}
    for per in everyone:
        for name, (d, site) in (per or {}).items():
            out.setdefault(name, []).append(d)
            if site is not None:
                sites.setdefault(name, []).append(site)
    elements = {name: sorted(ds, key=lambda d: d.rank) for name, ds in sorted(out.items())}
    return elements, {name: sorted(ss, key=lambda s: s.rank) for name, ss in sorted(sites.items())}


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


def _coordinate(key: list[int]) -> str:
    """A mesh coordinate in words: "1" on one dimension, "(0, 1)" on several."""
    return str(key[0]) if len(key) == 1 else "(" + ", ".join(str(k) for k in key) + ")"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"
