"""What a run may continue from: its checkpoint directories, which one verifies, whether it fits.

The checkpointer component (`distshare.training.checkpointer`) writes and restores them
inside the loop; this module holds what needs no running loop.

    distshare train --steps 10 --checkpoint-dir ckpt --checkpoint-every 5    # ckpt/step-000005, step-000010
    distshare train --steps 20 --checkpoint-dir ckpt --resume ckpt           # continues with step 10
    distshare train --steps 20 --checkpoint-dir ckpt --resume auto           # resumes if ckpt holds one
    torchrun --max-restarts 1 --nproc_per_node 2 -m distshare train --checkpoint-dir ckpt   # restarts resume
    distshare train --engine ray --nproc 2 --max-failures 1 --checkpoint-dir ckpt          # so do Ray's

`DIR/step-000010` holds the state after 10 steps (steps 0..9); a resume from it runs step 10
next. What it holds, and why that is everything a bit-for-bit continuation needs:

- parameters, buffers and optimizer state (Adam moments and step counts), written once, by
  rank 0: after the gradient sync every replica holds the same bits (the replica checks say
  so), so one copy is all the replicas;
- the RNG states of *every* rank (torch CPU, CUDA when used, Python `random`, NumPy's global
  generator), gathered to rank 0 and stored as tensors `rng/rank<r>/<generator>`, digested
  like every other tensor. Today's step draws no random numbers (no dropout; the plan has
  its own seeded generator), so this is what keeps a resume exact once a model does;
- the loss history and the count of replica checks (`run/losses`, `run/checks`), so the
  resumed run's metrics and report go on without a lost or a repeated step;
- the position in the global batch plan (next step, epoch) and the plan itself, in the manifest.
  There is no learning-rate scheduler in distshare: the manifest records `"scheduler": null`.

A resume is refused, in one line and exit code 2, when what it would continue is not this
run: another world size (the checkpoint has the RNG states of exactly W ranks; the plan would
allow another W, but not bitwise: rounding of the gradient sum depends on W), another model
(config or tensor names/shapes), another plan (global batch, k, b, plan seed, drop_last),
another data set or optimizer, a step beyond `steps`, or no checkpoint that verifies.
"""

from __future__ import annotations

import dataclasses
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distshare.config import RunConfig, to_dict
from distshare.errors import UsageError, VerificationFailed
from distshare.integrity.checkpoint import (
    VERSION,
    is_sharded_checkpoint,
    read_manifest,
    verify_checkpoint,
)
from distshare.integrity.checkpoint.sharded_verify import read_sharded_manifest

_STEP_DIR = re.compile(r"^step-(\d+)$")
_LEFTOVER = re.compile(r"^\.step-\d+\.(.+\.tmp|old-\d+)$")  # what an interrupted save leaves behind


def step_dir(root: str | Path, steps_done: int) -> Path:
    """Where the checkpoint after `steps_done` steps lives."""
    return Path(root) / f"step-{steps_done:06d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(steps done, path) of every `step-NNNNNN` directory under `root`, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _STEP_DIR.match(entry.name)
        if m and entry.is_dir():
            found.append((int(m.group(1)), entry))
    return sorted(found, reverse=True)


@dataclass
class Found:
    """The checkpoint a run continues from, and the newer ones passed over (with why)."""

    path: Path
    manifest: dict[str, Any]
    skipped: list[str] = field(default_factory=list)

    @property
    def steps_done(self) -> int:
        return int(self.manifest["step"]) + 1


def newest_valid(root: str | Path, flag: str = "--resume") -> Found:
    """The newest checkpoint under `root` whose every tensor verifies; UsageError if none does."""
    root = Path(root)
    if not root.exists():
        raise UsageError(f"{flag} {root}: no such directory")
    if not root.is_dir():
        raise UsageError(f"{flag} {root}: not a directory")
    found = list_checkpoints(root)
    if not found:
        raise UsageError(f"{flag} {root}: holds no checkpoint (no step-NNNNNN directory)")
    skipped = []
    for _, path in found:
        problem = _problem(path)
        if problem is None:
            return Found(path, read_checkpoint_manifest(path), skipped)
        skipped.append(f"{path.name}: {problem}")
    raise UsageError(f"{flag} {root}: no checkpoint verifies ({'; '.join(skipped[:3])})")


