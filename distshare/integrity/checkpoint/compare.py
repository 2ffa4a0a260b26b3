"""Comparing two checkpoints tensor by tensor, down to the element."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from distshare.integrity.checkpoint.format import CheckpointCheck
from distshare.integrity.checkpoint.verify import verify_checkpoint
from distshare.numerics.diff import TensorDiff, localize


@dataclass
class CheckpointComparison:
    """Two checkpoints, tensor by tensor: which differ and where (B against A as the reference)."""

    a: CheckpointCheck
    b: CheckpointCheck
    differing: dict[str, TensorDiff] = field(default_factory=dict)  # tensor -> where b departs from a
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)

    @property
    def same(self) -> bool:
        return self.a.ok and self.b.ok and not self.differing and not self.only_in_a and not self.only_in_b


def compare_checkpoints(a: str | Path, b: str | Path) -> CheckpointComparison:
    """Verify both, then compare tensor by tensor; differing tensors are localized element-wise."""
    ta: dict[str, torch.Tensor] = {}
    tb: dict[str, torch.Tensor] = {}
    ca, cb = verify_checkpoint(a, keep=ta), verify_checkpoint(b, keep=tb)
    out = CheckpointComparison(ca, cb)
    names_a, names_b = set(ca.info), set(cb.info)
    out.only_in_a = sorted(names_a - names_b)
    out.only_in_b = sorted(names_b - names_a)
    for name in sorted(names_a & names_b):
        if name in ta and name in tb and ca.digests[name] != cb.digests[name]:
            out.differing[name] = localize(tb[name], ta[name], rank=1, reference_rank=0)
    return out
