"""The loop around the one step (distshare.training.step)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from distshare.config import RunConfig, dump_config
from distshare.distributed.sync import GradSync
from distshare.distributed.watchdog import note_step
from distshare.distributed.world import World
from distshare.integrity import resume
from distshare.integrity.fingerprint import fingerprint_grads
from distshare.integrity.replicas import compare_replicas
from distshare.training.step import Run, build_run, train_step


@dataclass
class TrainResult:
    """One rank's account of a run; rank 0's is what reports are made of."""

    rank: int
    world_size: int
    steps: int
    losses: list[float] = field(default_factory=list)  # global mean loss per step
    checks: int = 0
    first_divergence: dict[str, Any] | None = None  # the first failing ReplicaReport, as a dict
    final_report: dict[str, Any] | None = None
    final_fingerprint: str = ""
    samples_by_step: list[list[list[int]]] = field(default_factory=list)  # step -> micro -> indices
    local_grads: dict[str, str] | None = None  # step 0, before sync
    synced_grads: dict[str, str] | None = None  # step 0, after sync
    state: dict[str, torch.Tensor] | None = None  # parameters at the end, if asked for
    first_grads: dict[str, torch.Tensor] | None = None  # synced gradients of step 0, if asked for
    seconds: float = 0.0
    dropped_per_epoch: int = 0
    engine: str = "local"  # who started the processes: local, spawn, torchrun, accelerate, ray
    sync: str = "local"  # how gradients were synchronized (GradSync.name)
    device: str = "cpu"
    # Exact mode: gradient contributions below its fixed-point resolution, rounded to 0 (all steps, all ranks)
    exact_underflows: int | None = None
    restart: int = 0  # the launcher's restart count of this worker (torchrun, Ray Train); 0: first attempt
    resumed: dict[str, Any] | None = None  # the checkpoint this run continued from (distshare.integrity.resume)

    @property
    def replicas_in_sync(self) -> bool:
        return self.first_divergence is None and bool(self.final_report and self.final_report["in_sync"])


def train(
    cfg: RunConfig,
    world: World,
    out_dir: Path | None = None,
    progress: bool = True,
    keep_state: bool = False,
    on_step: Callable[[Run, int], None] | None = None,
    sync: GradSync | None = None,
    restart: int | None = None,
) -> TrainResult:
    """The loop: `cfg.steps` steps, replica checks every `cfg.check_every`, metrics on rank 0.

    With `cfg.checkpoint.dir` it checkpoints every `cfg.checkpoint.every` steps; with
    `cfg.checkpoint.resume`, or when the launcher restarted this worker (`restart` > 0; None
    reads torchrun's TORCHELASTIC_RESTART_COUNT), it first continues from the newest
    verified checkpoint (distshare/resume.py).
    """
    run = build_run(cfg, world, sync)
    main = world.is_main
    result = TrainResult(rank=world.rank, world_size=world.world_size, steps=cfg.steps)
    result.dropped_per_epoch = run.plan.dropped_per_epoch
    result.sync, result.device = run.sync.name, world.device.type if world.device.type == "cpu" else str(world.device)
    result.restart = resume.restart_count() if restart is None else restart
    first = _resume(run, result)
    metrics = None
    if main and out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out_dir / "config.yaml", world.world_size)
        # Rewritten, not appended: a restarted run's file then holds each step exactly once,
        # the steps before the checkpoint from its loss history, the rest as they run.
        metrics = (out_dir / "metrics.jsonl").open("w")
        for step, loss in enumerate(result.losses):
            items = run.table.count_items(run.plan.global_batch(step))
            metrics.write(
                json.dumps({"step": step, "loss": loss, "global_items": items, "from_checkpoint": True}) + "\n"
            )
    start = time.perf_counter()
    try:
        bar = tqdm(
            range(first, cfg.steps),
            desc="train",
            unit="step",
            disable=not (main and progress),
            leave=False,
            initial=first,
            total=cfg.steps,
        )
        log = _LossLog(world, metrics, bar, result.losses)
        for step in bar:
            note_step(world.rank, step)  # for "rank R went silent at step N" (dist/watchdog.py)
            probe = step == 0
            local: dict[str, dict[str, str]] = {}
            stats = train_step(run, step, (lambda: local.update(g=fingerprint_grads(run.model))) if probe else None)  # noqa: B023
            if probe:
                result.local_grads = local.get("g")
                result.synced_grads = fingerprint_grads(run.model)
                if keep_state:
                    result.first_grads = {
                        n: p.grad.detach().clone() for n, p in run.model.named_parameters() if p.grad is not None
                    }
            result.samples_by_step.append(stats.indices)
            row: dict[str, Any] = {"step": step, "global_items": stats.global_items}
            last = step == cfg.steps - 1
            if last or (cfg.check_every and (step + 1) % cfg.check_every == 0):
                report = compare_replicas(run.model, run.optimizer, step=step)
                result.checks += 1
                row["replicas_in_sync"] = report.in_sync
                if not report.in_sync and result.first_divergence is None:
                    result.first_divergence = report.to_dict()
                if last:  # the state every rank ends with; its digest is the run's fingerprint
                    result.final_report = report.to_dict()
                    result.final_fingerprint = report.combined[world.rank]
            row["seconds"] = round(time.perf_counter() - start, 6)
            log.add(row, stats.loss_sum)
            if resume.due(cfg, step):
                log.flush()  # the checkpoint's loss history must reach this step
                resume.save(run, step, result.losses, result.checks, result.first_divergence)
            if on_step is not None:
                on_step(run, step)
        log.flush()
        if first == cfg.steps and result.final_report is None:  # resumed after the last step: check it
            report = compare_replicas(run.model, run.optimizer, step=cfg.steps - 1)
            result.checks += 1
            result.final_report = report.to_dict()
            result.final_fingerprint = report.combined[world.rank]
        if keep_state:
            result.state = {n: t.detach().cpu().clone() for n, t in run.model.state_dict().items()}
    finally:
        if metrics is not None:
            metrics.close()
    result.seconds = time.perf_counter() - start
    result.exact_underflows = run.sync.underflows
    return result


def _resume(run: Run, result: TrainResult) -> int:
    """Continue from a checkpoint if asked (or restarted); the first step to train."""
    found = resume.choose(run, result.restart)
    if found is None:
        return 0
    resumed = resume.restore(run, found, result.restart)
    result.resumed = resumed.to_dict()
    result.losses.extend(resumed.losses)
    result.checks = resumed.checks
    result.first_divergence = resumed.first_divergence
    # The steps before the checkpoint ran in an earlier process; what they consumed is what
    # the plan says (a pure function, and the checkpoint's plan was checked to be this one),
    # so the sample accounting still covers every step from 0.
    result.samples_by_step.extend(
        [m.tolist() for m in run.plan.rank_micro_batches(step, run.world.rank)] for step in range(resumed.steps_done)
    )
    return resumed.steps_done


class _LossLog:
    """Global mean losses, one per step, reduced a window of steps at a time.

    The global loss needs the ranks' loss sums added up: one more collective. Once per step
    it was a second point per step where every rank waits for the slowest, about 20% of a
    tiny model's step on 2 CPU ranks (benchmarks/README.md); one all-reduce of a vector of
    `window` sums costs the same wait once per window. The losses are exactly the same.
    """

    def __init__(self, world: World, metrics: IO[str] | None, bar: tqdm, losses: list[float], window: int = 10):
        self.world, self.metrics, self.bar, self.losses, self.window = world, metrics, bar, losses, window
        self.rows: list[dict[str, Any]] = []
        self.sums: list[float] = []

    def add(self, row: dict[str, Any], loss_sum: float) -> None:
        self.rows.append(row)
        self.sums.append(loss_sum)
        if len(self.rows) >= self.window:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        totals = torch.tensor(self.sums, dtype=torch.float64, device=self.world.collective_device)
        if self.world.distributed:
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        for row, total in zip(self.rows, totals.tolist(), strict=True):
            loss = total / row["global_items"]
            self.losses.append(loss)
            if self.metrics is not None:
                self.metrics.write(json.dumps({"step": row["step"], "loss": loss, **row}) + "\n")
        if self.metrics is not None:
            self.metrics.flush()
        self.bar.set_postfix(loss=f"{self.losses[-1]:.4f}", refresh=False)
        self.rows, self.sums = [], []
