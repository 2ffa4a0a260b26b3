"""Writing a checkpoint: the tensors as safetensors, the manifest of digests, atomically.

It is written into a temporary directory next to the target and renamed into place, so a
crash leaves either the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from distshare.errors import UsageError
from distshare.integrity.checkpoint.format import (
    FORMAT,
    MANIFEST,
    MODEL_FILE,
    OPTIM_FILE,
    STATE_FILE,
    VERSION,
    entry_name,
    meta_digest,
)
from distshare.integrity.checkpoint.live import live_names, recorded_state_digest
from distshare.integrity.checkpoint.ties import shared_views
from distshare.integrity.fingerprint import ALGORITHM, combined_fingerprint, fingerprint
from distshare.integrity.state import unwrap


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
    bare = unwrap(model)
    model_state = bare.state_dict()
    # A tied weight is stored once, under the name `named_parameters` gives it; its other names
    # are aliases in the manifest (see ties.py).
    canonical = [n for n, _ in bare.named_parameters()] + [n for n, _ in bare.named_buffers()]
    aliases = shared_views(model_state, prefer=canonical)
    model_tensors = {k: _host(v) for k, v in model_state.items() if k not in aliases}
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
            tensors[entry_name(file, name, index_names)] = {
                "file": file,
                "key": name,
                "dtype": str(t.dtype).removeprefix("torch."),
                "shape": list(t.shape),
                "digest": fingerprint(t, ALGORITHM),
            }
    for alias, target in aliases.items():
        stored = tensors[entry_name(MODEL_FILE, target)]
        tensors[entry_name(MODEL_FILE, alias)] = {
            **stored,
            "key": alias,  # the state_dict key, as for any model tensor
            "stored_as": target,  # the key whose bytes it is in the file
            "alias_of": entry_name(MODEL_FILE, target),
        }
    live = live_names(model, optimizer, tensors)
    for name, live_name in (live[0] if live else {}).items():
        tensors[name]["live"] = live_name
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
    if live is not None:
        # What `state_digest(model, optimizer)` gives for this state (on the host: xxh3_128).
        digests = {n: e["digest"] for n, e in tensors.items()}
        manifest["state_digest"] = recorded_state_digest(digests, tensors, live[1])
        manifest["live_only"] = live[1]
    manifest["meta_digest"] = meta_digest(manifest)
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
    position = run_position(run, step)
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


def run_position(run: Any, step: int) -> dict[str, Any]:
    """A `distshare.training.Run`'s position in its global batch plan after `step`."""
    plan = run.plan
    resolved = plan.plan
    return plan_position(
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
    # A copy: the file must hold the values as of this call (and safetensors refuses tensors
    # that share storage: views of one weight that are not tied aliases).
    return t.detach().to("cpu", copy=True).contiguous()


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
    from distshare.config import RunConfig, to_dict  # config is above the integrity layer

    if isinstance(cfg, RunConfig):
        return to_dict(cfg)
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else str(cfg)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("distshare", "torch", "safetensors", "xxhash", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
