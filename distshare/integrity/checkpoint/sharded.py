"""Sharded checkpoints: every rank writes its own shards, the manifest holds the logical digests.

    save_sharded_checkpoint("ckpt/step-100", model, optimizer, step=100)   # every rank (a collective)
    load_sharded_checkpoint("ckpt/step-100", model, optimizer)             # any layout, any W, or one process
    distshare checksum ckpt/step-100                                       # the bytes, then the logical digests

An FSDP2 / HSDP model holds one parameter set that no rank holds whole, so a checkpoint of it
is written where it lies: `torch.distributed.checkpoint` (DCP) has every rank write its own
shards (`__<rank>_<n>.distcp`; replicated tensors once) and rank 0 the DCP `.metadata` that
places every chunk. Beside them rank 0 writes `manifest.json`:

- `tensors`: per tensor of the training state, under `fingerprint_state`'s names, its dtype,
  logical shape, where DCP stores it, and its `lsh128` digest: the digest of the *logical*
  tensor, computed from the shards without gathering them (`distshare.integrity.logical`), the
  same whatever layout holds it; and `state_digest`, the combined digest of the model's and
  optimizer's tensors: `state_digest(model, optimizer)` of the saved state, any layout;
- `layout`: what it was saved from (world size, mesh shape and dimension names, each tensor's
  placements), for the reader: a load reshards to whatever layout the caller built;
- `files` and `chunks`: every file's xxh3_128 digest and size, and each stored chunk's byte
  range and digest, so `distshare checksum` names the tensor a changed byte belongs to;
- the step, plan position, config and `meta_digest`, as in a replicated checkpoint.

Loading reshards through DCP (FSDP at another shard count, HSDP, DDP, or one process with no
process group at all), then digests the loaded state's logical tensors and compares each with
the manifest's: a state that does not come back as saved is refused, its tensors named.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import xxhash
from torch import nn

from distshare.errors import VerificationFailed
from distshare.integrity.checkpoint.format import (
    DCP_METADATA,
    MANIFEST,
    SHARDED_FORMAT,
    SHARDED_VERSION,
    CheckpointCorrupted,
    meta_digest,
)
from distshare.integrity.checkpoint.sharded_verify import (
    check_files,
    check_manifest,
    file_digest,
    read_sharded_manifest,
)
from distshare.integrity.fingerprint import combined_fingerprint, fingerprint_many, fingerprint_state
from distshare.integrity.logical import LOGICAL_ALGORITHM, is_dtensor, logical_fingerprints
from distshare.integrity.state import named_state_tensors

STORAGE = "torch.distributed.checkpoint"


def save_sharded_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    step: int | None = None,
    cfg: Any = None,
    position: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Write a sharded checkpoint of `model` (and `optimizer`): a collective, every rank calls it.

    Works on any layout (FSDP2, HSDP, a DDP replica, one process). `state` holds further named
    tensors kept verbatim (RNG states, loss history): the same on every rank, written once.
    The directory appears complete or not at all: written under a temporary name, renamed by
    rank 0 after every rank's files and the manifest are on disk. Returns the manifest.
    """
    import torch.distributed.checkpoint as dcp

    from distshare.integrity.checkpoint.write import _fsync_dir, _jsonable, _replace_dir, _versions

    path = Path(path)
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    # The logical digests first, from the live shards (one small all-gather for all tensors),
    # every replica group's: DCP writes a replicated shard once, from whichever group, so groups
    # that disagree (HSDP after a divergence) would leave a checkpoint of neither. Refused.
    live, groups = logical_fingerprints(dict(named_state_tensors(model, optimizer, shards=False)), all_groups=True)
    split = sorted(name for name, by_group in groups.items() if len(set(by_group.values())) > 1)
    if split:
        shown = ", ".join(split[:3]) + (f" and {len(split) - 3} more" if len(split) > 3 else "")
        raise VerificationFailed(
            f"{path}: not saved: the replica groups hold different values of {len(split)} tensor(s) ({shown}); "
            "a checkpoint would keep one group's shards and another's digests (compare_replicas says where)"
        )
    tensors = _entries(model, optimizer, live)
    extra_state = {k: v.detach().cpu() for k, v in (state or {}).items()}
    for name, digest in fingerprint_many(extra_state, LOGICAL_ALGORITHM).items():
        t = extra_state[name]
        tensors[f"state/{name}"] = _entry(t, digest, ["state", name], kind="state")
    tmp = path.parent / f".{path.name}.sharded.tmp"  # the same name on every rank
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if distributed:
        dist.barrier()
    md = dcp.save(_dcp_state(model, optimizer, extra_state), checkpoint_id=str(tmp), no_dist=not distributed)
    # Each rank digests the files it wrote (its own prefix: no shared file system needed),
    # byte range by byte range, so a changed byte can be traced to the tensor it belongs to.
    mine = _digest_own_files(tmp, rank, md)
    every = [mine]
    if distributed:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    files = {name: f for part in every for name, f in part["files"].items()}
    chunks = sorted((c for part in every for c in part["chunks"]), key=lambda c: (c["file"], c["offset"]))
    manifest = {
        "format": SHARDED_FORMAT,
        "version": SHARDED_VERSION,
        "algorithm": LOGICAL_ALGORITHM,
        "storage": STORAGE,
        "step": step,
        "position": position,
        "layout": _layout(model, optimizer, distributed),
        "tensors": tensors,
        "state_digest": combined_fingerprint(live),
        "files": files,
        "chunks": chunks,
        "config": _jsonable(cfg),
        "versions": _versions(),
        "extra": extra or {},
    }
    manifest["meta_digest"] = meta_digest(manifest)
    if rank == 0:
        # `.metadata` is the coordinator's: rank 0 digests it after the save finished.
        files[DCP_METADATA] = file_digest(tmp / DCP_METADATA, rank)
        manifest["meta_digest"] = meta_digest(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str) + "\n")
        for f in tmp.iterdir():
            with f.open("rb") as handle:
                os.fsync(handle.fileno())
        _replace_dir(tmp, path)
        _fsync_dir(path.parent)
    if distributed:
        dist.barrier()  # no rank returns before the checkpoint exists under its name
    return manifest


