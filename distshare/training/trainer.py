"""`train`: one rank's training with the standard components, for engines, commands and tests.

    result = train(cfg, world)                                   # checks replicas as cfg says
    result = train(cfg, world, out_dir, keep_state=True)         # + metrics.jsonl, the final state

The standard components, in the order the loop calls them: the checkpointer (it may restore
a run before anything else begins), the replica checker, the metrics writer and the progress
bar (rank 0), then the caller's own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from distshare.config import RunConfig, dump_config
from distshare.distributed.sync import GradSync, ShardedSync
from distshare.distributed.world import World
from distshare.training.checkpointer import Checkpointer
from distshare.training.hooks import KeepState, OnStep
from distshare.training.loop import Component, TrainResult, run_loop
from distshare.training.metrics import METRICS_FILE, FileSink, MetricsSink, MetricsWriter
from distshare.training.progress import ProgressBar
from distshare.training.replica_check import ReplicaChecker
from distshare.training.step import Run, build_run


def train(
    cfg: RunConfig,
    world: World,
    out_dir: Path | None = None,
    progress: bool = True,
    keep_state: bool = False,
    on_step: Callable[[Run, int], None] | None = None,
    sync: GradSync | None = None,
    restart: int = 0,
    components: Sequence[Component] = (),
    metrics: MetricsSink | None = None,
) -> TrainResult:
    """Train `cfg.steps` steps on this rank; its account (`TrainResult`).

    `out_dir` (rank 0) receives `config.yaml` and `metrics.jsonl`, or rows go to `metrics`; `keep_state` keeps
    the final parameters and buffers on rank 0; `on_step(run, step)` runs after every step;
    `sync` is the engine's own gradient sync (else from `cfg.sync`); `restart` is the
    launcher's restart count of this worker (> 0: resume from `checkpoint.dir`).
    """
    run = build_run(cfg, world, sync)
    if out_dir is not None and world.is_main:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        dump_config(cfg, Path(out_dir) / "config.yaml", world.world_size)
    result = TrainResult(rank=world.rank, world_size=world.world_size, steps=cfg.steps)
    result.dropped_per_epoch = run.plan.dropped_per_epoch
    result.sync = run.sync.name
    if world.world_size == 1:
        result.parallel = "single process"  # nothing to lay out, whatever cfg.parallel says
    if isinstance(run.sync, ShardedSync):
        result.parallel = "fsdp" if run.sync.replicas == 1 else "hsdp"
        result.mesh = (run.sync.replicas, run.sync.shards)
    result.device = world.device.type if world.device.type == "cpu" else str(world.device)
    result.restart = restart
    checker = ReplicaChecker(
        cfg.check_every, cfg.check_buffers, cfg.check_mode, cfg.check_slices, cfg.timeout_s, cfg.check_batch
    )
    standard: list[Component] = [Checkpointer(restart), checker]
    if metrics is None and out_dir is not None:
        metrics = FileSink(Path(out_dir) / METRICS_FILE)
    if metrics is not None:
        standard.append(MetricsWriter(metrics))
    if progress and world.is_main:
        standard.append(ProgressBar())
    if keep_state:
        standard.append(KeepState())
    if on_step is not None:
        standard.append(OnStep(on_step))
    return run_loop(run, result, [*standard, *components])
