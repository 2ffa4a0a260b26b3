"""The Ray Train engine: the one step inside `ray.train.torch.TorchTrainer`.

    distshare train --engine ray --nproc 2                       # a local Ray, this machine's CPUs
    distshare train --engine ray --nproc 4 --ray-address auto    # join a running cluster

Ray Train starts the workers and makes their torch.distributed group (gloo on CPU, nccl on
GPU); each worker then runs the one per-rank runner (`distshare.engines.runner`), unchanged,
with the run's own sync (DDP with a SUM hook, or an explicit all-reduce). So the arithmetic
is the torch engine's, and so is the final fingerprint.

The ranks' accounts travel to the driver the way every engine brings them to rank 0 (one
`all_gather_object` of digests, indices and losses); rank 0 hands the list to a small
collector actor the driver owns, so nothing depends on a file system shared between nodes.
Rank 0's metrics rows reach the driver the same way, as they are logged; the driver writes
the run directory (config.yaml, metrics.jsonl), as the other engines' rank 0 does.

    distshare train --engine ray --nproc 2 --max-failures 1 --checkpoint-dir ckpt

With `--max-failures N` (Ray's `FailureConfig(max_failures=N)`) a worker that dies makes
Ray Train start the whole group again, and each worker resumes from the newest verified
checkpoint in ckpt. A worker learns that it is a restart from the collector actor, which
lives with the driver and counts how often each rank has started: no environment variable
or file system is needed for that.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from typing import Any

from distshare.config import dump_config
from distshare.distributed import launchers
from distshare.engines.runner import RankJob, forwarded_environment, run_rank
from distshare.errors import DistshareError, UsageError
from distshare.training import TrainResult
from distshare.training.metrics import METRICS_FILE, FileSink


def run_training(
    job: RankJob, engine: str = "ray", address: str | None = None, max_failures: int = 0
) -> list[TrainResult]:
    """Train on `cfg.plan.world_size` Ray Train workers; every worker's result, rank order.

    `max_failures`: how often Ray Train may restart the workers after one died (0: never).
    """
    import ray
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = job.cfg
    world_size = cfg.plan.world_size
    started_here = _connect(ray, launchers.ray_address(address))
    try:
        collector = ray.remote(num_cpus=0)(_Collector).remote()
        cpus = ray.cluster_resources().get("CPU", 1.0)
        # On a local Ray the machine's CPUs are shared out, so W workers fit on fewer cores
        # (a laptop, CI's 2 cores); on a real cluster each worker asks for a whole CPU.
        per_worker = min(1.0, cpus / world_size) if started_here else 1.0
        use_gpu = cfg.device == "cuda"
        _refuse_what_cannot_be_scheduled(ray, world_size, per_worker, use_gpu)
        resources = {"CPU": per_worker} if not use_gpu else {"CPU": per_worker, "GPU": 1.0}
        if job.progress:
            print(f"ray: {world_size} Ray Train worker(s) on {_where(ray, started_here)}", file=sys.stderr)
        # Workers write nothing and show nothing: the driver writes the run directory.
        worker_job = RankJob(cfg, None, progress=False, keep_state=job.keep_state, components=job.components)
        with tempfile.TemporaryDirectory(prefix="distshare-ray-") as storage:
            trainer = TorchTrainer(
                _worker,
                train_loop_config={
                    "job": worker_job,
                    "engine": engine,
                    "collector": collector,
                    "env": forwarded_environment(),
                },
                scaling_config=ScalingConfig(num_workers=world_size, use_gpu=use_gpu, resources_per_worker=resources),
                torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=int(cfg.timeout_s)),
                run_config=RayRunConfig(
                    name="distshare",
                    storage_path=storage,
                    failure_config=FailureConfig(max_failures=max_failures),
                ),
            )
            try:
                trainer.fit()
            except Exception as exc:  # Ray wraps a worker's error; say it in one line
                raise DistshareError(f"Ray Train run failed: {_first_line(exc)}") from exc
        results: list[TrainResult] = ray.get(collector.get.remote(), timeout=cfg.timeout_s)
        rows: list[dict[str, Any]] = ray.get(collector.rows.remote(), timeout=cfg.timeout_s)
    finally:
        if started_here:
            ray.shutdown()
    if job.out_dir is not None:
        job.out_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, job.out_dir / "config.yaml", results[0].world_size)
        sink = FileSink(job.out_dir / METRICS_FILE)
        sink.write(rows)
        sink.close()
    return results


def _connect(ray: Any, address: str | None) -> bool:
    """Join the given cluster, or an already started Ray, or start a local one; True if started here."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
    if address is not None:
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as exc:
            raise UsageError(
                f"no Ray cluster at {address}: {_first_line(exc)} (start one with `ray start --head`)"
            ) from None
        return False
    ray.init(num_cpus=os.cpu_count() or 1, **kwargs)
    return True


