"""The one per-rank runner: what every rank of every engine does, whoever started it.

An engine only starts processes (spawned, torchrun, accelerate launch, Ray Train) and, where
it must, supplies a gradient sync. Then every rank runs `run_rank`: watch the process group
(a silent rank gets named), train with the standard components plus the job's own, and bring
the ranks' accounts to rank 0. So every engine writes the same metrics, restarts the same way
and reports the same fields.

Test tooling plugs in without production code knowing it: modules named in the environment
variable DISTSHARE_PLUGINS (comma-separated, e.g. `distshare.testing.faults`) are imported on
every rank, and each one's `distshare_components(cfg, world, attempt)` adds components. An
environment variable reaches the ranks of every launcher, torchrun's included; Ray's driver
forwards the DISTSHARE_* variables to its workers (`forwarded_environment`).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from distshare.config import RunConfig
from distshare.distributed import watchdog
from distshare.distributed.sync import GradSync
from distshare.distributed.world import World
from distshare.errors import UsageError
from distshare.training import Component, Loop, TrainResult, train
from distshare.training.metrics import MetricsSink

PLUGINS_ENV = "DISTSHARE_PLUGINS"


@dataclass(frozen=True)
class RankJob:
    """What every rank of a run needs to know; the same on every rank (it must pickle)."""

    cfg: RunConfig
    out_dir: Path | None = None  # rank 0 writes config.yaml and metrics.jsonl here
    progress: bool = True
    keep_state: bool = False  # keep the final state on rank 0 (TrainResult.state)
    components: tuple[Component, ...] = ()  # a command's own (verify's probe), after the standard ones

    def with_world_size(self, world_size: int) -> RankJob:
        """The job with the launcher's world size; an impossible split is refused before training."""
        plan = dataclasses.replace(self.cfg.plan, world_size=world_size)
        plan.resolve()
        return dataclasses.replace(self, cfg=dataclasses.replace(self.cfg, plan=plan))


class StepMarker(Component):
    """Tells the watchdog which step this rank began: for "rank R went silent at step N"."""

    def before_step(self, loop: Loop, step: int) -> None:
        watchdog.note_step(step)


def run_rank(
    job: RankJob,
    world: World,
    engine: str,
    launcher: str | None,
    sync: GradSync | None = None,
    restart: int = 0,
    metrics: MetricsSink | None = None,
) -> list[TrainResult] | None:
    """Train this rank; every rank's account on rank 0 (in rank order), None on the others.

    `engine` and `launcher` name the run in its results; `sync` is the engine's own, if any;
    `restart` the launcher's restart count of this worker; `metrics` a sink for rank 0's
    rows when they must travel (Ray), instead of `job.out_dir`.
    """
    cfg = job.cfg
    if world.distributed:
        watchdog.ensure_watching(world.rank, world.world_size, cfg.timeout_s)
    components = [StepMarker(), *plugin_components(cfg, world, restart), *job.components]
    try:
        result = train(
            cfg,
            world,
            job.out_dir if world.is_main and metrics is None else None,
            progress=job.progress and world.is_main,
            keep_state=job.keep_state,
            sync=sync,
            restart=restart,
            components=components,
            metrics=metrics,
        )
    except Exception as exc:
        explained = watchdog.explain(exc)  # a timed-out collective: which peer went silent?
        if explained is exc:
            raise
        raise explained from exc
    result.engine, result.launcher = engine, launcher
    return gather_to_main(result, world) if world.distributed else [result]


def gather_to_main(result: TrainResult, world: World) -> list[TrainResult] | None:
    """Every rank's result on rank 0 (None elsewhere); a collective.

    The final state stays home: only the accounts (digests, indices, losses) travel.
    """
    light = dataclasses.replace(result, state=None)
    gathered: list[TrainResult | None] = [None] * world.world_size
    dist.all_gather_object(gathered, light)
    if not world.is_main:
        return None
    gathered[0] = result
    return [g for g in gathered if g is not None]


def plugin_components(cfg: RunConfig, world: World, attempt: int) -> list[Component]:
    """The components of the modules named in DISTSHARE_PLUGINS (none when it is unset)."""
    out: list[Component] = []
    for name in filter(None, (n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise UsageError(f"{PLUGINS_ENV}: cannot import {name}: {exc}") from None
        factory = getattr(module, "distshare_components", None)
        if factory is None:
            raise UsageError(f"{PLUGINS_ENV}: {name} has no distshare_components(cfg, world, attempt)")
        out.extend(factory(cfg, world, attempt))
    return out


def forwarded_environment() -> dict[str, str]:
    """The DISTSHARE_* variables, for workers that do not inherit this process's environment (Ray)."""
    return {k: v for k, v in os.environ.items() if k.startswith("DISTSHARE_")}
