"""Checkpoints that prove their own integrity: safetensors files plus a manifest of fingerprints.

    save_checkpoint("ckpt/step-100", model, optimizer, step=100, cfg=cfg)
    load_checkpoint("ckpt/step-100", model, optimizer)     # refuses any tensor whose digest is off
    verify_checkpoint("ckpt/step-100")                     # -> CheckpointCheck, per tensor

A checkpoint is a directory:

- `model.safetensors`: `model.state_dict()` (parameters and buffers), under their names;
- `optimizer.safetensors`: every tensor of `optimizer.state_dict()["state"]`, as
  `state/<param index>/<key>` (Adam moments, step counts), stored losslessly so that a
  resume continues bit for bit;
- `state.safetensors` (optional): any other state a resume needs, under its own names
  (`distshare.integrity.resume` keeps every rank's RNG states and the run's loss history there);
- `manifest.json`: per tensor its file, dtype, shape and fingerprint; the combined digest;
  the optimizer's non-tensor parts (param groups, non-tensor state); the step, the position
  in the global batch plan, the run config and library versions; and a digest of those
  non-tensor parts, so a hand-edited learning rate or step is caught like a changed tensor.

It is written into a temporary directory next to the target and renamed into place, so a
crash leaves either the old checkpoint or the new one, never half of one.

Verification reads the safetensors files itself (the format is an 8-byte header length, a
JSON header and raw bytes), tensor by tensor: a truncated file still has its intact tensors
verified, and every damaged one is named. A digest is recomputed from the stored bytes, so
a flipped bit, a tampered value or a manifest edited by hand is reported by tensor name.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from distshare.errors import UsageError, VerificationFailed
from distshare.integrity.fingerprint import ALGORITHM, combined_fingerprint, fingerprint
from distshare.integrity.state import unwrap

FORMAT = "distshare-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
STATE_FILE = "state.safetensors"

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointCorrupted(VerificationFailed):
    """A checkpoint whose stored tensors do not match its manifest; names every bad tensor."""

    def __init__(self, path: Path, problems: dict[str, str]) -> None:
        shown = "; ".join(f"{name}: {why}" for name, why in sorted(problems.items())[:5])
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        super().__init__(f"checkpoint {path} is damaged in {len(problems)} tensor(s): {shown}{more}")
        self.path = path
        self.problems = problems


@dataclass
class CheckpointCheck:
    """The result of verifying one checkpoint (or one bare safetensors file)."""

    path: str
    digests: dict[str, str]  # tensor -> digest of the bytes as stored now
    recorded: dict[str, str]  # tensor -> digest the manifest recorded (empty for a bare file)
    combined: str  # combined digest of the stored tensors
    problems: dict[str, str] = field(default_factory=dict)  # tensor (or file) -> what is wrong
    info: dict[str, Any] = field(default_factory=dict)  # tensor -> {"dtype", "shape", "file"}
    step: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "step": self.step,
            "combined": self.combined,
            "tensors": {
                name: {**self.info.get(name, {}), "digest": self.digests.get(name), "problem": self.problems.get(name)}
                for name in sorted(set(self.digests) | set(self.recorded) | set(self.info))
            },
            "problems": self.problems,
        }


# ---------------------------------------------------------------- writing


def plan_position(step: int, steps_per_epoch: int, plan: dict[str, Any] | None = None) -> dict[str, Any]:
    """Where the next step starts in the global batch plan: what a resume needs to continue."""
    epoch, in_epoch = divmod(step + 1, steps_per_epoch) if steps_per_epoch else (0, step + 1)
    return {"next_step": step + 1, "epoch": epoch, "step_in_epoch": in_epoch, **(plan or {})}


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    step: int | None = None,
    cfg: Any = None,
    position: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    overwrite: bool = True,
    state: dict[str, torch.Tensor] | None = None,
    after_file: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write a checkpoint directory atomically; return its manifest.

    `cfg` may be a RunConfig (or any dataclass / dict); `position` says where in the plan
    (see `plan_position`); `extra` is any JSON the caller wants kept; `state` any other
    named tensors (RNG states, histories), verified like the model's. `after_file(path)` is
    called after each tensor file is written (tests interrupt a save there).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise UsageError(f"{path}: exists (pass overwrite=True to replace it)")
    model_tensors = {k: _host(v) for k, v in unwrap(model).state_dict().items()}
    optim_tensors: dict[str, torch.Tensor] = {}
    optim_meta: dict[str, Any] | None = None
    if optimizer is not None:
        sd = optimizer.state_dict()
        other: dict[str, dict[str, Any]] = {}
        for idx, param_state in sd["state"].items():
            for key, value in param_state.items():
                if isinstance(value, torch.Tensor):
                    optim_tensors[f"state/{idx}/{key}"] = _host(value)
                else:
                    other.setdefault(str(idx), {})[key] = value
        optim_meta = {"class": type(optimizer).__name__, "param_groups": sd["param_groups"], "other_state": other}
    index_names = _optimizer_index_names(model, optimizer) if optimizer is not None else {}
    state_tensors = {k: _host(v) for k, v in (state or {}).items()}
    tensors: dict[str, dict[str, Any]] = {}
    for file, group in ((MODEL_FILE, model_tensors), (OPTIM_FILE, optim_tensors), (STATE_FILE, state_tensors)):
        for name, t in group.items():
            tensors[_entry(file, name, index_names)] = {
                "file": file,
                "key": name,
                "dtype": str(t.dtype).removeprefix("torch."),
                "shape": list(t.shape),
                "digest": fingerprint(t, ALGORITHM),
            }
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "algorithm": ALGORITHM,
        "step": step,
        "position": position,
        "combined": combined_fingerprint({n: e["digest"] for n, e in tensors.items()}),
        "tensors": tensors,
        "optimizer": optim_meta,
        "config": _jsonable(cfg),
        "versions": _versions(),
        "extra": extra or {},
    }
    manifest["meta_digest"] = _meta_digest(manifest)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        for file, group, wanted in (
            (MODEL_FILE, model_tensors, True),
            (OPTIM_FILE, optim_tensors, optimizer is not None),
            (STATE_FILE, state_tensors, bool(state_tensors)),
        ):
            if wanted:
                save_file(group, str(tmp / file))
                if after_file is not None:
                    after_file(str(tmp / file))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str) + "\n")
        _usual_permissions(tmp)
        _fsync_tree(tmp)  # the bytes are on disk before the name says the checkpoint exists
        _replace_dir(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def save_run_checkpoint(
    path: str | Path,
    run: Any,
    step: int,
    extra: dict[str, Any] | None = None,
    state: dict[str, torch.Tensor] | None = None,
    after_file: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Checkpoint a `distshare.training.Run` after `step`: its config, plan position, rank."""
    plan = run.plan
    resolved = plan.plan
    position = plan_position(
        step,
        plan.steps_per_epoch,
        {
            "plan_seed": plan.seed,
            "global_batch": resolved.global_batch,
            "world_size": resolved.world_size,
            "accum_steps": resolved.accum_steps,
            "micro_batch": resolved.micro_batch,
        },
    )
    info = {"rank": run.world.rank, "world_size": run.world.world_size, **(extra or {})}
    return save_checkpoint(
        path,
        run.model,
        run.optimizer,
        step=step,
        cfg=run.cfg,
        position=position,
        extra=info,
        state=state,
        after_file=after_file,
    )


