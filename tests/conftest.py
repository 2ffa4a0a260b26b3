"""What the test files share: how to start distshare in a real process, under a real launcher,
and read back what it wrote.

One builder for every command line, in the manner of accelerate's
`test_utils.testing.get_launch_command`:

    get_launch_command()                                 python -m distshare
    get_launch_command("torchrun")                       torchrun --standalone --nproc_per_node=2 -m distshare
    get_launch_command("torchrun", max_restarts=1)       ... --max_restarts=1 -m distshare
    get_launch_command("accelerate", num_processes=3)    accelerate launch (CPU config, a free port) -m distshare

then `run_command(cmd + ["train", ...])` runs it from the repository root in a clean
environment (`subprocess_env`), and `rank0_json`, `read_result` and `read_metrics` read what
it printed and wrote. `run_cli(*args)` is the plain `python -m distshare` case, the `cli`
fixture the same in this process. `tiny_config` and `make_plan` build the small runs and
plans the unit tests share.

Test files import these plain functions by name (`from conftest import ...`: pytest puts
this folder on `sys.path`, as it does for `small_split`); the fixtures below need no import.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the repository: configs/ and launch/ are relative to it
ACCELERATE_CPU_CONFIG = "configs/accelerate/cpu.yaml"  # several CPU processes on gloo (see the file)

# What a launcher writes into its workers' environment. A test that itself runs under a
# launcher (or a developer's shell that exported one) must not hand these on: a child would
# think it was launched.
LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RESTART_COUNT",
)


# As the developer's shell had it, before a worker's share below is set.
OMP_NUM_THREADS_GIVEN = os.environ.get("OMP_NUM_THREADS")


def pytest_configure(config: pytest.Config) -> None:
    take_this_workers_share_of_the_cores()


def take_this_workers_share_of_the_cores() -> int | None:
    """Under pytest-xdist (`-n N`) N workers share the machine's cores: each worker, and the
    processes it starts, takes its share of them for torch's intra-op threads (returned; None
    in a serial run, which keeps torch's default). Left at torch's default (every core) in
    every worker, the threads outnumber the cores and spin at each other's barriers: 2 workers
    on 2 cores kept 22% more CPU busy for the same tests (`benchmarks/README.md`). An
    OMP_NUM_THREADS the developer set wins."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return None
    from distshare.distributed.spawn import share_of_cores

    os.environ.setdefault("OMP_NUM_THREADS", str(share_of_cores(workers)))  # for its children
    import torch  # here, not at the top: a serial run's conftest need not pay for it

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    return torch.get_num_threads()


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a distshare subprocess: this one, offline, unbuffered, gloo on
    loopback, no launcher's variables, this virtualenv's scripts first on PATH; plus `extra`."""
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    for key in LAUNCHER_VARIABLES:
        env.pop(key, None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (for a launcher's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_command() -> list[str]:
    """This virtualenv's `torchrun`, or the module it runs when the script is not installed."""
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def _flags(options: dict[str, Any]) -> list[str]:
    # accelerate's convention: True -> --flag, a value -> --flag=value, None or False -> nothing.
    out = []
    for key, value in options.items():
        if value is True:
            out.append(f"--{key}")
        elif value is not None and value is not False:
            out.append(f"--{key}={value}")
    return out


def get_launch_command(launcher: str = "python", **kwargs: Any) -> list[str]:
    """The command line that starts `python -m distshare` under `launcher`; the subcommand and
    its arguments follow it.

    `launcher`: "python" (no launcher: one process, or ranks the command spawns itself, or
    Ray with `--engine ray`), "torchrun", or "accelerate" (`accelerate launch`). `kwargs` are
    the launcher's own flags, written as accelerate's helper of the same name writes them:
    `standalone=True` -> `--standalone`, `nproc_per_node=2` -> `--nproc_per_node=2`, None or
    False -> left out. The defaults make a one-machine run of 2 CPU processes: torchrun
    `--standalone --nproc_per_node=2` (standalone unless `nnodes` is given), accelerate the
    CPU config with `--num_processes=2` on a free port.
    """
    if launcher == "python":
        if kwargs:
            raise TypeError(f"python -m distshare takes no launcher flags, got {sorted(kwargs)}")
        return [sys.executable, "-m", "distshare"]
    if launcher == "torchrun":
        options = {"standalone": "nnodes" not in kwargs, "nproc_per_node": 2, **kwargs}
        return [*torchrun_command(), *_flags(options), "-m", "distshare"]
    if launcher == "accelerate":
        options = {
            "config_file": ACCELERATE_CPU_CONFIG,
            "num_processes": 2,
            "main_process_port": kwargs.pop("main_process_port", None) or free_port(),
            **kwargs,
        }
        return [sys.executable, "-m", "accelerate.commands.launch", *_flags(options), "-m", "distshare"]
    raise ValueError(f"unknown launcher {launcher!r}: python, torchrun or accelerate")


