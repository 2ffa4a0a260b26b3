"""The checkpointer: verified checkpoints during training, and resuming from them bit for bit.

    distshare train --steps 10 --checkpoint-dir ckpt --checkpoint-every 5    # ckpt/step-000005, step-000010
    distshare train --steps 20 --checkpoint-dir ckpt --resume ckpt           # continues with step 10
    torchrun --max-restarts 1 --nproc_per_node 2 -m distshare train --checkpoint-dir ckpt   # restarts resume

Before the first step it decides (rank 0, for everyone) whether the run continues from a
checkpoint, and restores parameters, optimizer state, every rank's RNG states and the run's
history; after each step it decides for itself whether one is due. What a checkpoint holds and
when a resume is refused: `distshare.integrity.resume`.

`ReplicaCheckpoints` (`distshare train --save-every-rank`) has every rank also write the
replica it holds, to DIR/rank{r}/step-NNNNNN, when the checkpointer writes DIR/step-NNNNNN:
`distshare compare DIR/rank0/step-000010 DIR/rank1/step-000010` then compares two ranks'
states from the files, tensor by tensor. Rank 0's own checkpoint stays the one a resume reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distshare.errors import UsageError
from distshare.integrity.checkpoint import (
    is_sharded_checkpoint,
    load_checkpoint,
    load_sharded_checkpoint,
    save_run_checkpoint,
    save_sharded_checkpoint,
)
from distshare.integrity.checkpoint.write import run_position
from distshare.integrity.logical import is_sharded_model
from distshare.integrity.resume import (
    Found,
    clear_leftovers,
    find_resume,
    prune,
    read_checkpoint_manifest,
    rng_state,
    set_rng_state,
    step_dir,
)
from distshare.training.loop import Component, Loop
from distshare.training.step import Run


@dataclass
class Resumed:
    """What a resumed run continues: reported in result.json as `resume`."""

    path: str
    steps_done: int  # the first step this run trains
    losses: list[float]
    checks: int
    first_divergence: dict[str, Any] | None
    restart: int  # 0: resumed on request; n > 0: the launcher's n-th restart of the workers
    skipped: list[str]  # newer checkpoints passed over because they did not verify

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "from_step": self.steps_done,
            "restart": self.restart,
            "skipped": self.skipped,
        }


class Checkpointer(Component):
    """Resume before the first step if asked (or restarted); checkpoint when due.

    `after_file` is called with each file's path as a save writes it: a seam for tests that
    must interrupt a save halfway (`distshare.testing.faults`).
    """

    def __init__(self, restart: int = 0) -> None:
        self.restart = restart
        self.after_file: Callable[[str], None] | None = None

    def begin(self, loop: Loop) -> None:
        run, result = loop.run, loop.result
        found = choose(run, self.restart)
        if found is None:
            return
        resumed = restore(run, found, self.restart)
        result.resumed = resumed.to_dict()
        result.losses.extend(resumed.losses)
        result.checks = resumed.checks
        result.first_divergence = resumed.first_divergence
        # The steps before the checkpoint ran in an earlier process; what they consumed is what
        # the plan says (a pure function, and the checkpoint's plan was checked to be this one),
        # so the sample accounting still covers every step from 0.
        result.samples_by_step.extend(
            [m.tolist() for m in run.plan.rank_micro_batches(step, run.world.rank)]
            for step in range(resumed.steps_done)
        )
        loop.first_step = resumed.steps_done

    def step_end(self, loop: Loop, step: int) -> None:
        if not due(loop.run.cfg.checkpoint, loop.steps, step):
            return
        loop.flush_losses()  # the checkpoint's loss history must reach this step
        r = loop.result
        save(loop.run, step, r.losses, r.checks, r.first_divergence, self.after_file)


def due(ck: Any, steps: int, step: int) -> bool:
    """Is a checkpoint written after `step`? Every `checkpoint.every` steps, and after the last."""
    if ck.dir is None:
        return False
    return step == steps - 1 or (ck.every > 0 and (step + 1) % ck.every == 0)


def choose(run: Run, restart: int) -> Found | None:
    """`find_resume` decided once, by rank 0, and told to every rank (a collective).

    One decision for all: ranks that looked for themselves could pick different checkpoints
    (one written between two looks), and a refusal must stop every rank, not one.
    """
    world = run.world
    ck = run.cfg.checkpoint
    if ck.dir is None and ck.resume is None:  # the same config on every rank: no one needs asking
        return None
    decision: list[Any] = [None]
    if world.is_main:
        try:
            found = find_resume(run.cfg, world.world_size, restart, run.model)
            decision[0] = ("ok", None if found is None else (str(found.path), found.skipped))
        except UsageError as exc:
            decision[0] = ("refused", str(exc))
    if world.distributed:
        dist.broadcast_object_list(decision, src=0)
    status, payload = decision[0]
    if status == "refused":
        raise UsageError(payload)
    if payload is None:
        return None
    path, skipped = payload
    return Found(Path(path), read_checkpoint_manifest(path), skipped)


def restore(run: Run, found: Found, restart: int) -> Resumed:
    """Load parameters, optimizer state and this rank's RNG states; return the run's history.

    Every rank reads the checkpoint itself (verifying every digest again), so the directory
    must be visible to every rank: one machine, or a shared file system.
    """
    state: dict[str, torch.Tensor] = {}
    if is_sharded_checkpoint(found.path):  # a collective: DCP reshards, then the logical digests are compared
        manifest = load_sharded_checkpoint(found.path, run.model, run.optimizer, state=state)
    else:
        manifest = load_checkpoint(found.path, run.model, run.optimizer, state=state)
    prefix = f"rng/rank{run.world.rank}/"
    mine = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if not mine:
        raise UsageError(f"{found.path}: holds no RNG state for rank {run.world.rank}")
    set_rng_state(mine, run.world.device)
    extra = manifest.get("extra") or {}
    return Resumed(
        path=str(found.path),
        steps_done=int(manifest["step"]) + 1,
        losses=state["run/losses"].tolist(),
        checks=int(state["run/checks"][0]),
        first_divergence=extra.get("first_divergence"),
        restart=restart,
        skipped=found.skipped,
    )


def save(
    run: Run,
    step: int,
    losses: list[float],
    checks: int,
    first_divergence: dict | None,
    after_file: Callable[[str], None] | None = None,
) -> Path | None:
    """Checkpoint the run after `step` (a collective: every rank hands rank 0 its RNG states).

    Returns the path on rank 0, None elsewhere. Then keeps the newest `checkpoint.keep`.
    A sharded model (FSDP2 / HSDP) is saved by every rank, each its own shards
    (`save_sharded_checkpoint`); a replicated one by rank 0 alone.
    """
    world = run.world
    mine = rng_state(world.device)
    every: list[Any] = [mine]
    if world.distributed:
        every = [None] * world.world_size
        dist.all_gather_object(every, mine)
    sharded = is_sharded_model(run.model)
    if not world.is_main and not sharded:
        return None
    ck = run.cfg.checkpoint
    state = {f"rng/rank{r}/{k}": v for r, s in enumerate(every) for k, v in s.items()}
    state["run/losses"] = torch.tensor(losses, dtype=torch.float64)
    state["run/checks"] = torch.tensor([checks], dtype=torch.int64)
    root = Path(ck.dir)
    if world.is_main:
        clear_leftovers(root)
    path = step_dir(root, step + 1)
    extra = {"first_divergence": first_divergence, "scheduler": None, "rng_ranks": world.world_size}
    if sharded:
        info = {"rank": world.rank, "world_size": world.world_size, **extra}
        position = run_position(run, step)
        save_sharded_checkpoint(
            path, run.model, run.optimizer, step=step, cfg=run.cfg, position=position, extra=info, state=state
        )
        if not world.is_main:
            return None
    else:
        save_run_checkpoint(path, run, step, extra=extra, state=state, after_file=after_file)
    prune(root, ck.keep, step + 1)
    return path


class ReplicaCheckpoints(Component):
    """Every rank writes its own replica (parameters, buffers, optimizer state) to
    `DIR/rank{r}/step-NNNNNN` whenever a checkpoint is due, and keeps the newest `checkpoint.keep`.

    No collective: each rank writes what it holds, so two ranks that diverged write two
    different checkpoints (which is the point). The replicas hold no RNG states or loss
    history: a resume reads rank 0's `DIR/step-NNNNNN`, never these.
    """

    def begin(self, loop: Loop) -> None:
        if is_sharded_model(loop.run.model):  # every rank says so: the config is the same everywhere
            raise UsageError(
                "--save-every-rank writes each rank's replica, and under fsdp / hsdp no rank holds one: "
                "the checkpoint in --checkpoint-dir already holds every rank's shards (distshare checksum verifies it)"
            )

    def step_end(self, loop: Loop, step: int) -> None:
        ck = loop.run.cfg.checkpoint
        if not due(ck, loop.steps, step):
            return
        root = replica_dir(ck.dir, loop.world.rank)
        clear_leftovers(root)
        extra = {"replica_of_rank": loop.world.rank, "scheduler": None}
        save_run_checkpoint(step_dir(root, step + 1), loop.run, step, extra=extra)
        prune(root, ck.keep, step + 1)


def replica_dir(checkpoint_dir: str | Path, rank: int) -> Path:
    """Where rank `rank`'s replica checkpoints go under `checkpoint_dir`."""
    return Path(checkpoint_dir) / f"rank{rank}"