_META_KEYS = ("step", "position", "optimizer", "config", "extra")


def _meta_digest(manifest: dict[str, Any]) -> str:
    """A digest of the manifest's non-tensor parts, as they read back from the JSON file."""
    import hashlib

    meta = json.loads(json.dumps({k: manifest.get(k) for k in _META_KEYS}, default=str))
    return "sha256:" + hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def _fsync_tree(directory: Path) -> None:
    for f in directory.iterdir():
        with f.open("rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    # A rename is durable only once its directory is synced; not every file system allows it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _usual_permissions(directory: Path) -> None:
    # mkdtemp makes a private (0700) directory; a checkpoint should look like any other
    # output of the user's, so apply their umask as a plain mkdir/open would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for f in directory.iterdir():
        os.chmod(f, 0o666 & ~umask)


def _replace_dir(new: Path, target: Path) -> None:
    # rename() of a directory cannot replace a non-empty one: move the old aside first, so
    # the target name always holds one complete checkpoint (old, then new).
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _host(t: torch.Tensor) -> torch.Tensor:
    # A copy: safetensors refuses tensors that share storage (tied weights), and the file
    # must hold the values as of this call.
    return t.detach().to("cpu", copy=True).contiguous()


def _entry(file: str, key: str, index_names: dict[int, str] | None = None) -> str:
    """The name a stored tensor is reported under: `model/<state_dict key>`, or
    `optim/<parameter name>/<state key>` (the names `fingerprint_state` uses too)."""
    if file == MODEL_FILE:
        return f"model/{key}"
    if file == STATE_FILE:
        return key
    _, idx, state_key = key.split("/", 2)
    return f"optim/{(index_names or {}).get(int(idx), idx)}/{state_key}"


def _optimizer_index_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    # optimizer.state_dict() numbers parameters in param-group order; map the numbers back
    # to names so a damaged Adam moment is reported as the moment of a named parameter.
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    flat = [p for group in optimizer.param_groups for p in group["params"]]
    return {i: names.get(id(p), f"param{i}") for i, p in enumerate(flat)}


def _jsonable(cfg: Any) -> Any:
    if cfg is None:
        return None
    if isinstance(cfg, dict):
        return cfg
    try:
        from distshare.config import RunConfig, to_dict

        if isinstance(cfg, RunConfig):
            return to_dict(cfg)
    except ImportError:  # pragma: no cover - config is part of the package
        pass
    import dataclasses

    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else str(cfg)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("distshare", "torch", "safetensors", "xxhash", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


# ---------------------------------------------------------------- reading


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a checkpoint directory; UsageError (exit 2) if this is not one."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file or directory")
    if not path.is_dir() or not (path / MANIFEST).is_file():
        raise UsageError(f"{path}: not a distshare checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointCorrupted(path, {MANIFEST: f"unreadable ({exc})"}) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UsageError(f"{path}: not a distshare checkpoint ({MANIFEST} is not a {FORMAT} manifest)")
    _check_entries(path, manifest)
    return manifest


def _check_entries(path: Path, manifest: dict[str, Any]) -> None:
    """A hand-edited (or damaged) manifest must not reach the readers as a Python error."""
    tensors = manifest.get("tensors")
    fields = {"file": str, "key": str, "dtype": str, "shape": list, "digest": str}
    bad = (
        {MANIFEST: "'tensors' is not a mapping of tensor names"}
        if not isinstance(tensors, dict)
        else {
            str(name): f"manifest entry lacks {', '.join(f for f, t in fields.items() if not isinstance(e.get(f), t))}"
            for name, e in tensors.items()
            if not isinstance(e, dict) or not all(isinstance(e.get(f), t) for f, t in fields.items())
        }
    )
    if bad:
        raise CheckpointCorrupted(path, bad)


class _SafetensorsFile:
    """Tensor-by-tensor access to a safetensors file that may be damaged."""

    def __init__(self, path: Path):
        self.path = path
        self.error: str | None = None
        self.header: dict[str, Any] = {}
        self.data_start = 0
        self.size = 0
        try:
            self.size = path.stat().st_size
            with path.open("rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("shorter than a safetensors header")
                (n,) = struct.unpack("<Q", head)
                if n > self.size - 8:
                    raise ValueError(f"header of {n} bytes does not fit in a {self.size}-byte file")
                self.header = json.loads(f.read(n))
                self.data_start = 8 + n
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            self.error = f"{path.name}: unreadable ({exc})"

    def names(self) -> list[str]:
        return [k for k in self.header if k != "__metadata__"]

    def read(self, name: str) -> torch.Tensor:
        """The stored tensor; ValueError saying what is wrong if it cannot be read whole."""
        meta = self.header.get(name)
        if meta is None:
            raise ValueError(f"not in {self.path.name}")
        dtype = _DTYPES.get(meta.get("dtype"))
        if dtype is None:
            raise ValueError(f"unknown dtype {meta.get('dtype')!r}")
        begin, end = meta["data_offsets"]
        shape = meta["shape"]
        numel = 1
        for s in shape:
            numel *= s
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if end - begin != numel * itemsize:
            raise ValueError(f"{end - begin} bytes stored for {numel} elements of {dtype}")
        if self.data_start + end > self.size:
            raise ValueError(
                f"truncated: {self.path.name} ends before its bytes ({self.size} < {self.data_start + end})"
            )
        with self.path.open("rb") as f:
            f.seek(self.data_start + begin)
            raw = bytearray(f.read(end - begin))
        if not raw:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(raw, dtype=dtype).reshape(shape)


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
    files: dict[str, _SafetensorsFile] = {}
    for name, entry in manifest["tensors"].items():
        check.info[name] = {"dtype": entry["dtype"], "shape": entry["shape"], "file": entry["file"]}
        f = files.get(entry["file"])
        if f is None:
            f = files[entry["file"]] = _SafetensorsFile(path / entry["file"])
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
    elif "meta_digest" in manifest and _meta_digest(manifest) != manifest["meta_digest"]:
        check.problems[MANIFEST] = "step, position, optimizer settings or config edited (meta digest differs)"
    check.combined = combined_fingerprint(check.digests) if not check.problems else combined_fingerprint(recorded)
    return check


def _verify_bare(path: Path, keep: dict[str, torch.Tensor] | None) -> CheckpointCheck:
    if path.suffix != ".safetensors":
        raise UsageError(f"{path}: not a distshare checkpoint (a directory with {MANIFEST}) or a .safetensors file")
    f = _SafetensorsFile(path)
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


# ---------------------------------------------------------------- comparing


@dataclass
class CheckpointComparison:
    """Two checkpoints, tensor by tensor: which differ and where (B against A as the reference)."""

    a: CheckpointCheck
    b: CheckpointCheck
    differing: dict[str, Any] = field(default_factory=dict)  # tensor -> TensorDiff (b vs a)
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)

    @property
    def same(self) -> bool:
        return self.a.ok and self.b.ok and not self.differing and not self.only_in_a and not self.only_in_b


def compare_checkpoints(a: str | Path, b: str | Path) -> CheckpointComparison:
    """Verify both, then compare tensor by tensor; differing tensors are localized element-wise."""
    from distshare.integrity.replicas import localize

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