def load_sharded_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    state: dict[str, torch.Tensor] | None = None,
    verify_bytes: bool = True,
) -> dict[str, Any]:
    """Load a sharded checkpoint into `model` (and `optimizer`) in whatever layout they are now.

    A collective where the model is sharded (every rank calls it); in one process, no process
    group is needed. First the manifest is checked against itself and (`verify_bytes`) every
    file against its recorded digest; then DCP reshards the stored chunks into the live layout;
    then the loaded state's logical digests are compared with the manifest's. Any difference
    raises `CheckpointCorrupted` naming the tensors. `state` receives the stored extra tensors.
    Returns the manifest.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    path = Path(path)
    manifest = read_sharded_manifest(path)
    problems = check_manifest(manifest)
    if verify_bytes and not problems:
        problems = check_files(path, manifest)
    if problems:
        raise CheckpointCorrupted(path, problems)
    distributed = dist.is_available() and dist.is_initialized()
    want = {  # the extra tensors, read into tensors of their recorded dtype and shape
        e["at"][1]: torch.empty(e["shape"], dtype=getattr(torch, e["dtype"]))
        for e in manifest["tensors"].values()
        if e["kind"] == "state" and state is not None
    }
    sd = _dcp_state(model, optimizer, want)
    with warnings.catch_warnings():
        # Without a process group DCP warns that it assumes one process: here that is the intent.
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(sd, checkpoint_id=str(path), no_dist=not distributed)
    options = StateDictOptions(strict=True)
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"], options=options)
    else:
        set_state_dict(model, (), model_state_dict=sd["model"], optim_state_dict={}, options=options)
    live = fingerprint_state(model, optimizer, algorithm=LOGICAL_ALGORITHM)  # a collective when sharded
    recorded = {n: e["digest"] for n, e in manifest["tensors"].items() if e["kind"] != "state"}
    if optimizer is None:
        recorded = {n: d for n, d in recorded.items() if not n.startswith("optim/")}
    if state is not None:
        loaded = sd.get("state", {})
        state.update(loaded)
        live |= {f"state/{k}": d for k, d in fingerprint_many(loaded, LOGICAL_ALGORITHM).items()}
        recorded |= {n: e["digest"] for n, e in manifest["tensors"].items() if e["kind"] == "state"}
    differ = {
        name: f"loaded {live.get(name, 'nothing')}, the manifest records {recorded.get(name, 'nothing')}"
        for name in sorted(set(live) | set(recorded))
        if live.get(name) != recorded.get(name)
    }
    if differ:
        raise CheckpointCorrupted(path, differ)
    return manifest


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, torch.Tensor]) -> dict:
    """What DCP writes and reads: the model's and optimizer's state dicts in DCP's own form
    (names without wrapper prefixes, optimizer state keyed by parameter name), and `state`."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer)
        out: dict[str, Any] = {"model": msd, "optim": osd}
    else:
        out = {"model": get_model_state_dict(model)}
    if state:
        out["state"] = dict(state)
    return out