def read_checkpoint_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a run's checkpoint, replicated (`model.safetensors`) or sharded (FSDP2 / HSDP)."""
    return read_sharded_manifest(path) if is_sharded_checkpoint(path) else read_manifest(path)


def _problem(path: Path) -> str | None:
    """Why this checkpoint cannot be resumed from, or None if every tensor verifies."""
    try:
        # A sharded checkpoint's bytes are checked here; its logical digests by the load itself,
        # on the live state (`load_sharded_checkpoint`), not by reassembling it on rank 0.
        check = verify_checkpoint(path, logical=False)
    except (UsageError, VerificationFailed) as exc:
        return str(exc).removeprefix(f"{path}: ")
    if check.ok:
        return None
    name, why = sorted(check.problems.items())[0]
    more = f" (and {len(check.problems) - 1} more)" if len(check.problems) > 1 else ""
    return f"damaged: {name}: {why}{more}"


# ---------------------------------------------------------------- what may be continued


def refuse_incompatible(found: Found, cfg: RunConfig, world_size: int, model: torch.nn.Module | None = None) -> None:
    """UsageError with the reason if `found` is not a state of this run (see the module doc)."""
    where, m = found.path, found.manifest
    if m.get("version", 0) > VERSION:
        raise UsageError(f"{where}: written by a newer distshare (format {m.get('version')} > {VERSION})")
    position = m.get("position") or {}
    stored = m.get("config") or {}
    w = position.get("world_size")
    if w != world_size:
        raise UsageError(
            f"{where}: written by {w} rank(s), this run has {world_size}: resume with --nproc {w} "
            f"(it holds {w} ranks' RNG states, and another W would round the gradient sum differently)"
        )
    if stored.get("sync") not in (None, cfg.sync):
        raise UsageError(
            f"{where}: written with sync={stored['sync']}, this run has sync={cfg.sync}: resume with "
            f"--sync {stored['sync']} (another sync adds the gradient in another arithmetic)"
        )
    here = to_dict(cfg, world_size)
    for section, what in (("model", "another model"), ("data", "another data set"), ("optim", "another optimizer")):
        diff = _first_difference(stored.get(section), here[section], section)
        if diff:
            raise UsageError(f"{where}: {what}: {diff}")
    plan_keys = ("global_batch", "accum_steps", "micro_batch", "seed", "drop_last")
    diff = _first_difference(
        {k: (stored.get("plan") or {}).get(k) for k in plan_keys}, {k: here["plan"][k] for k in plan_keys}, "plan"
    )
    if diff:
        raise UsageError(f"{where}: an incompatible plan: {diff}")
    if model is not None:
        _refuse_other_tensors(found, model)
    if found.steps_done > cfg.steps:
        raise UsageError(
            f"{where}: holds the state after {found.steps_done} steps, this run has steps={cfg.steps}: "
            f"ask for --steps {found.steps_done} or more"
        )


def _refuse_other_tensors(found: Found, model: torch.nn.Module) -> None:
    from distshare.integrity.state import unwrap

    entries = found.manifest["tensors"].values()
    if is_sharded_checkpoint(found.path):  # logical shapes, under DCP's model keys
        stored = {e["at"][1]: (e["dtype"], e["shape"]) for e in entries if e["kind"] == "model" and e.get("at")}
    else:
        stored = {e["key"]: (e["dtype"], e["shape"]) for e in entries if e["file"] == "model.safetensors"}
    here = {k: (str(t.dtype).removeprefix("torch."), list(t.shape)) for k, t in unwrap(model).state_dict().items()}
    for name in sorted(set(stored) | set(here)):
        if name not in here:
            raise UsageError(f"{found.path}: another model: tensor {name} is in the checkpoint, not in this model")
        if name not in stored:
            raise UsageError(f"{found.path}: another model: tensor {name} of this model is not in the checkpoint")
        if stored[name] != here[name]:
            (sd, ss), (hd, hs) = stored[name], here[name]
            raise UsageError(f"{found.path}: another model: {name} is {sd} {ss} in the checkpoint, {hd} {hs} here")


