"""Reading and verifying a sharded checkpoint on the host, in one process: the bytes, then the logical digests.

The reading side of `sharded.py`'s format: its manifest (`read_sharded_manifest`), a file's
digest, which tensors a DCP chunk holds, every tensor reassembled whole from the shards
(`stored_tensors`, no process group). Verification has three layers, each able to fail on its own:

1. the manifest against itself: its `state_digest` is the combination of its tensors' digests,
   its `meta_digest` covers step, position and config (a hand edit is named `manifest.json`);
2. every file against its recorded xxh3_128 digest and size; in a file that changed, each
   stored chunk against its own digest, so the damage is named by file *and* tensor; a missing
   shard file names every tensor it held a piece of;
3. (`logical=True`, only once the bytes verify) every tensor reassembled whole from the shards
   in this process and its `lsh128` digest recomputed: the digest the saving ranks computed from
   their live shards, so this says the files hold the state that was live when it was saved.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import xxhash

from distshare.errors import UsageError
from distshare.integrity.checkpoint.format import (
    DCP_METADATA,
    MANIFEST,
    SHARDED_FORMAT,
    CheckpointCheck,
    CheckpointCorrupted,
    meta_digest,
)
from distshare.integrity.checkpoint.read import load_manifest_json
from distshare.integrity.fingerprint import combined_fingerprint, fingerprint_many
from distshare.integrity.logical import LOGICAL_ALGORITHM
from distshare.integrity.state import hyperparameters

_READ = 1 << 22  # bytes per read when digesting a file


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A directory whose manifest says it is a sharded checkpoint."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("format") == SHARDED_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_sharded_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a sharded checkpoint; UsageError (exit 2) if `path` is not one."""
    path = Path(path)
    manifest = load_manifest_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != SHARDED_FORMAT:
        raise UsageError(f"{path}: not a sharded distshare checkpoint")
    # A hand-edited manifest must reach the readers as a named problem, never as a KeyError.
    shapes = {
        "tensors": (dict, ("kind", "dtype", "shape", "digest", "at")),
        "files": (dict, ("digest", "bytes")),
        "chunks": (list, ("file", "offset", "length", "digest", "fqn")),
    }
    for key, (kind, fields) in shapes.items():
        value = manifest.get(key)
        entries = value.values() if isinstance(value, dict) else value
        if not isinstance(value, kind) or not all(isinstance(e, dict) and all(f in e for f in fields) for e in entries):
            raise CheckpointCorrupted(path, {MANIFEST: f"'{key}' missing or malformed (manifest edited)"})
    return manifest


def file_digest(path: Path, rank: int) -> dict[str, Any]:
    h = xxhash.xxh3_128()
    with path.open("rb") as f:
        while block := f.read(_READ):
            h.update(block)
    return {"digest": f"xxh3_128:{h.hexdigest()}", "bytes": path.stat().st_size, "rank": rank}


def stored_name(fqn: str, tensors: dict[str, Any]) -> list[str]:
    """The live names a DCP chunk's `fqn` holds (`optim.param_groups.0.lr` -> every `optim/group0/*`)."""
    out = []
    for name, e in tensors.items():
        at = e.get("at")
        if not at:
            continue
        dotted = ".".join(str(a) for a in at)
        if dotted == fqn or (at[:2] == ["optim", "param_groups"] and fqn.startswith(".".join(map(str, at[:3])) + ".")):
            out.append(name)
    return out


