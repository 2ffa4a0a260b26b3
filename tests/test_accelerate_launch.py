"""Claim: what a new user types first is either run as asked or refused in one line that
gives the command that works (issue 18, item 1 and the last mistake of item 5).

- `accelerate launch --cpu --num_processes 2 -m distshare train` starts ONE process
  (accelerate's single-process launcher); it used to train alone and print "OK ... on 1
  rank(s)". It is refused, naming the shipped cpu.yaml launch. The counterfactual, plain
  `accelerate launch --cpu` (one process, one asked for), still trains.
- a `--nproc` that disagrees with the launcher's process count is refused, not ignored.
- `assert_accumulation_equivalent` with its default grid on a BatchNorm model ends in the
  documented AssertionError (BatchNorm is not accumulation-equivalent), not in a RankError
  from a one-sample micro-batch; a grid's global batch that some W x k does not divide is
  refused with the nearest one that every split divides.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import get_launch_command, rank0_json, run_command
from torch import nn

from distshare.config import SHIPPED_CONFIGS, load_config
from distshare.distributed import launchers
from distshare.engines import resolve_engine
from distshare.equivalence import check_partitions
from distshare.equivalence.grid import MIN_MICRO_BATCH, default_global_batch
from distshare.equivalence.pitfalls.grid import toy_dataset
from distshare.errors import UsageError
from distshare.testing import assert_accumulation_equivalent

CPU_YAML = SHIPPED_CONFIGS / "accelerate" / "cpu.yaml"

# The environment each launch gives its process, as measured with real launches of an
# env-dumping script (accelerate 1.16, CPU-only machine), minus what does not matter here.
ACCELERATE_SETTINGS = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "True"}
SINGLE_ASKED_FOR_TWO = {**ACCELERATE_SETTINGS, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}  # --cpu -n 2
SINGLE_ASKED_FOR_ONE = dict(ACCELERATE_SETTINGS)  # --cpu
MULTI_CPU_RANK = {**SINGLE_ASKED_FOR_TWO, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}  # cpu.yaml -n 2
KEYS = ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")


@pytest.fixture
def environ(monkeypatch):
    """`environ(**variables)`: this process's environment as a launcher would leave it."""
    for key in (*KEYS, "LOCAL_RANK", *launchers.MPI_WORLD_SIZE):
        monkeypatch.delenv(key, raising=False)

    def set_to(variables: dict[str, str]) -> None:
        for key, value in variables.items():
            monkeypatch.setenv(key, value)

    return set_to


# ---------------------------------------------------------------- what the environment tells


def test_a_single_process_launch_asked_for_several_is_recognised(environ):
    environ(SINGLE_ASKED_FOR_TWO)
    assert launchers.accelerate_started_one_of_several()


@pytest.mark.parametrize(
    ("launch", "extra"),
    [
        (SINGLE_ASKED_FOR_ONE, {}),  # accelerate launch --cpu: one asked for, one started
        (MULTI_CPU_RANK, {}),  # the cpu.yaml launch: a rank of several
        (SINGLE_ASKED_FOR_TWO, {"OMPI_COMM_WORLD_SIZE": "2"}),  # the simple launcher under mpirun: MPI ranks
        ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, {}),  # no accelerate at all
    ],
    ids=["cpu-alone", "multi-cpu-rank", "mpirun", "no-accelerate"],
)
def test_launches_that_started_what_they_were_asked_for_are_not(environ, launch, extra):
    environ({**launch, **extra})
    assert not launchers.accelerate_started_one_of_several()


@pytest.mark.parametrize("engine", ["accelerate", "auto"])
def test_resolve_engine_refuses_the_lone_process_with_the_shipped_config(environ, engine):
    environ(SINGLE_ASKED_FOR_TWO)
    with pytest.raises(UsageError) as info:
        resolve_engine(load_config(None, [f"engine={engine}"]))
    message = str(info.value)
    assert "started 1 process" in message and "\n" not in message
    assert f"accelerate launch --config_file {CPU_YAML} --num_processes 2 -m distshare train" in message


@pytest.mark.parametrize("engine", ["accelerate", "auto"])
def test_nproc_given_to_the_lone_process_is_refused(environ, engine):
    # `accelerate launch --cpu -m distshare train --nproc 4`: nothing says 4 but --nproc.
    environ(SINGLE_ASKED_FOR_ONE)
    with pytest.raises(UsageError, match=r"--nproc 4 under accelerate launch, which started 1 process") as info:
        resolve_engine(load_config(None, [f"engine={engine}", "plan.world_size=4"]))
    assert f"--config_file {CPU_YAML} --num_processes 4" in str(info.value)


def test_the_lone_process_asked_for_one_still_resolves(environ):
    environ(SINGLE_ASKED_FOR_ONE)
    assert resolve_engine(load_config(None, ["engine=accelerate"])) == "accelerate"


def test_nproc_that_disagrees_with_the_launcher_is_refused(environ):
    environ(MULTI_CPU_RANK)
    assert launchers.launched_world_size(None) == 2  # the launcher's count, when --nproc is not given
    assert launchers.launched_world_size(2) == 2  # agreeing is fine
    with pytest.raises(UsageError, match="--nproc 4 disagrees with accelerate launch, which started 2") as info:
        launchers.launched_world_size(4, "verify")
    assert f"--config_file {CPU_YAML} --num_processes 4 -m distshare verify --engine accelerate" in str(info.value)


