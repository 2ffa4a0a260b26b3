"""Matching a live model (and optimizer) against a checkpoint: is this the state that was saved?

The live state is what `fingerprint_state(model, optimizer)` digests; the checkpoint is
verified first, then read under the live names (`live.py`): `param/x` and `buffer/x` are its
`model/x` (a safetensors file's or HF folder's `x`), `optim/...` the same name in both. A
differing tensor is localized element by element against the stored copy; what a version-2
manifest records by digest only (the optimizer's hyperparameters, non-persistent buffers) is
compared by digest.

    report = match_checkpoint(model, "ckpt/step-100", optimizer)
    assert report.ok, report.describe()
    report.live_digest == read_manifest("ckpt/step-100")["state_digest"]   # == state_digest(model, optimizer)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distshare.integrity.checkpoint.format import CheckpointCheck
from distshare.integrity.checkpoint.read import read_manifest
from distshare.integrity.checkpoint.verify import verify_checkpoint
from distshare.integrity.fingerprint import ALGORITHM, combined_fingerprint, fingerprint, fingerprint_many
from distshare.integrity.state import hyperparameters, named_state_tensors, unwrap
from distshare.numerics.diff import TensorDiff, describe, localize


@dataclass
class CheckpointMatch:
    """A live state against a checkpoint, under the live names (the checkpoint is the reference)."""

    path: str
    check: CheckpointCheck  # the checkpoint's own verification (a damaged one never matches)
    matching: list[str] = field(default_factory=list)
    differing: dict[str, TensorDiff] = field(default_factory=dict)  # live name -> where the live tensor departs
    only_live: list[str] = field(default_factory=list)
    only_checkpoint: list[str] = field(default_factory=list)  # checkpoint names
    tied: dict[str, str] = field(default_factory=dict)  # checkpoint alias -> the live tensor it is one with
    not_compared: list[str] = field(default_factory=list)  # optimizer or other state, when not asked for
    live_digest: str = ""  # state_digest(model, optimizer) computed on the host (xxh3_128)
    checkpoint_digest: str | None = None  # the same digest of the checkpoint's tensors under the live names

    @property
    def ok(self) -> bool:
        return self.check.ok and not self.differing and not self.only_live and not self.only_checkpoint

    def describe(self) -> str:
        """One line: the verdict, then each differing or one-sided tensor (the first few)."""
        if self.ok:
            return f"the live state matches {self.path}: {len(self.matching)} tensors"
        parts = [f"{n}: DAMAGED in the checkpoint, {why}" for n, why in sorted(self.check.problems.items())]
        parts += [f"{n}: {describe(d, ('checkpoint', 'live'))}" for n, d in self.differing.items()]
        parts += [f"{n}: only in the live state" for n in self.only_live]
        parts += [f"{n}: only in the checkpoint" for n in self.only_checkpoint]
        more = f"; and {len(parts) - 5} more" if len(parts) > 5 else ""
        return f"the live state does not match {self.path} in {len(parts)} tensor(s): {'; '.join(parts[:5])}{more}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "live_digest": self.live_digest,
            "checkpoint_digest": self.checkpoint_digest,
            "matching": self.matching,
            "differing": {
                n: {**d.__dict__, "description": describe(d, ("checkpoint", "live"))} for n, d in self.differing.items()
            },
            "only_live": self.only_live,
            "only_checkpoint": self.only_checkpoint,
            "tied": self.tied,
            "not_compared": self.not_compared,
            "damaged": self.check.problems,
        }


def match_checkpoint(
    model: nn.Module, path: str | Path, optimizer: torch.optim.Optimizer | None = None
) -> CheckpointMatch:
    """Compare the live state with a checkpoint (distshare's, a safetensors file, an HF folder).

    Without `optimizer`, only parameters and buffers are compared (the checkpoint's optimizer
    state is listed as not compared). Digests are computed on the host (xxh3_128), whatever
    device the model is on, so `live_digest` is comparable with the manifest's `state_digest`.
    """
    path = Path(path)
    stored: dict[str, torch.Tensor] = {}
    check = verify_checkpoint(path, keep=stored)
    live = dict(named_state_tensors(model, optimizer))
    live_digests = fingerprint_many(live, ALGORITHM)
    report = CheckpointMatch(str(path), check, live_digest=combined_fingerprint(live_digests))
    bare = unwrap(model)
    state_dict = bare.state_dict()
    distshare = check.kind == "distshare"
    manifest = read_manifest(path) if distshare else {}

    pairs: dict[str, str] = {}  # live name -> checkpoint name
    for name in check.info:
        key = name.removeprefix("model/") if distshare else name
        if distshare and not name.startswith("model/"):  # optimizer or other state: same names live
            if name in live:
                pairs[name] = name
            elif optimizer is not None and name.startswith("optim/"):
                report.only_checkpoint.append(name)
            else:
                report.not_compared.append(name)
            continue
        candidates = [n for n in (f"param/{key}", f"buffer/{key}") if n in live]
        if candidates:
            pairs[candidates[0]] = name
        elif key in state_dict and name in check.digests:
            # Tied in the live model (`named_parameters` names it once): the stored tensor must
            # equal the live one it is tied to.
            target = next((n for n, t in named_state_tensors(bare) if _same_view(t, state_dict[key])), None)
            if target is None:
                report.only_checkpoint.append(name)
            elif check.digests[name] == live_digests[target]:
                report.tied[name] = target
            else:
                report.differing[name] = localize(state_dict[key], stored[name], rank=1, reference_rank=0)
        elif name not in check.problems:
            report.only_checkpoint.append(name)

    recorded = _recorded_by_digest(manifest)
    for lname, t in live.items():
        if lname in pairs:
            cname = pairs[lname]
            if cname not in check.digests:
                continue  # damaged: check.problems names it
            if check.digests[cname] == live_digests[lname]:
                report.matching.append(lname)
            else:
                report.differing[lname] = localize(t, stored[cname], rank=1, reference_rank=0)
        elif lname in recorded:
            if recorded[lname] == live_digests[lname]:
                report.matching.append(lname)
            else:
                n = t.numel()
                why = "digest differs from the one the manifest records (no stored copy to localize)"
                report.differing[lname] = TensorDiff(1, 0, n, n, None, None, None, note=why)
        else:
            report.only_live.append(lname)
    report.only_checkpoint += sorted(
        n for n in recorded if n not in live and (optimizer is not None or not n.startswith("optim/"))
    )
    for name, target in check.aliases.items():  # a distshare checkpoint's own record of a tie
        lname = next((n for n, c in pairs.items() if c == target), None)
        if lname is not None and name not in pairs.values() and name not in report.differing:
            report.tied[name] = lname
    report.only_checkpoint = [n for n in report.only_checkpoint if n not in report.tied]
    theirs = {lname: check.digests[c] for lname, c in pairs.items() if c in check.digests}
    theirs |= {n: d for n, d in recorded.items() if n in live}
    report.checkpoint_digest = combined_fingerprint(theirs)
    return report


def _recorded_by_digest(manifest: dict[str, Any]) -> dict[str, str]:
    """Live names a checkpoint holds by digest only: a version-2 manifest's `live_only`; for
    version 1, the optimizer's hyperparameters recomputed from its param groups."""
    if not manifest:
        return {}
    if "live_only" in manifest:
        return dict(manifest["live_only"])
    groups = (manifest.get("optimizer") or {}).get("param_groups") or []
    return {
        f"optim/group{i}/{key}": fingerprint(value, ALGORITHM)
        for i, group in enumerate(groups)
        for key, value in hyperparameters(group)
    }


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() == b.storage_offset()
        and a.shape == b.shape
        and a.stride() == b.stride()
    )
