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
Rank 0's metrics rows and its step count reach the driver the same way, as they happen; the
driver writes the run directory (config.yaml at the start, metrics.jsonl a line at a time)
and draws the progress bar, as the other engines' rank 0 does. `fit()` runs in a thread of
the driver, so Ctrl-C lands in the driver's own loop: it stops the workers, shuts Ray down
and leaves the run directory as any engine does (the command says how to resume, exit 130).

    distshare train --engine ray --nproc 2 --max-failures 1 --checkpoint-dir ckpt

With `--max-failures N` (Ray's `FailureConfig(max_failures=N)`) a worker that dies makes
Ray Train start the whole group again, and each worker resumes from the newest verified
checkpoint in ckpt. A worker learns that it is a restart from the collector actor, which
lives with the driver and counts how often each rank has started: no environment variable
or file system is needed for that.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any

from distshare.config import dump_config
from distshare.distributed import launchers
from distshare.engines.runner import RankJob, forwarded_environment, run_rank
from distshare.errors import DistshareError, UsageError
from distshare.extras import require
from distshare.training import Component, Loop, TrainResult
from distshare.training.metrics import METRICS_FILE, FileSink
from distshare.training.progress import show_loss, steps_bar

if TYPE_CHECKING:
    from tqdm import tqdm


def run_training(
    job: RankJob, engine: str = "ray", address: str | None = None, max_failures: int = 0
) -> list[TrainResult]:
    """Train on `cfg.plan.world_size` Ray Train workers; every worker's result, rank order.

    `max_failures`: how often Ray Train may restart the workers after one died (0: never).
    The driver writes config.yaml at once and each metrics row as it arrives, and draws the
    progress bar; Ctrl-C stops the workers and raises KeyboardInterrupt here, with whatever
    arrived on disk (the command then says how to resume).
    """
    require("ray", "--engine ray")  # an optional extra: pip install 'distshare[ray]'
    import ray

    cfg = job.cfg
    world_size = cfg.plan.world_size
    connected_before = ray.is_initialized()
    started_here = False
    collector = None
    display = _Display(job, world_size)  # config.yaml and metrics.jsonl before Ray's slow start
    try:
        started_here = _connect(ray, launchers.ray_address(address))
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
        # Workers write nothing and show nothing: rank 0 streams its steps and rows to the
        # collector, and the driver writes the run directory and draws the bar from them.
        worker_job = RankJob(
            cfg, None, progress=False, keep_state=job.keep_state, components=(*job.components, _StepsToDriver())
        )
        with tempfile.TemporaryDirectory(prefix="distshare-ray-") as storage:
            fit = _Fit(
                ray,
                {"job": worker_job, "engine": engine, "collector": collector, "env": forwarded_environment()},
                world_size,
                use_gpu,
                resources,
                int(cfg.timeout_s),
                storage,
                max_failures,
            )
            # One question to the collector at a time, never waited on for long: a busy machine
            # may answer late, and the bar and the file then catch up at the next answer.
            asked = collector.take.remote()
            while not fit.done(POLL_S):
                ready, _ = ray.wait([asked], timeout=0)
                if ready:
                    display.show(ray.get(asked))
                    asked = collector.take.remote()
            last_s = max(cfg.timeout_s, FINAL_S)
            display.show(ray.get(asked, timeout=last_s))
            display.show(ray.get(collector.take.remote(), timeout=last_s))  # what came after the last question
            if fit.error is not None:
                raise DistshareError(f"Ray Train run failed: {_first_line(fit.error)}") from fit.error
        results: list[TrainResult] | None = ray.get(collector.get.remote(), timeout=last_s)
        if results is None:
            raise DistshareError("Ray Train run failed: the workers ended without handing back their results")
        return results
    except KeyboardInterrupt:
        _stop_workers(ray, collector)
        raise
    finally:
        display.close()
        if ray.is_initialized() and not connected_before:
            ray.shutdown()  # also ends the run's actors (controller, workers) on a cluster we joined


# How often the driver collects rank 0's steps and rows (seconds): the bar's refresh.
POLL_S = 0.25
# The longest the driver waits for the collector's last rows and the results once the workers are done.
FINAL_S = 60.0


class _Fit:
    """`TorchTrainer.fit()` in a thread of its own, so that the driver's main thread writes
    the rows and draws the bar meanwhile. It also keeps Ctrl-C ours: off the main thread Ray
    Train installs no SIGINT handler of its own (which would end the process, exit 1, silently)."""

    def __init__(
        self,
        ray: Any,
        loop_config: dict[str, Any],
        world_size: int,
        use_gpu: bool,
        resources: dict[str, float],
        timeout_s: int,
        storage: str,
        max_failures: int,
    ) -> None:
        from ray.train import FailureConfig, ScalingConfig
        from ray.train import RunConfig as RayRunConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        self.trainer = TorchTrainer(
            _worker,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=world_size, use_gpu=use_gpu, resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=timeout_s),
            run_config=RayRunConfig(
                name="distshare", storage_path=storage, failure_config=FailureConfig(max_failures=max_failures)
            ),
        )
        self.error: BaseException | None = None
        # A daemon: after Ctrl-C the driver shuts Ray down and must not wait for this thread.
        self.thread = threading.Thread(target=self._run, name="distshare-ray-fit", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as exc:  # Ray wraps a worker's error; the driver says it in one line
            self.error = exc

    def done(self, wait_s: float) -> bool:
        self.thread.join(timeout=wait_s)
        return not self.thread.is_alive()


class _Display:
    """The driver's side of the stream: config.yaml at once, metrics.jsonl line by line, the bar."""

    def __init__(self, job: RankJob, world_size: int) -> None:
        self.out_dir = job.out_dir
        self.sink: FileSink | None = None
        self.attempt = -1
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            dump_config(job.cfg, self.out_dir / "config.yaml", world_size)
            self.sink = FileSink(self.out_dir / METRICS_FILE)
            self.sink.write([])  # the file exists from the start, as under the other engines
        self.progress, self.steps = job.progress, job.cfg.steps
        self.bar: tqdm | None = None  # drawn once Ray is up (after its start line)

    def show(self, news: dict[str, Any]) -> None:
        """Take what rank 0 sent since the last look: its attempt, steps done, new rows."""
        if self.bar is None:
            self.bar = steps_bar(0, self.steps, disable=not self.progress)
        if news["attempt"] is None:
            return  # no worker has begun yet
        if news["attempt"] != self.attempt:
            # A restarted attempt rewrites the file from the start (its first rows are the steps
            # before its checkpoint), so the file holds each step once, as under torchrun.
            self.attempt = news["attempt"]
            if self.sink is not None:
                self.sink.close()
                self.sink = FileSink(self.sink.path)
        if news["rows"]:
            if self.sink is not None:
                self.sink.write(news["rows"])  # flushed: a reader sees each row as it arrives
            show_loss(self.bar, news["rows"])
        if news["steps_done"] is not None and news["steps_done"] != self.bar.n:
            self.bar.n = news["steps_done"]
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.sink is not None:
            self.sink.close()
            self.sink = None


def _stop_workers(ray: Any, collector: Any) -> None:
    """Ctrl-C: end the workers now (best effort; the driver's Ray shutdown ends the rest).

    The collector refuses any further start, so Ray Train's restarts (--max-failures) end too.
    """
    if collector is None or not ray.is_initialized():
        return
    with contextlib.suppress(Exception):
        for actor in ray.get(collector.abort.remote(), timeout=STOP_S):
            with contextlib.suppress(Exception):
                ray.kill(actor)


STOP_S = 10.0  # how long Ctrl-C waits for the collector to name the workers to stop


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
    here = ray.get_runtime_context().current_actor  # so that Ctrl-C on the driver can stop this worker
    attempt = _ask_collector(ray, collector.started.remote(world.rank, here))
    if attempt is None:
        raise DistshareError("the driver was interrupted: not starting again")
    sink = _CollectorSink(collector, attempt) if world.is_main else None
    for component in job.components:
        if isinstance(component, _StepsToDriver):
            component.connect(collector, attempt)
    results = run_rank(job, world, config["engine"], "ray", restart=attempt, metrics=sink)
    if world.is_main:
        _ask_collector(ray, collector.put.remote(results))


# How long a worker waits for the collector's answer (seconds). Not the run's collective timeout:
# no peer is involved, and the collector is an actor the driver started moments before the
# workers, whose process may still be importing torch (4 s on an idle 2-core machine, measured;
# longer on a busy one), so a short --timeout would otherwise fail a healthy run at its start.
COLLECTOR_S = 120.0


def _ask_collector(ray: Any, answer: Any) -> Any:
    """A worker's call to the collector, waited on for at most COLLECTOR_S seconds."""
    from ray.exceptions import GetTimeoutError

    try:
        return ray.get(answer, timeout=COLLECTOR_S)
    except GetTimeoutError:
        raise DistshareError(f"the driver's collector did not answer within {COLLECTOR_S:g} s") from None


class _CollectorSink:
    """Rank 0's metrics rows, sent to the driver's collector as they are logged."""

    def __init__(self, collector: Any, attempt: int) -> None:
        self.collector, self.attempt = collector, attempt

    def write(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self.collector.add_rows.remote(self.attempt, rows)

    def close(self) -> None:
        pass


class _StepsToDriver(Component):
    """Rank 0 tells the driver how many steps are done, for its progress bar: at the start
    (a resumed run starts part way) and then at most every `every_s` seconds, and at the end."""

    def __init__(self, every_s: float = 0.2) -> None:
        self.every_s = every_s
        self.collector: Any = None
        self.attempt = 0
        self.sent = 0.0

    def connect(self, collector: Any, attempt: int) -> None:
        self.collector, self.attempt = collector, attempt

    def _send(self, steps_done: int, force: bool = False) -> None:
        now = time.monotonic()
        if self.collector is not None and (force or now - self.sent >= self.every_s):
            self.sent = now
            self.collector.progress.remote(self.attempt, steps_done)  # not awaited: training goes on

    def begin(self, loop: Loop) -> None:
        if loop.world.is_main:
            self._send(loop.first_step, force=True)

    def step_end(self, loop: Loop, step: int) -> None:
        if loop.world.is_main:
            self._send(step + 1, force=step + 1 == loop.steps)


class _Collector:
    """What rank 0 sends the driver, kept until the driver takes it (a Ray actor, made in `run_training`):
    its steps and metrics rows as the run goes, its results at the end, and each rank's start count."""

    def __init__(self) -> None:
        self.results: list[TrainResult] | None = None
        self.starts: dict[int, int] = {}
        self.workers: list[Any] = []
        self.aborted = False
        self.attempt: int | None = None  # rank 0's newest attempt; rows of an older one are late, and dropped
        self.steps_done: int | None = None
        self.new_rows: list[dict[str, Any]] = []

    def started(self, rank: int, actor: Any = None) -> int | None:
        """Count a start of `rank`'s worker; return how many came before (0: the first attempt),
        or None once the driver was interrupted (a restart must not begin)."""
        if self.aborted:
            return None
        if actor is not None:
            self.workers.append(actor)
        before = self.starts.get(rank, 0)
        self.starts[rank] = before + 1
        return before

    def _news_from(self, attempt: int) -> bool:
        if self.attempt is None or attempt > self.attempt:
            self.attempt, self.steps_done, self.new_rows = attempt, None, []
        return attempt == self.attempt

    def progress(self, attempt: int, steps_done: int) -> None:
        if self._news_from(attempt):
            self.steps_done = steps_done

    def add_rows(self, attempt: int, rows: list[dict[str, Any]]) -> None:
        if self._news_from(attempt):
            self.new_rows.extend(rows)

    def take(self) -> dict[str, Any]:
        """Rank 0's attempt, its steps done, and the rows that came since the last `take`."""
        rows, self.new_rows = self.new_rows, []
        return {"attempt": self.attempt, "steps_done": self.steps_done, "rows": rows}

    def abort(self) -> list[Any]:
        """The driver was interrupted: refuse further starts; the workers to stop."""
        self.aborted = True
        return self.workers

    def put(self, results: list[TrainResult]) -> None:
        self.results = results

    def get(self) -> list[TrainResult] | None:
        return self.results
