"""Verifying and loading a checkpoint: every digest recomputed from the stored bytes first.

A flipped bit, a tampered value or a manifest edited by hand is reported by tensor name, and
nothing is loaded unless everything verifies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from distshare.errors import UsageError
from distshare.integrity.checkpoint.format import (
    MANIFEST,
    MODEL_FILE,
    OPTIM_FILE,
    STATE_FILE,
    CheckpointCheck,
    CheckpointCorrupted,
    meta_digest,
)
from distshare.integrity.checkpoint.read import SafetensorsFile, read_manifest
from distshare.integrity.fingerprint import ALGORITHM, combined_fingerprint, fingerprint
from distshare.integrity.state import unwrap


def verify_checkpoint(path: str | Path, keep: dict[str, torch.Tensor] | None = None) -> CheckpointCheck:
    """Recompute every tensor's digest from the stored bytes and compare with the manifest.

    A checkpoint directory is checked against its manifest; a bare `.safetensors` file has
    no manifest, so its digests are only computed. `keep`, if given, receives the tensors
    read (so a load reads each file once).
    """
    path = Path(path)
    if path.is_file():
        return _verify_bare(path, keep)
    manifest = read_manifest(path)
    recorded = {name: e["digest"] for name, e in manifest["tensors"].items()}
    check = CheckpointCheck(str(path), {}, recorded, "", step=manifest.get("step"))
    files: dict[str, SafetensorsFile] = {}
    for name, entry in manifest["tensors"].items():
        check.info[name] = {"dtype": entry["dtype"], "shape": entry["shape"], "file": entry["file"]}
        f = files.get(entry["file"])
        if f is None:
            f = files[entry["file"]] = SafetensorsFile(path / entry["file"])
        if f.error:
            check.problems[name] = f.error
            continue
        try:
            t = f.read(entry["key"])
        except (ValueError, KeyError, TypeError, OSError) as exc:
            check.problems[name] = str(exc)
            continue
        digest = fingerprint(t, ALGORITHM)
        check.digests[name] = digest
        if str(t.dtype).removeprefix("torch.") != entry["dtype"] or list(t.shape) != entry["shape"]:
            check.problems[name] = (
                f"stored as {t.dtype} {list(t.shape)}, manifest says {entry['dtype']} {entry['shape']}"
            )
        elif digest != entry["digest"]:
            check.problems[name] = f"digest {digest} != recorded {entry['digest']} (bytes changed)"
        if keep is not None:
            keep[name] = t
    for file, f in files.items():  # tensors added to a file behind the manifest's back
        listed = {e["key"] for e in manifest["tensors"].values() if e["file"] == file}
        for key in f.names():
            if key not in listed:
                check.problems[f"{file}:{key}"] = f"in {file} but not in the manifest"
    if combined_fingerprint(recorded) != manifest.get("combined"):
        check.problems[MANIFEST] = "combined digest does not match the per-tensor digests (manifest edited)"
    elif "meta_digest" in manifest and meta_digest(manifest) != manifest["meta_digest"]:
        check.problems[MANIFEST] = "step, position, optimizer settings or config edited (meta digest differs)"
    check.combined = combined_fingerprint(check.digests) if not check.problems else combined_fingerprint(recorded)
    return check


def _verify_bare(path: Path, keep: dict[str, torch.Tensor] | None) -> CheckpointCheck:
    if path.suffix != ".safetensors":
        raise UsageError(f"{path}: not a distshare checkpoint (a directory with {MANIFEST}) or a .safetensors file")
    f = SafetensorsFile(path)
    check = CheckpointCheck(str(path), {}, {}, "")
    if f.error:
        check.problems[path.name] = f.error
        return check
    for name in f.names():
        meta = f.header[name]
        check.info[name] = {"dtype": meta.get("dtype"), "shape": meta.get("shape"), "file": path.name}
        try:
            t = f.read(name)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            check.problems[name] = str(exc)
            continue
        check.digests[name] = fingerprint(t, ALGORITHM)
        if keep is not None:
            keep[name] = t
    check.combined = combined_fingerprint(check.digests)
    return check


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Verify every tensor against the manifest, then load model (and optimizer) state.

    Nothing is loaded unless everything verifies: a damaged checkpoint raises
    `CheckpointCorrupted` naming each bad tensor, and the model is left as it was.
    `state`, if given, receives the checkpoint's other named tensors (see `save_checkpoint`).
    Returns the manifest (step, position, config, extra).
    """
    path = Path(path)
    manifest = read_manifest(path)
    stored: dict[str, torch.Tensor] = {}
    check = verify_checkpoint(path, keep=stored)
    if not check.ok:
        raise CheckpointCorrupted(path, check.problems)
    model_state = {e["key"]: stored[n] for n, e in manifest["tensors"].items() if e["file"] == MODEL_FILE}
    unwrap(model).load_state_dict(model_state)
    if state is not None:
        state.update({e["key"]: stored[n] for n, e in manifest["tensors"].items() if e["file"] == STATE_FILE})
    if optimizer is not None:
        meta = manifest.get("optimizer")
        if meta is None:
            raise UsageError(f"{path}: holds no optimizer state")
        state: dict[int, dict[str, Any]] = {}
        for name, e in manifest["tensors"].items():
            if e["file"] == OPTIM_FILE:
                _, idx, key = e["key"].split("/", 2)
                state.setdefault(int(idx), {})[key] = stored[name]
        for idx, values in meta["other_state"].items():
            state.setdefault(int(idx), {}).update(values)
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return manifest
