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
from distshare.integrity.checkpoint.folder import is_safetensors_folder, verify_file, verify_folder
from distshare.integrity.checkpoint.format import (
    MANIFEST,
    MODEL_FILE,
    OPTIM_FILE,
    STATE_FILE,
    CheckpointCheck,
    CheckpointCorrupted,
    meta_digest,
)
from distshare.integrity.checkpoint.live import recorded_state_digest
from distshare.integrity.checkpoint.read import SafetensorsFile, read_manifest
from distshare.integrity.checkpoint.sharded_verify import is_sharded_checkpoint, verify_sharded
from distshare.integrity.checkpoint.ties import restore_ties
from distshare.integrity.fingerprint import ALGORITHM, combined_fingerprint, fingerprint
from distshare.integrity.state import unwrap


def verify_checkpoint(
    path: str | Path, keep: dict[str, torch.Tensor] | None = None, logical: bool = True
) -> CheckpointCheck:
    """Recompute every tensor's digest from the stored bytes and compare with the manifest.

    A checkpoint directory is checked against its manifest. A bare `.safetensors` file, or a
    folder of them (an HF `save_pretrained` folder, sharded with its index or not), has no
    manifest: its digests are only computed, and a sharded folder's index is checked against
    its shards (`folder.py`). `keep`, if given, receives the tensors read (so a load reads
    each file once). A sharded checkpoint (`sharded.py`) has its files' bytes checked and, with
    `logical`, its tensors' logical digests recomputed from the shards (`sharded_verify.py`).
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file or directory")
    if path.is_file():
        return verify_file(path, keep)
    if not (path / MANIFEST).exists():
        if is_safetensors_folder(path):
            return verify_folder(path, keep)
        raise UsageError(f"{path}: not a distshare checkpoint (no {MANIFEST}) nor a folder of .safetensors files")
    if is_sharded_checkpoint(path):
        return verify_sharded(path, logical=logical)
    manifest = read_manifest(path)
    recorded = {name: e["digest"] for name, e in manifest["tensors"].items()}
    check = CheckpointCheck(str(path), {}, recorded, "", step=manifest.get("step"))
    files: dict[str, SafetensorsFile] = {}
    read: dict[tuple[str, str], torch.Tensor] = {}  # a tied tensor is read once for all its names
    for name, entry in manifest["tensors"].items():
        check.info[name] = {"dtype": entry["dtype"], "shape": entry["shape"], "file": entry["file"]}
        key = entry.get("stored_as", entry["key"])
        if "alias_of" in entry:
            check.aliases[name] = entry["alias_of"]
            target = manifest["tensors"].get(entry["alias_of"])
            if target is None or target.get("stored_as", target["key"]) != key or target["file"] != entry["file"]:
                check.problems[name] = f"alias of {entry['alias_of']}, which is not stored as {key} (manifest edited)"
                continue
        f = files.get(entry["file"])
        if f is None:
            f = files[entry["file"]] = SafetensorsFile(path / entry["file"])
        if f.error:
            check.problems[name] = f.error
            continue
        try:
            t = read.get((entry["file"], key))
            if t is None:
                t = read[entry["file"], key] = f.read(key)
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
            changed = f"bytes of {check.aliases[name]} changed" if name in check.aliases else "bytes changed"
            check.problems[name] = f"digest {digest} != recorded {entry['digest']} ({changed})"
        if keep is not None:
            keep[name] = t
    for file, f in files.items():  # tensors added to a file behind the manifest's back
        listed = {e.get("stored_as", e["key"]) for e in manifest["tensors"].values() if e["file"] == file}
        for key in f.names():
            if key not in listed:
                check.problems[f"{file}:{key}"] = f"in {file} but not in the manifest"
    if combined_fingerprint(recorded) != manifest.get("combined"):
        check.problems[MANIFEST] = "combined digest does not match the per-tensor digests (manifest edited)"
    elif "meta_digest" in manifest and meta_digest(manifest) != manifest["meta_digest"]:
        check.problems[MANIFEST] = "step, position, optimizer settings or config edited (meta digest differs)"
    elif "state_digest" in manifest and _live_digest(recorded, manifest) != manifest["state_digest"]:
        check.problems[MANIFEST] = "state digest does not match the live names' digests (manifest edited)"
    check.combined = combined_fingerprint(check.digests) if not check.problems else combined_fingerprint(recorded)
    if "state_digest" in manifest:
        digests = check.digests if not check.problems else recorded
        check.state_digest = _live_digest(digests, manifest)
    return check


def _live_digest(digests: dict[str, str], manifest: dict[str, Any]) -> str:
    return recorded_state_digest(digests, manifest["tensors"], manifest.get("live_only") or {})


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
    # What was one tensor when saved is one tensor again (a no-op where the model ties it itself).
    restore_ties(unwrap(model), {e["key"]: e["stored_as"] for e in manifest["tensors"].values() if "alias_of" in e})
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