def run_command(
    cmd: list[str], *, timeout: float = 240, cwd: Path | str = ROOT, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run `cmd` to its end in `subprocess_env(**env)`, from the repository root unless `cwd`
    says otherwise; output captured as text. A run past `timeout` seconds fails the test."""
    return subprocess.run(cmd, cwd=cwd, env=subprocess_env(**env), capture_output=True, text=True, timeout=timeout)


def run_cli(*args: str, timeout: float = 240, cwd: Path | str = ROOT, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m distshare *args` in a fresh process: its real exit code and output."""
    return run_command([*get_launch_command(), *args], timeout=timeout, cwd=cwd, **env)


def rank0_json(proc: subprocess.CompletedProcess[str]) -> dict:
    """The one JSON object a `--json` run prints (rank 0 speaks, the other ranks do not)."""
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, f"expected one JSON line (rank 0 speaks): {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[0])


def read_result(out: Path) -> dict:
    """A run directory's `result.json`: the source of truth."""
    return json.loads((out / "result.json").read_text())


def read_metrics(out: Path) -> list[dict]:
    """A run directory's `metrics.jsonl`: one row a step."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tiny_config(*overrides: str, path: Path | str | None = None, global_batch: int = 32, num_samples: int = 64):
    """A run small enough for a test: G = `global_batch` taken whole (k = 1, the micro-batch
    derived), the roles task on variable-length sentences (a label per word, so the items per
    sample differ and the normalizer matters), `num_samples` sentences; `overrides` win.
    `path`: a config file to start from instead of the defaults."""
    from distshare.config import load_config

    base = [
        f"plan.global_batch={global_batch}",
        "plan.accum_steps=1",
        "plan.micro_batch=null",
        f"data.num_samples={num_samples}",
        "data.task=roles",
        "data.variable_length=true",
    ]
    return load_config(path, [*base, *overrides])


def make_plan(n: int, w: int, k: int, b: int, seed: int = 0, drop_last: bool = True):
    """The global-batch plan of `n` samples for W x k x b (G = w k b)."""
    from distshare.config import PlanConfig
    from distshare.data.plan import GlobalBatchPlan

    resolved = PlanConfig(world_size=w, global_batch=w * k * b, accum_steps=k, micro_batch=None).resolve()
    return GlobalBatchPlan(n, resolved, seed=seed, drop_last=drop_last)


def rules_written_in_place(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Spies on exact mode's per-sample rules: the kinds of layer ("linear", "conv2d", ...) whose
    gradient a rule computed in its block, in place (`distshare.numerics.per_sample`), as they come."""
    from distshare.numerics import per_sample

    kinds: list[str] = []
    real = per_sample._rule

    def spy(call, gy, group, layout, into=None):
        if into is not None:
            kinds.append(call.kind)
        return real(call, gy, group, layout, into)

    monkeypatch.setattr(per_sample, "_rule", spy)
    return kinds


@pytest.fixture
def cli(capsys):
    """`cli(*argv)`: distshare's CLI in this process -> (exit code, stdout, stderr)."""
    from distshare.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="session")
def twenty_steps_straight(tmp_path_factory) -> dict:
    """The run the resume and restart tests must end on, bit for bit: 20 steps straight of the
    small split (tests/small_split.py) on 2 spawned ranks, a replica check every 5, in a fresh
    process; run once for the session. Its JSON (`result.json`'s content) and `out`, its directory."""
    from small_split import SMALL_SPLIT

    out = tmp_path_factory.mktemp("twenty-straight")
    args = ["train", "--engine", "torch", "--nproc", "2", *SMALL_SPLIT, "--steps", "20", "--check-every", "5"]
    proc = run_cli(*args, "--no-progress", "--json", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {**rank0_json(proc), "out": out}


@pytest.fixture(scope="session")
def hung_run(tmp_path_factory) -> dict[str, Any]:
    """`distshare train` (in this process) on 2 spawned ranks whose rank 1 goes silent at the
    start of step 3 (`distshare.testing.faults`), every collective bounded by `timeout` seconds;
    run once for the session. test_hang.py reads what it said and how long it waited,
    test_failure_records.py what it left in its run directory `out`."""
    import contextlib
    import io
    import time

    from distshare.cli import main
    from distshare.testing.faults import fault_env

    timeout = 3
    out = tmp_path_factory.mktemp("hung") / "run"
    argv = ["train", "--nproc", "2", "--steps", "6", "--timeout", str(timeout), "--no-progress", "--out", str(out)]
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in fault_env(hang_at="1:3").items():  # spawned ranks inherit it
            mp.setenv(key, value)
        start = time.monotonic()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(argv)
        wall = time.monotonic() - start
    return {"code": code, "err": stderr.getvalue(), "wall": wall, "timeout": timeout, "out": out}


@pytest.fixture(scope="session")
def demo_in_process(tmp_path_factory):
    """`demo_in_process(name)`: the demo `name` run in this process on seed 0 (`run_demo`'s
    default), once for the session, as its finding's dict. test_demo_weights.py and
    test_demo_attention.py check its numbers; test_demos.py compares it with the same demo run
    in another process (`distshare demo all`), so no demo runs twice in here on the same seed."""
    from distshare.demos import run_demo

    done: dict[str, dict] = {}

    def finding(name: str) -> dict:
        if name not in done:
            done[name] = run_demo(name, tmp_path_factory.mktemp(f"demo-{name}")).to_dict()
        return done[name]

    return finding


@pytest.fixture(scope="module")
def findings(request, demo_in_process) -> dict[str, dict]:
    """The demos the test module names in its `DEMOS`, each run once (seed 0): name -> finding."""
    return {name: demo_in_process(name) for name in request.module.DEMOS}


def controls_by_name(finding: dict) -> dict[str, dict]:
    return {c["name"]: c for c in finding["controls"]}
