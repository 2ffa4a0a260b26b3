"""Comparing two checkpoints tensor by tensor, down to the element.

Either side may be a distshare checkpoint, a bare `.safetensors` file or a folder of them (an
HF `save_pretrained` folder). Tensors are paired by name:

- two of a kind: by their names as they are (`model/x` with `model/x`, `x` with `x`);
- a distshare checkpoint with a safetensors file or folder: the checkpoint's `model/x` is the
  file's `x` (both are state_dict keys) and is reported as `model/x`; the checkpoint's
  optimizer and other state, which a weights file cannot hold, are listed as not compared.

A tensor the checkpoint records as a tied alias (`model/lm_head.weight` of GPT-2) that the
other side does not store (HF's `save_pretrained` drops it too) is listed as tied, not as
missing, when the tensor it is an alias of is compared on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distshare.integrity.checkpoint.format import CheckpointCheck
from distshare.integrity.checkpoint.live import checkpoint_name
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
    # Tensors one side cannot hold (a weights file has no optimizer state): named, not compared.
    not_compared: list[str] = field(default_factory=list)
    tied: dict[str, str] = field(default_factory=dict)  # alias stored on one side only -> its target
    info: dict[str, Any] = field(default_factory=dict)  # compared name -> dtype, shape, file (A's, else B's)
    compared: int = 0  # tensors present on both sides

    @property
    def same(self) -> bool:
        return self.a.ok and self.b.ok and not self.differing and not self.only_in_a and not self.only_in_b


def _names(check: CheckpointCheck, other: CheckpointCheck) -> tuple[dict[str, str], list[str]]:
    """(compared name -> this side's tensor name, this side's tensors the other kind cannot hold)."""
    if check.kind == other.kind:
        return {n: n for n in check.info}, []
    if check.kind == "safetensors":  # against a distshare checkpoint: `x` is its `model/x`
        return {checkpoint_name(f"param/{n}"): n for n in check.info}, []
    model = {n: n for n in check.info if n.startswith("model/")}
    return model, sorted(set(check.info) - set(model))


def compare_checkpoints(a: str | Path, b: str | Path) -> CheckpointComparison:
    """Verify both, then compare tensor by tensor; differing tensors are localized element-wise."""
    ta: dict[str, torch.Tensor] = {}
    tb: dict[str, torch.Tensor] = {}
    ca, cb = verify_checkpoint(a, keep=ta), verify_checkpoint(b, keep=tb)
    out = CheckpointComparison(ca, cb)
    (na, skip_a), (nb, skip_b) = _names(ca, cb), _names(cb, ca)
    out.not_compared = sorted(skip_a + skip_b)
    out.info = {n: ca.info[e] for n, e in na.items()} | {n: cb.info[e] for n, e in nb.items() if n not in na}
    both = set(na) & set(nb)
    out.compared = len(both)
    for side, names, other, check in (("a", na, nb, ca), ("b", nb, na, cb)):
        alone = []
        for name in sorted(set(names) - set(other)):
            target = check.aliases.get(names[name])
            target_name = next((n for n, e in names.items() if e == target), None)
            if target_name in both:
                out.tied[name] = target_name
            else:
                alone.append(name)
        setattr(out, f"only_in_{side}", alone)
    for name in sorted(both):
        ea, eb = na[name], nb[name]
        if ea in ta and eb in tb and ca.digests[ea] != cb.digests[eb]:
            diff = localize(tb[eb], ta[ea], rank=1, reference_rank=0)
            if diff.note:  # localize speaks of "mine vs reference", B before A: say A first, by name
                diff.note = f"A {_kind(ta[ea])}, B {_kind(tb[eb])}"
            out.differing[name] = diff
    return out


def _kind(t: torch.Tensor) -> str:
    """dtype and shape, as a differing tensor's note shows them: `float64 [10]`."""
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"
