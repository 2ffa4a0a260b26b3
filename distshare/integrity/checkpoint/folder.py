"""Safetensors the ecosystem writes: a bare file, or a folder of them (HF `save_pretrained`).

No manifest recorded their digests, so a flipped bit inside one is found only by comparing
with another copy (`compare_checkpoints`, `match_checkpoint`). What can be checked alone is
the structure, and that is what breaks when a download or a copy is cut short:

- every file's header reads, and every tensor's bytes are inside the file (a truncated
  shard names the tensors it lost);
- a sharded folder's index (`model.safetensors.index.json`) agrees with its shards: every
  shard it names is there, every tensor it names is in the shard it names, no shard holds a
  tensor the index does not know, and its `total_size` is the bytes the shards hold.

Tensors are named by their keys in the files (a model's state_dict keys); a folder reads as
one state, whichever shard holds which tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from distshare.errors import UsageError
from distshare.integrity.checkpoint.format import SAFETENSORS_DTYPES, CheckpointCheck
from distshare.integrity.checkpoint.read import SafetensorsFile
from distshare.integrity.fingerprint import ALGORITHM, combined_fingerprint, fingerprint

SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"  # HF's sharded checkpoints: {"weight_map": {tensor: shard}}


def is_safetensors_folder(path: Path) -> bool:
    """A directory holding `.safetensors` files or a safetensors index."""
    return path.is_dir() and (any(path.glob(f"*{SUFFIX}")) or any(path.glob(f"*{INDEX_SUFFIX}")))


def verify_file(path: Path, keep: dict[str, torch.Tensor] | None = None) -> CheckpointCheck:
    """One `.safetensors` file: every tensor read and digested; UsageError for any other file."""
    if path.suffix != SUFFIX:
        raise UsageError(f"{path}: not a distshare checkpoint (a directory with manifest.json) or a .safetensors file")
    check = CheckpointCheck(str(path), {}, {}, "", kind="safetensors")
    _read_file(check, SafetensorsFile(path), None, keep)
    check.combined = combined_fingerprint(check.digests)
    return check


def verify_folder(path: Path, keep: dict[str, torch.Tensor] | None = None) -> CheckpointCheck:
    """Every `.safetensors` file of a folder, checked against its index if it has one."""
    check = CheckpointCheck(str(path), {}, {}, "", kind="safetensors")
    files = {f.name: SafetensorsFile(f) for f in sorted(path.glob(f"*{SUFFIX}"))}
    where: dict[str, str] = {}  # tensor -> the shard the index says holds it
    for index in sorted(path.glob(f"*{INDEX_SUFFIX}")):
        where |= _read_index(check, index, files)
    for name, f in files.items():
        _read_file(check, f, {t for t, shard in where.items() if shard == name} if where else None, keep)
    for tensor, shard in where.items():
        if shard in files and tensor not in files[shard].header and not files[shard].error:
            check.problems[tensor] = f"not in {shard}, where the index says it is"
    check.combined = combined_fingerprint(check.digests)
    return check


def _read_index(check: CheckpointCheck, index: Path, files: dict[str, SafetensorsFile]) -> dict[str, str]:
    """The index's tensor -> shard map; a shard it names that is missing is named with its tensors."""
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("'weight_map' is not a mapping of tensor names to shard files")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        check.problems[index.name] = f"unreadable ({exc})"
        return {}
    missing: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        check.info.setdefault(tensor, {"dtype": None, "shape": None, "file": shard})
        if shard not in files:
            missing.setdefault(shard, []).append(tensor)
            check.problems[tensor] = f"its shard {shard} is missing"
    for shard, tensors in missing.items():
        check.problems[shard] = f"missing: {index.name} names it for {len(tensors)} tensor(s)"
    total = (data.get("metadata") or {}).get("total_size") if isinstance(data, dict) else None
    held = sum(_nbytes(files[s].header.get(t)) for t, s in weight_map.items() if s in files)
    if isinstance(total, int) and not missing and total != held:
        check.problems[index.name] = f"total_size says {total} bytes, the shards' headers hold {held}"
    return dict(weight_map)


def _nbytes(meta: Any) -> int:
    try:
        begin, end = meta["data_offsets"]
        return int(end) - int(begin)
    except (TypeError, KeyError, ValueError):
        return 0


def _read_file(
    check: CheckpointCheck, f: SafetensorsFile, indexed: set[str] | None, keep: dict[str, torch.Tensor] | None
) -> None:
    """Digest every tensor of one file; `indexed`: the tensors an index places there (None: no index)."""
    if f.error:
        lost = sorted(indexed or ())
        for tensor in lost:
            check.problems[tensor] = f.error
        if not lost:
            check.problems[f.path.name] = f.error
        return
    for name in f.names():
        meta = f.header[name]
        if indexed is not None and name not in indexed:
            check.problems[f"{f.path.name}:{name}"] = f"in {f.path.name} but not in the index there"
            continue
        if name in check.digests or (name in check.info and check.info[name]["file"] != f.path.name):
            check.problems[name] = f"in both {check.info[name]['file']} and {f.path.name}"
            continue
        check.info[name] = {"dtype": _dtype_name(meta), "shape": meta.get("shape"), "file": f.path.name}
        try:
            t = f.read(name)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            check.problems[name] = str(exc)
            continue
        check.digests[name] = fingerprint(t, ALGORITHM)
        if keep is not None:
            keep[name] = t


def _dtype_name(meta: dict[str, Any]) -> str | None:
    # The torch name (`float32`), as a distshare manifest writes it, so the two compare alike.
    dtype = SAFETENSORS_DTYPES.get(meta.get("dtype"))
    return str(dtype).removeprefix("torch.") if dtype is not None else meta.get("dtype")