def _first_difference(stored: Any, here: Any, prefix: str) -> str | None:
    if isinstance(stored, dict) and isinstance(here, dict):
        for key in sorted(set(stored) | set(here)):
            diff = _first_difference(stored.get(key), here.get(key), f"{prefix}.{key}")
            if diff:
                return diff
        return None
    if stored != here:
        return f"{prefix} is {stored!r} in the checkpoint, {here!r} here"
    return None


def _refuse_occupied(cfg: RunConfig, source: Path | None) -> None:
    """A fresh run must not write into a directory that already holds another run's checkpoints:
    keeping the newest K would delete the new ones and keep the old."""
    ck = cfg.checkpoint
    if ck.dir is None:
        return
    if source is not None and Path(ck.dir).resolve() == source.resolve():
        return
    existing = list_checkpoints(ck.dir)
    if existing:
        raise UsageError(
            f"--checkpoint-dir {ck.dir}: already holds checkpoints (newest {existing[0][1].name}): "
            f"continue them with --resume {ck.dir} (or --resume auto), or write to an empty directory"
        )


def find_resume(
    cfg: RunConfig, world_size: int, restart: int = 0, model: torch.nn.Module | None = None
) -> Found | None:
    """The checkpoint this run continues from (None: start at step 0), or a UsageError saying why not.

    `checkpoint.resume` is a directory (resume from its newest verified checkpoint; an error
    if there is none) or `auto` (resume from `checkpoint.dir` if it holds any checkpoint, else
    start). A worker the launcher restarted (`restart` > 0) behaves as `auto`.
    """
    ck = cfg.checkpoint
    source = ck.resume
    if source is None and restart > 0 and ck.dir is not None:
        source = "auto"
    if source is None:
        _refuse_occupied(cfg, None)
        return None
    if source == "auto":
        if ck.dir is None:
            raise UsageError("--resume auto resumes from --checkpoint-dir: give --checkpoint-dir too")
        if not list_checkpoints(ck.dir):
            return None
        found = newest_valid(ck.dir, "--checkpoint-dir")
    else:
        found = newest_valid(source)
    refuse_incompatible(found, cfg, world_size, model)
    _refuse_occupied(cfg, found.path.parent)
    return found


# ---------------------------------------------------------------- RNG states


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's random generators, as tensors (so the manifest digests them)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    out = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor([version, *words], dtype=torch.int64),
        "python_gauss": torch.tensor([np.nan if gauss is None else gauss], dtype=torch.float64),
        "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([cached], dtype=torch.float64),
    }
    if kind != "MT19937":  # pragma: no cover - numpy's legacy global generator is always MT19937
        raise RuntimeError(f"unexpected numpy global generator {kind}")
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Put back what `rng_state` took."""
    torch.set_rng_state(state["torch"])
    words = state["python"].tolist()
    gauss = float(state["python_gauss"][0])
    random.setstate((words[0], tuple(words[1:]), None if np.isnan(gauss) else gauss))
    pos, has_gauss = state["numpy_pos"].tolist()
    keys = state["numpy"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, pos, has_gauss, float(state["numpy_gauss"][0])))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------- keeping the directory tidy


def prune(root: Path, keep: int, upto: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints at or before `upto` steps; return what went.

    Newer ones (a damaged checkpoint a resume passed over) are left for a person to look at;
    the run overwrites them when it gets there.
    """
    older = [p for s, p in list_checkpoints(root) if s <= upto][keep:]
    for p in older:
        shutil.rmtree(p, ignore_errors=True)
    return older


def clear_leftovers(root: Path) -> None:
    # An interrupted save leaves a hidden temp directory (never a step-NNNNNN one): it never
    # verifies, is never resumed from, and is removed by the next save.
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if _LEFTOVER.match(entry.name) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """The checkpoint section with absolute paths: Ray's workers run in another directory."""
    ck = cfg.checkpoint
    absolute = dataclasses.replace(
        ck,
        dir=None if ck.dir is None else str(Path(ck.dir).expanduser().absolute()),
        resume=ck.resume if ck.resume in (None, "auto") else str(Path(ck.resume).expanduser().absolute()),
    )
    return dataclasses.replace(cfg, checkpoint=absolute)
