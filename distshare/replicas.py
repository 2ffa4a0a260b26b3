"""Cross-rank comparison of training state: are all replicas bit-identical, and if not, where not.

A collective: every rank calls `compare_replicas` at the same point. Only digests travel
(a few dozen bytes per tensor), never the tensors. When digests disagree, the ranks that
differ are found by majority vote per tensor: with 3 or more ranks the odd one out is named;
with 2 ranks there is no majority and both are named.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from distshare.checksum import combined_fingerprint, fingerprint_state
from distshare.errors import VerificationFailed


@dataclass
class ReplicaReport:
    """What every rank's digests say: in sync, or which tensors differ on which ranks."""

    world_size: int
    combined: list[str]  # combined fingerprint of each rank, index = rank
    differing: dict[str, list[int]] = field(default_factory=dict)  # tensor -> ranks off the majority
    step: int | None = None

    @property
    def in_sync(self) -> bool:
        return not self.differing

    def summary(self, limit: int = 5) -> str:
        if self.in_sync:
            return f"all {self.world_size} replicas identical ({self.combined[0]})"
        at = f" at step {self.step}" if self.step is not None else ""
        items = sorted(self.differing.items())
        shown = "; ".join(f"{name} on rank{'s' if len(r) > 1 else ''} {_ranks(r)}" for name, r in items[:limit])
        more = f"; and {len(items) - limit} more" if len(items) > limit else ""
        return f"replicas differ{at} in {len(items)} tensor(s): {shown}{more}"

    @classmethod
    def from_dict(cls, d: dict) -> ReplicaReport:
        """Inverse of `to_dict` (JSON turns nothing here into something else)."""
        return cls(world_size=d["world_size"], combined=d["combined"], differing=d["differing"], step=d["step"])

    def to_dict(self) -> dict:
        return {
            "world_size": self.world_size,
            "in_sync": self.in_sync,
            "step": self.step,
            "combined": self.combined,
            "differing": self.differing,
        }


class ReplicaDivergenceError(VerificationFailed):
    """Replicas that should be identical are not; the message names tensors and ranks."""

    def __init__(self, report: ReplicaReport) -> None:
        super().__init__(report.summary())
        self.report = report


def compare_digests(per_rank: list[dict[str, str]], step: int | None = None) -> ReplicaReport:
    """Majority vote per tensor over every rank's digests (pure; no communication)."""
    names = sorted(set().union(*per_rank))
    differing: dict[str, list[int]] = {}
    for name in names:
        digests = [d.get(name) for d in per_rank]
        counts = Counter(digests)
        top, top_count = counts.most_common(1)[0]
        tie = sum(1 for c in counts.values() if c == top_count) > 1
        if len(counts) == 1 and top is not None:
            continue
        odd = list(range(len(digests))) if tie else [r for r, d in enumerate(digests) if d != top]
        differing[name] = odd
    return ReplicaReport(
        world_size=len(per_rank),
        combined=[combined_fingerprint(d) for d in per_rank],
        differing=differing,
        step=step,
    )


def compare_replicas(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    grads: bool = False,
    step: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> ReplicaReport:
    """Collective: compare every rank's training state by digests.

    First one 16-byte combined digest per rank travels (a single all_gather); only when
    those disagree do the per-tensor digests follow, to say which tensors on which ranks.
    Every rank sees the same combined digests, so all of them take the same branch.
    """
    local = fingerprint_state(model, optimizer, grads)
    combined = combined_fingerprint(local)
    if not (dist.is_available() and dist.is_initialized()):
        return compare_digests([local], step)
    world_size = dist.get_world_size(group)
    mine = torch.frombuffer(bytearray(bytes.fromhex(combined.split(":", 1)[1])), dtype=torch.uint8)
    everyone = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(everyone, mine, group=group)
    if all(torch.equal(t, mine) for t in everyone):
        return ReplicaReport(world_size=world_size, combined=[combined] * world_size, step=step)
    gathered: list[dict[str, str] | None] = [None] * world_size
    dist.all_gather_object(gathered, local, group=group)
    return compare_digests([g or {} for g in gathered], step)


def assert_replicas_in_sync(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None, step: int | None = None
) -> ReplicaReport:
    """Collective: raise `ReplicaDivergenceError` on every rank unless all replicas agree."""
    report = compare_replicas(model, optimizer, step=step)
    if not report.in_sync:
        raise ReplicaDivergenceError(report)
    return report


def _ranks(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks)
