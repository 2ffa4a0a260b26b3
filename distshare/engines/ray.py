"""The Ray Train engine: the one step inside `ray.train.torch.TorchTrainer`.

    distshare train --engine ray --nproc 2                       # a local Ray, this machine's CPUs
    distshare train --engine ray --nproc 4 --ray-address auto    # join a running cluster

Ray Train starts the workers and makes their torch.distributed group (gloo on CPU, nccl on
GPU); each worker then runs `distshare.training.train`, unchanged, with the run's own sync
(DDP with a SUM hook, or an explicit all-reduce). So the arithmetic is the torch engine's,
and so is the final fingerprint.

The ranks' accounts travel to the driver the way every engine brings them to rank 0 (one
`all_gather_object` of digests, indices and losses); rank 0 hands the list to a small
collector actor the driver owns, so nothing depends on a file system shared between nodes.
The driver writes the run directory, as the other engines' rank 0 does.

    distshare train --engine ray --nproc 2 --max-failures 1 --checkpoint-dir ckpt

With `--max-failures N` (Ray's `FailureConfig(max_failures=N)`) a worker that dies makes
Ray Train start the whole group again, and each worker resumes from the newest verified
checkpoint in ckpt. A worker learns that it is a restart from the collector actor, which
lives with the driver and counts how often each rank has started: no environment variable
or file system is needed for that.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from distshare.config import RunConfig, dump_config
from distshare.errors import DistshareError, UsageError
from distshare.testing.faults import exit_spec_from_env
from distshare.training import TrainResult


def ray_address(cli_address: str | None) -> str | None:
    """The cluster to join: --ray-address, else RAY_ADDRESS, else None (start a local Ray)."""
    return cli_address or os.environ.get("RAY_ADDRESS") or None


def run_training(
    cfg: RunConfig,
    out_dir: Path | None = None,
    progress: bool = True,
    keep_state: bool = False,
    address: str | None = None,
    max_failures: int = 0,
) -> list[TrainResult]:
    """Train on `cfg.plan.world_size` Ray Train workers; every worker's result, rank order.

    `max_failures`: how often Ray Train may restart the workers after one died (0: never).
    """
    import ray
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    world_size = cfg.plan.world_size
    started_here = _connect(ray, address)
    try:
        collector = ray.remote(num_cpus=0)(_Collector).remote()
        cpus = ray.cluster_resources().get("CPU", 1.0)
        # On a local Ray the machine's CPUs are shared out, so W workers fit on fewer cores
        # (a laptop, CI's 2 cores); on a real cluster each worker asks for a whole CPU.
        per_worker = min(1.0, cpus / world_size) if started_here else 1.0
        use_gpu = cfg.device == "cuda"
        _refuse_what_cannot_be_scheduled(ray, world_size, per_worker, use_gpu)
        resources = {"CPU": per_worker} if not use_gpu else {"CPU": per_worker, "GPU": 1.0}
        if progress:
            print(f"ray: {world_size} Ray Train worker(s) on {_where(ray, started_here)}", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="distshare-ray-") as storage:
            trainer = TorchTrainer(
                _worker,
                train_loop_config={
                    "cfg": cfg,
                    "keep_state": keep_state,
                    "collector": collector,
                    "faults": exit_spec_from_env(),
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
    finally:
        if started_here:
            ray.shutdown()
    for r in results:
        r.engine = "ray"
    if out_dir is not None:
        _write_run_files(cfg, results[0], out_dir)
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
    """One Ray Train worker: the torch engine's rank, in a process Ray started."""
    import ray.train
    import torch

    from distshare.distributed import watchdog
    from distshare.distributed.world import World
    from distshare.engines.gather import gather_to_main
    from distshare.testing.faults import HANG_ENV, worker_exit_hook
    from distshare.training import train

    cfg: RunConfig = config["cfg"]
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if cfg.device == "cuda" else torch.device("cpu")
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
    attempt = ray.get(config["collector"].started.remote(world.rank), timeout=cfg.timeout_s)
    faults = config.get("faults") or {}
    hook = worker_exit_hook(world, attempt, faults)
    if world.distributed:  # a timed-out collective then names the silent rank, as under torchrun
        if attempt == 0 and HANG_ENV in faults:
            os.environ[HANG_ENV] = faults[HANG_ENV]
        watchdog.watch(world.rank, world.world_size, cfg.timeout_s)
    try:
        result = train(
            cfg,
            world,
            None,
            progress=False,
            keep_state=config["keep_state"] and world.is_main,
            on_step=hook,
            restart=attempt,
        )
    except Exception as exc:
        explained = watchdog.explain(exc)
        if explained is exc:
            raise
        raise explained from exc  # its one line ends Ray's message, which the driver reports
    results = gather_to_main(result, world) if world.distributed else [result]
    if world.is_main:
        ray.get(config["collector"].put.remote(results))


def _write_run_files(cfg: RunConfig, main: TrainResult, out_dir: Path) -> None:
    """config.yaml and metrics.jsonl, as rank 0 writes them under the other engines."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out_dir / "config.yaml", main.world_size)
    with (out_dir / "metrics.jsonl").open("w") as f:
        for step, loss in enumerate(main.losses):
            f.write(json.dumps({"step": step, "loss": loss}) + "\n")


class _Collector:
    """Holds rank 0's list of results until the driver takes it (a Ray actor, made in `run_training`)."""

    def __init__(self) -> None:
        self.results: list[TrainResult] | None = None
        self.starts: dict[int, int] = {}

    def started(self, rank: int) -> int:
        """Count a start of `rank`'s worker; return how many came before (0: the first attempt)."""
        before = self.starts.get(rank, 0)
        self.starts[rank] = before + 1
        return before

    def put(self, results: list[TrainResult]) -> None:
        self.results = results

    def get(self) -> list[TrainResult] | None:
        return self.results
