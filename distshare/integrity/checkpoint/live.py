"""Live names: how `fingerprint_state` names what a checkpoint stores, so the two can be matched.

A checkpoint is organised by file (`model/<state_dict key>`, `optim/<param>/<key>`); the live
state by kind (`param/<name>`, `buffer/<name>`, `optim/<param>/<key>`, `optim/group<i>/<hyper>`,
see `distshare.integrity.state`). The map between them:

- `param/x` and `buffer/x` are the checkpoint's `model/x` (a bare safetensors file or an HF
  folder: `x`); a tied alias (`model/lm_head.weight`) has no live name, since
  `named_parameters` names a tied tensor once;
- `optim/<param>/<key>` is the same name in both;
- what the live state holds but no tensor file does (the optimizer's hyperparameters and
  non-tensor state, buffers registered with `persistent=False`) is recorded in the manifest
  by digest (`live_only`), so the manifest's `state_digest` equals `state_digest(model, optimizer)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from distshare.integrity.fingerprint import ALGORITHM, combined_fingerprint, fingerprint
from distshare.integrity.state import named_state_tensors


def checkpoint_name(live: str) -> str:
    """The checkpoint entry a live name is stored under: `param/x`, `buffer/x` -> `model/x`."""
    head, _, rest = live.partition("/")
    return f"model/{rest}" if head in ("param", "buffer") else live


def live_names(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, entries: Mapping[str, Mapping[str, Any]]
) -> tuple[dict[str, str], dict[str, str]] | None:
    """(entry name -> live name, live name -> digest of what no entry stores) for `model`'s state.

    None where the live state cannot be digested (an optimizer keeping state no tensor can hold,
    which `fingerprint_state` refuses too): the checkpoint is then written without a state digest.
    """
    names: dict[str, str] = {}
    live_only: dict[str, str] = {}
    try:
        for live, t in named_state_tensors(model, optimizer):
            entry = checkpoint_name(live)
            if entry in entries and "alias_of" not in entries[entry]:
                names[entry] = live
            else:
                live_only[live] = fingerprint(t, ALGORITHM)
    except (TypeError, ValueError, RuntimeError):
        return None
    return names, live_only


def live_digests(
    digests: Mapping[str, str], entries: Mapping[str, Mapping[str, Any]], live_only: Mapping[str, str]
) -> dict[str, str]:
    """The live state's per-tensor digests as a version-2 manifest records them."""
    out = {e["live"]: digests[name] for name, e in entries.items() if "live" in e and name in digests}
    return out | dict(live_only)


def recorded_state_digest(
    digests: Mapping[str, str], entries: Mapping[str, Mapping[str, Any]], live_only: Mapping[str, str]
) -> str:
    """`state_digest(model, optimizer)` of the saved state, from the stored tensors' digests."""
    return combined_fingerprint(live_digests(digests, entries, live_only))