def _entry(t: torch.Tensor, digest: str, at: list[Any] | None, kind: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "dtype": str(t.dtype).removeprefix("torch."),
        "shape": list(t.shape),
        "digest": digest,
        "at": at,  # the path to it in DCP's nested state dict; None: not stored (a non-persistent buffer)
    }


def _entries(model: nn.Module, optimizer: torch.optim.Optimizer | None, live: dict[str, str]) -> dict[str, Any]:
    """Per live name: its logical digest and where DCP keeps it."""
    from distshare.integrity.state import unwrap

    persistent = set(unwrap(model).state_dict())
    out: dict[str, Any] = {}
    for name, t in named_state_tensors(model, optimizer, shards=False):
        head, _, rest = name.partition("/")
        if head in ("param", "buffer"):
            at, kind = (["model", rest] if rest in persistent else None), "model"
        elif rest.startswith("group") and "/" in rest and rest.split("/", 1)[0][5:].isdigit():
            group, key = rest.split("/", 1)
            at, kind = ["optim", "param_groups", int(group[5:]), key], "optim"
        else:
            param, key = rest.rsplit("/", 1)
            at, kind = ["optim", "state", param, key], "optim"
        out[name] = _entry(t, live[name], at, kind)
    return out


def _layout(model: nn.Module, optimizer: torch.optim.Optimizer | None, distributed: bool) -> dict[str, Any]:
    """What the checkpoint was saved from: world, mesh, and each sharded tensor's placements."""
    placements: dict[str, list[str]] = {}
    mesh = None
    for name, t in named_state_tensors(model, optimizer, shards=False):
        if is_dtensor(t):
            placements[name] = [repr(p) for p in t.placements]  # Shard(dim=0), Replicate()
            mesh = mesh or t.device_mesh
    kind = "single process"
    if mesh is not None:
        kind = "fsdp" if mesh.ndim == 1 else "hsdp"
    elif distributed:
        kind = "replicated (ddp)"
    return {
        "parallel": kind,
        "world_size": dist.get_world_size() if distributed else 1,
        "mesh_shape": list(mesh.mesh.shape) if mesh is not None else None,
        "mesh_dim_names": list(mesh.mesh_dim_names or ()) if mesh is not None else None,
        "placements": placements,
    }


def _digest_own_files(directory: Path, rank: int, md: Any) -> dict[str, Any]:
    """This rank's files (DCP names them `__<rank>_<n>.distcp`), whole and chunk by chunk."""
    prefix = f"__{rank}_"
    files = {f.name: file_digest(f, rank) for f in sorted(directory.glob(f"{prefix}*.distcp"))}
    chunks = []
    for index, info in md.storage_data.items():
        if info.relative_path not in files:
            continue
        with (directory / info.relative_path).open("rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        chunks.append(
            {
                "file": info.relative_path,
                "offset": info.offset,
                "length": info.length,
                "digest": f"xxh3_128:{xxhash.xxh3_128_hexdigest(data)}",
                "fqn": index.fqn,
                "at": list(index.offset) if index.offset is not None else None,
            }
        )
    return {"files": files, "chunks": chunks}