def _refuse_what_cannot_be_scheduled(ray: Any, world_size: int, cpus_per_worker: float, use_gpu: bool) -> None:
    """Ray waits for resources forever: a run the cluster cannot hold is refused up front."""
    have = ray.cluster_resources()
    need = {"CPU": world_size * cpus_per_worker, **({"GPU": float(world_size)} if use_gpu else {})}
    for resource, amount in need.items():
        if have.get(resource, 0.0) + 1e-9 < amount:
            raise UsageError(
                f"--engine ray --nproc {world_size} needs {amount:g} {resource}(s); the Ray cluster has "
                f"{have.get(resource, 0.0):g}: use fewer workers or add nodes"
            )


def _where(ray: Any, started_here: bool) -> str:
    cpus = int(ray.cluster_resources().get("CPU", 0))
    return f"a local Ray ({cpus} CPUs)" if started_here else f"the cluster at {ray.get_runtime_context().gcs_address}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    # Ray's message ends with the worker's own exception: that line is the informative one.
    last = lines[-1].strip() if lines else type(exc).__name__
    # A distshare error raised in a worker arrives as "distshare.errors.Name: message".
    return re.sub(r"^distshare\.errors\.\w+: ", "", last)


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: a rank of the one per-rank runner, in a process Ray started."""
    import ray.train
    import torch

    from distshare.distributed.world import World

    os.environ.update(config["env"])  # the driver's DISTSHARE_* settings (plugins) reach every node
    job: RankJob = config["job"]
    collector = config["collector"]
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if job.cfg.device == "cuda" else torch.device("cpu")
    world = World(
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        local_rank=ctx.get_local_rank(),
        device=device,
        backend=torch.distributed.get_backend() if ctx.get_world_size() > 1 else None,
    )
    if world.world_size == 1:
        world = World(device=device)
    # Ray Train restarts the whole group: every rank's count is the same.
    attempt = ray.get(collector.started.remote(world.rank), timeout=job.cfg.timeout_s)
    sink = _CollectorSink(collector) if world.is_main else None
    results = run_rank(job, world, config["engine"], "ray", restart=attempt, metrics=sink)
    if world.is_main:
        ray.get(collector.put.remote(results))


class _CollectorSink:
    """Rank 0's metrics rows, sent to the driver's collector as they are logged."""

    def __init__(self, collector: Any) -> None:
        self.collector = collector

    def write(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self.collector.add_rows.remote(rows)

    def close(self) -> None:
        pass


class _Collector:
    """Holds rank 0's results and metrics rows until the driver takes them (a Ray actor, made in `run_training`)."""

    def __init__(self) -> None:
        self.results: list[TrainResult] | None = None
        self.starts: dict[int, int] = {}
        self.metrics: dict[int, dict[str, Any]] = {}

    def started(self, rank: int) -> int:
        """Count a start of `rank`'s worker; return how many came before (0: the first attempt)."""
        before = self.starts.get(rank, 0)
        self.starts[rank] = before + 1
        return before

    def add_rows(self, rows: list[dict[str, Any]]) -> None:
        # By step: a restarted attempt rewrites the steps it repeats, so each step is kept once.
        for row in rows:
            self.metrics[row["step"]] = row

    def rows(self) -> list[dict[str, Any]]:
        return [self.metrics[s] for s in sorted(self.metrics)]

    def put(self, results: list[TrainResult]) -> None:
        self.results = results

    def get(self) -> list[TrainResult] | None:
        return self.results