def test_nproc_that_disagrees_with_torchrun_names_torchrun(environ):
    environ({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(UsageError, match="torchrun --standalone --nproc_per_node 3 -m distshare train"):
        launchers.launched_world_size(3)
    environ({"RANK": "0", "WORLD_SIZE": "3"})
    assert launchers.launched_world_size(3) == 3


def test_without_a_launcher_nproc_is_the_world(environ):
    assert launchers.launched_world_size(4) == 4 and launchers.launched_world_size(None) is None


def test_the_working_command_names_a_config_that_exists_anywhere():
    command = launchers.accelerate_command("train", 3)
    config = Path(command.split("--config_file ")[1].split()[0])
    assert config.is_absolute() and config == CPU_YAML and config.is_file()
    assert "multi_gpu.yaml" in launchers.accelerate_command("train", 2, device="cuda")


# ---------------------------------------------------------------- real launches


def _accelerate_cpu(*flags: str) -> list[str]:
    # accelerate launch WITHOUT the shipped config: what a new user types first.
    return [sys.executable, "-m", "accelerate.commands.launch", *flags, "-m", "distshare"]


def _train_args(out: Path) -> list[str]:
    return ["train", "--engine", "accelerate", "--steps", "1", "--no-progress", "--json", "--out", str(out)]


@pytest.mark.slow
@pytest.mark.launcher
def test_accelerate_launch_cpu_num_processes_2_is_refused_in_one_line(tmp_path):
    # HF_HOME: no accelerate default_config.yaml of the developer's may choose for the test.
    cmd = [*_accelerate_cpu("--cpu", "--num_processes=2", "--main_process_port=0"), *_train_args(tmp_path / "run")]
    proc = run_command(cmd, timeout=120, HF_HOME=str(tmp_path / "hf"))
    ours = [line for line in proc.stderr.splitlines() if line.startswith("distshare: error:")]
    assert proc.returncode != 0 and len(ours) == 1, proc.stderr[-3000:]
    assert "started 1 process" in ours[0] and f"--config_file {CPU_YAML} --num_processes 2" in ours[0]
    # distshare's own exit code is 2; accelerate launch reports it, and exits 1 itself.
    assert "returned non-zero exit status 2" in proc.stderr
    assert not (tmp_path / "run").exists() and '"ok"' not in proc.stdout


@pytest.mark.slow
@pytest.mark.launcher
def test_accelerate_launch_cpu_alone_still_trains_one_process(tmp_path):
    # The counterfactual: --cpu with nothing asked for beyond one process is a fair run.
    cmd = [*_accelerate_cpu("--cpu"), *_train_args(tmp_path / "run")]
    proc = run_command(cmd, timeout=120, HF_HOME=str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = rank0_json(proc)
    assert result["engine"] == "accelerate" and result["world_size"] == 1


@pytest.mark.slow
@pytest.mark.launcher
def test_nproc_disagreeing_with_a_real_accelerate_launch_is_refused(tmp_path):
    cmd = get_launch_command("accelerate", num_processes=2)
    proc = run_command([*cmd, *_train_args(tmp_path / "run"), "--nproc", "4"], timeout=120)
    ours = {line for line in proc.stderr.splitlines() if line.startswith("distshare: error:")}
    assert proc.returncode != 0 and len(ours) == 1, proc.stderr[-3000:]  # every rank says the same one line
    assert "--nproc 4 disagrees with accelerate launch, which started 2 processes" in ours.pop()
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- the default grid and its G


def batchnorm_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 4)).double()


def summed_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y, _ = batch
    return F.cross_entropy(model(x), y, reduction="sum")


@pytest.mark.slow
def test_batchnorm_with_the_default_grid_is_the_documented_assertion_error():
    # Before: G = 8, so W = 2, k = 4 ran one-sample micro-batches and BatchNorm raised inside
    # the rank (RankError). Now it trains, and the verdict is the one documented: BatchNorm's
    # per-micro-batch statistics are not one big batch. (The control, a model without
    # BatchNorm passing on the same defaults, is test_equivalence.py's
    # test_assert_accumulation_equivalent_passes_on_a_correct_model.)
    with pytest.raises(AssertionError) as info:
        assert_accumulation_equivalent(batchnorm_mlp, summed_loss, toy_dataset(64), steps=1)
    assert "FAIL" in str(info.value) and "W=2 k=4" in str(info.value)


@pytest.mark.parametrize(
    ("world_sizes", "accum_steps"), [((1, 2), (1, 2, 4)), ((1, 2, 3, 4), (1, 2, 4, 8)), ((1,), (1,)), ((3,), (5,))]
)
def test_the_default_global_batch_gives_every_micro_batch_two_samples(world_sizes, accum_steps):
    g = default_global_batch(world_sizes, accum_steps)
    products = [w * k for w in world_sizes for k in accum_steps]
    assert all(g % p == 0 and g // p >= MIN_MICRO_BATCH for p in products) and g >= 8
    # and it is the smallest such G (a larger one would only cost time)
    assert not any(all(h % p == 0 and h // p >= MIN_MICRO_BATCH for p in products) for h in range(8, g))


@pytest.mark.parametrize(("g", "world_sizes"), [(30, (1, 2, 3, 4)), (20, (1, 2, 3)), (100, (1, 2, 3, 4))])
def test_a_grid_g_that_some_split_does_not_divide_gets_the_nearest_that_all_do(g, world_sizes):
    accum_steps = (1, 2, 4, 8)
    with pytest.raises(UsageError) as info:
        check_partitions(g, world_sizes, accum_steps)
    suggested = int(re.search(r"global_batch=(\d+)", str(info.value)).group(1))
    step = math.lcm(*(w * k for w in world_sizes for k in accum_steps))
    assert suggested % step == 0 and suggested > 0
    assert abs(suggested - g) <= min(abs(m - g) for m in range(step, 4 * g + step, step))
    check_partitions(suggested, world_sizes, accum_steps)  # the suggestion is accepted
