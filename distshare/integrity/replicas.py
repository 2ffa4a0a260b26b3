"""Cross-rank comparison of training state: are all replicas bit-identical, and if not, where not.

A collective: every rank calls `compare_replicas` at the same point. In the common case
(all in sync) one 16-byte combined digest per rank travels, never a tensor. When digests
disagree it narrows down in two more rounds:

1. the per-tensor digests (a few dozen bytes per tensor) say which tensors differ; a
   majority vote per tensor names the odd ranks: with 3 or more ranks the odd one out, with
   2 ranks there is no majority and both are named;
2. for the differing tensors only, the reference values (the majority's, or rank 0's when
   there is no majority) are broadcast, and every odd rank compares its own values against
   them: how many elements differ, the first differing (multi-)index, the largest absolute
   difference and the largest ULP distance.

Every rank ends with the same report, so every rank takes the same decision (raise or go on).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distshare.errors import VerificationFailed
from distshare.integrity.fingerprint import (
    check_comparable,
    combined_fingerprint,
    fingerprint_state,
    named_state_tensors,
)
from distshare.numerics.diff import TensorDiff, localize


@dataclass
class ReplicaReport:
    """What every rank's digests say: in sync, or which tensors differ on which ranks, and where."""

    world_size: int
    combined: list[str]  # combined fingerprint of each rank, index = rank
    differing: dict[str, list[int]] = field(default_factory=dict)  # tensor -> ranks off the majority
    step: int | None = None
    majority: dict[str, bool] = field(default_factory=dict)  # tensor -> did a strict majority agree?
    elements: dict[str, list[TensorDiff]] = field(default_factory=dict)  # tensor -> per odd rank, vs reference

    @property
    def in_sync(self) -> bool:
        return not self.differing

    @property
    def odd_ranks(self) -> list[int]:
        """Every rank named for at least one tensor."""
        return sorted({r for ranks in self.differing.values() for r in ranks})

    def summary(self, limit: int = 5) -> str:
        if self.in_sync:
            return f"all {self.world_size} replicas identical ({self.combined[0]})"
        at = f" at step {self.step}" if self.step is not None else ""
        items = sorted(self.differing.items())
        parts = []
        for name, ranks in items[:limit]:
            text = f"{name} on rank{'s' if len(ranks) > 1 else ''} {_ranks(ranks)}"
            if ranks and not self.majority.get(name, True):
                text += " (no majority)"
            found = self.elements.get(name)
            if found:
                text += " [" + "; ".join(d.describe() for d in found) + "]"
            parts.append(text)
        more = f"; and {len(items) - limit} more" if len(items) > limit else ""
        return f"replicas differ{at} in {len(items)} tensor(s): {'; '.join(parts)}{more}"

    @classmethod
    def from_dict(cls, d: dict) -> ReplicaReport:
        """Inverse of `to_dict` (reads reports written before `majority`/`elements` existed too)."""
        return cls(
            world_size=d["world_size"],
            combined=d["combined"],
            differing=d["differing"],
            step=d["step"],
            majority=d.get("majority", {}),
            elements={k: [TensorDiff(**e) for e in v] for k, v in d.get("elements", {}).items()},
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
        }


class ReplicaDivergenceError(VerificationFailed):
    """Replicas that should be identical are not; the message names tensors, ranks and elements."""

    def __init__(self, report: ReplicaReport) -> None:
        super().__init__(report.summary())
        self.report = report


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


def compare_digests(per_rank: list[dict[str, str]], step: int | None = None) -> ReplicaReport:
    """Majority vote per tensor over every rank's digests (pure; no communication)."""
    names = sorted(set().union(*per_rank))
    differing: dict[str, list[int]] = {}
    majority: dict[str, bool] = {}
    for name in names:
        odd, _, strict = vote([d.get(name) for d in per_rank])
        if odd:
            differing[name] = odd
            majority[name] = strict
    return ReplicaReport(
        world_size=len(per_rank),
        combined=[combined_fingerprint(d) for d in per_rank],
        differing=differing,
        step=step,
        majority=majority,
    )


def compare_replicas(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    grads: bool = False,
    step: int | None = None,
    group: dist.ProcessGroup | None = None,
    locate: bool | int = 16,
) -> ReplicaReport:
    """Collective: compare every rank's training state by digests, and localize differences.

    First one 16-byte combined digest per rank travels (a single all_gather); only when
    those disagree do the per-tensor digests follow, then (with `locate`) the values of the
    differing tensors. Every rank sees the same data at each round, so all of them take the
    same branches and end with the same report.

    `locate` bounds the element-wise localization to that many differing tensors (in name
    order; True: all, False/0: none): a rank that has drifted everywhere would otherwise
    broadcast its whole state at every later check. The others are still named by digest.
    """
    local = fingerprint_state(model, optimizer, grads)
    combined = combined_fingerprint(local)
    if not (dist.is_available() and dist.is_initialized()):
        return compare_digests([local], step)
    world_size = dist.get_world_size(group)
    mine = torch.frombuffer(bytearray(bytes.fromhex(combined.split(":", 1)[1])), dtype=torch.uint8)
    backend = dist.get_backend(group)
    if backend == "nccl":
        mine = mine.cuda()
    everyone = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(everyone, mine, group=group)
    if all(torch.equal(t, mine) for t in everyone):
        return ReplicaReport(world_size=world_size, combined=[combined] * world_size, step=step)
    gathered: list[dict[str, str] | None] = [None] * world_size
    dist.all_gather_object(gathered, local, group=group)
    per_rank = [g or {} for g in gathered]
    report = compare_digests(per_rank, step)
    if locate and report.differing:
        limit = len(report.differing) if locate is True else int(locate)
        tensors = dict(named_state_tensors(model, optimizer, grads))
        report.elements = _locate(sorted(report.differing)[:limit], per_rank, tensors, group)
    return report


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
) -> ReplicaReport:
    """Collective: raise `ReplicaDivergenceError` on every rank unless all replicas agree.

    Every rank must call it at the same point (it gathers from all of them). The error
    carries the full report; its message names the tensors, the ranks and the elements.
    """
    report = compare_replicas(model, optimizer, grads=grads, step=step)
    if not report.in_sync:
        raise ReplicaDivergenceError(report)
    return report


def _global_rank(group_rank: int, group: dist.ProcessGroup | None) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def _ranks(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks)