def stored_tensors(path: str | Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of the manifest, whole, read from the shard files in this one process (no
    process group): what `distshare checksum` digests. Hyperparameters come from the stored
    param groups, as `named_state_tensors` makes them."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    sd: dict[str, Any] = {}
    _load_state_dict(sd, storage_reader=FileSystemReader(str(path)), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    out: dict[str, torch.Tensor] = {}
    groups: dict[int, dict[str, torch.Tensor]] = {}
    for name, e in manifest["tensors"].items():
        at = e.get("at")
        if not at:
            continue
        if at[:2] == ["optim", "param_groups"]:
            index = int(at[2])
            if index not in groups:
                group = _lookup(sd, at[:3])
                groups[index] = dict(hyperparameters(group)) if isinstance(group, dict) else {}
            value = groups[index].get(at[3])
        else:
            value = _lookup(sd, at)
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif value is not None:
            out[name] = torch.tensor(value)
    return out


def _lookup(sd: Any, at: list[Any]) -> Any:
    for key in at:
        if isinstance(sd, dict) and key in sd:
            sd = sd[key]
        elif isinstance(sd, dict) and str(key) in sd:
            sd = sd[str(key)]
        elif isinstance(sd, list) and isinstance(key, int) and key < len(sd):
            sd = sd[key]
        else:
            return None
    return sd


def check_manifest(manifest: dict[str, Any]) -> dict[str, str]:
    """Problems of the manifest alone: digests that no longer agree with each other."""
    live = {n: e["digest"] for n, e in manifest["tensors"].items() if e.get("kind") != "state"}
    if combined_fingerprint(live) != manifest.get("state_digest"):
        return {MANIFEST: "state digest does not match the tensors' logical digests (manifest edited)"}
    if meta_digest(manifest) != manifest.get("meta_digest"):
        return {MANIFEST: "step, position, config or extra edited (meta digest differs)"}
    return {}


def check_files(path: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """Every file's bytes against the manifest; damage named by file and by tensor."""
    problems: dict[str, str] = {}
    tensors = manifest["tensors"]
    by_file: dict[str, list[dict[str, Any]]] = {}
    for c in manifest["chunks"]:
        by_file.setdefault(c["file"], []).append(c)
    for name, recorded in sorted(manifest["files"].items()):
        f = path / name
        held = sorted({t for c in by_file.get(name, []) for t in stored_name(c["fqn"], tensors)})
        if not f.is_file():
            problems[name] = f"missing (written by rank {recorded.get('rank')}; held pieces of {len(held)} tensor(s))"
            for t in held:
                problems.setdefault(t, f"a piece of it was in {name}, which is missing")
            continue
        now = file_digest(f, recorded.get("rank", 0))
        if now["digest"] == recorded["digest"] and now["bytes"] == recorded["bytes"]:
            continue
        changed = []
        with f.open("rb") as handle:
            for c in by_file.get(name, []):
                handle.seek(c["offset"])
                data = handle.read(c["length"])
                if len(data) != c["length"] or f"xxh3_128:{xxhash.xxh3_128_hexdigest(data)}" != c["digest"]:
                    changed.append(c)
        where = f"{now['bytes']} bytes, recorded {recorded['bytes']}" if now["bytes"] != recorded["bytes"] else ""
        what = f"digest {now['digest']} != recorded {recorded['digest']}"
        problems[name] = f"bytes changed ({what}{'; ' + where if where else ''})"
        for c in changed:
            for t in stored_name(c["fqn"], tensors) or [c["fqn"]]:
                at = f" at offset {c['at']}" if c.get("at") else ""
                problems.setdefault(
                    t, f"its chunk{at} in {name} (bytes {c['offset']}..{c['offset'] + c['length']}) changed"
                )
        if not changed and name != DCP_METADATA:
            problems[name] += ": outside any tensor's chunk"
    listed = set(manifest["files"])
    for f in sorted(path.glob("*.distcp")):
        if f.name not in listed:
            problems[f.name] = "a shard file the manifest does not list"
    return problems


def verify_sharded(path: str | Path, logical: bool = True) -> CheckpointCheck:
    """Verify a sharded checkpoint directory (see the module docstring); never raises for damage."""
    path = Path(path)
    manifest = read_sharded_manifest(path)
    tensors = manifest["tensors"]
    recorded = {n: e["digest"] for n, e in tensors.items()}
    check = CheckpointCheck(str(path), {}, recorded, manifest.get("state_digest") or "", step=manifest.get("step"))
    check.kind = "distshare-sharded"
    files_of: dict[str, set[str]] = {}
    for c in manifest["chunks"]:
        for t in stored_name(c["fqn"], tensors):
            files_of.setdefault(t, set()).add(c["file"])
    for name, e in tensors.items():
        held = sorted(files_of.get(name, ()))
        where = held[0] if len(held) == 1 else (f"{len(held)} shard files" if held else "manifest only")
        check.info[name] = {"dtype": e["dtype"], "shape": e["shape"], "file": where}
    check.problems.update(check_manifest(manifest))
    check.problems.update(check_files(path, manifest))
    layout = manifest.get("layout") or {}
    saved_from = f"saved from {layout.get('parallel')} on {layout.get('world_size')} rank(s)"
    if layout.get("mesh_shape"):
        saved_from += f", mesh {'x'.join(map(str, layout['mesh_shape']))}"
    what = [f"{len(manifest['files'])} files' bytes and {len(manifest['chunks'])} chunks checked"]
    check.digests = dict(recorded)
    if logical and not check.problems:
        whole = stored_tensors(path, manifest)
        recomputed = fingerprint_many(whole, LOGICAL_ALGORITHM)
        for name, e in tensors.items():
            if not e.get("at"):
                continue  # kept by digest only (a non-persistent buffer): nothing stored to recompute
            got = recomputed.get(name)
            if got is None:
                check.problems[name] = "not found in the shard files"
            elif got != e["digest"]:
                check.problems[name] = f"logical digest {got} != recorded {e['digest']} (the stored state differs)"
            else:
                check.digests[name] = got
        what.append(f"{len(recomputed)} logical digests recomputed from the shards ({LOGICAL_ALGORITHM})")
    elif logical:
        what.append("logical digests not recomputed: the manifest or the bytes did not verify")
    else:
        what.append("logical digests not recomputed (--bytes-only)")
    check.verified = f"{saved_from}; " + "; ".join(what)
    live = {n: d for n, d in check.digests.items() if tensors[n].get("kind") != "state"}
    check.state_digest = combined_fingerprint(live)
    check.combined = combined_fingerprint(check.digests)
    return check
