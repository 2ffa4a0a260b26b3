"""Claim: the one step runs under every engine — spawned torch ranks, torchrun, a real
`accelerate launch` on 2 CPU processes, Ray Train with 2 workers — and every engine ends
with the same final fingerprint; a launcher that does not fit the engine is refused in one
line that says what to run instead."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import rank0_json, read_metrics, read_result, run_cli
from small_split import SMALL_SPLIT

from distshare.config import SHIPPED_CONFIGS, load_config
from distshare.engines import resolve_engine
from distshare.engines.accelerate import exact_unscale
from distshare.errors import DistshareError, UsageError

CPU_YAML = SHIPPED_CONFIGS / "accelerate" / "cpu.yaml"  # the shipped config a refusal names

# Small and quick, but a real split: float64, 40 steps with the replicas compared at every
# one, so each engine's run is also 40 checks without a false alarm. The parity table runs it
# at W = 3 ranks x k = 3 micro-batches (ODD, below).
STEPS = 40
RUN = [
    *SMALL_SPLIT,
    "--steps",
    str(STEPS),
    "--check-every",
    "1",
    "--no-progress",
    "--json",
]


def _distshare(args: list[str], timeout: float = 240, **env: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, timeout=timeout, **env)


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the whole module: Ray's start-up is the slow part of its tests. Three
    CPUs: exact mode's parity runs W = 3."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


# W = 3 ranks x k = 3 micro-batches: neither a power of two, so cancelling accelerate's
# division by k and DDP's average over W by scaling the loss by k x W would not be exact.
ODD = ["--set", "plan.global_batch=18", "--set", "plan.accum_steps=3", "--set", "data.num_samples=180"]


@pytest.fixture(scope="module")
def parity(ray_cluster, tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`verify --engine all --nproc 3` on RUN + ODD, once for the module: its process and its run directory."""
    out = tmp_path_factory.mktemp("parity")
    args = ["verify", "--engine", "all", "--nproc", "3", "--ray-address", ray_cluster, *RUN, *ODD, "--out", str(out)]
    return _distshare(args, timeout=600), out


def _engine_run(parity, engine: str) -> tuple[dict, subprocess.CompletedProcess[str], Path]:
    """One engine's row of the parity table, its own process's output (JSON) and its run directory."""
    verify, out = parity
    (row,) = [r for r in rank0_json(verify)["rows"] if (r["engine"], r["launcher"]) == (engine, engine)]
    run_dir = out / engine
    stdout, stderr = (run_dir / "stdout.txt").read_text(), (run_dir / "stderr.txt").read_text()
    assert row["exit_code"] == 0, stderr[-3000:]
    return row, subprocess.CompletedProcess(row["command"], row["exit_code"], stdout, stderr), run_dir


@pytest.fixture(scope="module")
def spawned(parity) -> dict:
    """The torch engine's run: the baseline every other engine must match. The parity table's
    first run is it: `distshare train --engine torch --nproc 3` on RUN + ODD, in its own process."""
    proc, out = parity
    assert (out / "spawn" / "result.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = read_result(out / "spawn")
    assert result["engine"] == "torch" and result["launcher"] == "spawn" and result["ok"], result
    return result


@pytest.mark.launcher
@pytest.mark.slow
def test_accelerate_launch_cpu_processes_bitwise_equal_to_the_torch_engine(parity, spawned):
    # The parity table's accelerate run: `accelerate launch --num_processes 3 ... train --engine
    # accelerate` on RUN + ODD, in its own process (a real `accelerate launch`).
    row, proc, _ = _engine_run(parity, "accelerate")
    assert "-m accelerate.commands.launch" in row["command"] and "--num_processes 3" in row["command"]
    result = rank0_json(proc)
    assert result["engine"] == "accelerate" and result["world_size"] == 3
    assert result["plan"]["accum_steps"] == 3 and result["plan"]["micro_batch"] == 2
    assert result["replicas_in_sync"] and result["accounting"]["ok"]
    assert result["replica_checks"] == STEPS and result["first_divergence"] is None
    assert result["final_fingerprint"] == spawned["final_fingerprint"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_loss_scale_cancels_accelerates_division_exactly(dtype):
    # Every k up to 140 (float32) has a scale s with fl(fl(1/k) * s) == 1: gradients unchanged.
    for k in range(1, 141):
        s = exact_unscale(k, dtype)
        assert (torch.ones((), dtype=dtype) / k * s).item() == 1.0, k


@pytest.mark.launcher
@pytest.mark.slow
def test_ray_train_three_workers_matches_the_torch_engine(parity, spawned):
    # The parity table's Ray run: `distshare train --engine ray --nproc 3 --ray-address ...` on
    # RUN + ODD (the module's Ray cluster), in its own process; its output and run directory.
    _, proc, run_dir = _engine_run(parity, "ray")
    result = rank0_json(proc)
    assert result["engine"] == "ray" and result["world_size"] == 3
    assert result["replicas_in_sync"] and result["accounting"]["ok"]
    assert result["final_fingerprint"] == spawned["final_fingerprint"]
    # The driver wrote the run directory, readable again.
    assert read_result(run_dir)["final_fingerprint"] == result["final_fingerprint"]
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(STEPS))
    # The same file as every engine's: the spawned ranks' columns, the same losses.
    spawned_rows = read_metrics(Path(spawned["run_dir"]))
    assert [sorted(r) for r in rows] == [sorted(r) for r in spawned_rows]
    assert [r["loss"] for r in rows] == [r["loss"] for r in spawned_rows]
    assert result["replica_checks"] == STEPS and result["first_divergence"] is None


@pytest.mark.launcher
@pytest.mark.slow
def test_parity_table_every_engine_bitwise_float64(parity):
    """`verify --engine all`: torch, torchrun, accelerate launch, Ray and one process."""
    proc, out = parity
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = rank0_json(proc)
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"torch (spawn)", "torch (torchrun)", "accelerate", "ray", "local (1 process)"}
    assert {(r["engine"], r["launcher"]) for r in rows.values()} == {
        ("torch", "spawn"),
        ("torch", "torchrun"),
        ("accelerate", "accelerate"),
        ("ray", "ray"),
        ("local", None),
    }
    fingerprints = {r["final_fingerprint"] for name, r in rows.items() if name != "local (1 process)"}
    assert len(fingerprints) == 1, rows
    assert result["engines_bitwise_equal"]
    # One process sums each global batch in another order: not bitwise, at rounding scale.
    assert result["max_abs_diff_vs_reference"] <= 1e-12
    assert (out / "report.md").read_text().count("| torch (torchrun) |") == 1


@pytest.mark.parametrize(
    ("engine", "nproc", "env", "expect"),
    [
        ("accelerate", 2, {}, f"accelerate launch --config_file {CPU_YAML} --num_processes 2"),
        ("local", 2, {}, "--engine torch --nproc 2"),
        ("ray", 2, {"RANK": "0", "WORLD_SIZE": "2"}, "not under a launcher"),
        ("accelerate", 2, {"RANK": "0", "WORLD_SIZE": "2"}, "not torchrun"),
    ],
)
def test_a_misused_launcher_is_refused_with_what_to_run(engine, nproc, env, expect, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = load_config(None, [f"engine={engine}", f"plan.world_size={nproc}"])
    with pytest.raises(UsageError, match=expect.replace(".", r"\.")):
        resolve_engine(cfg)


@pytest.mark.slow
def test_cli_misuse_is_one_line_and_exit_2():
    proc = _distshare(["train", "--engine", "accelerate", "--nproc", "2", "--steps", "1"], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "accelerate launch" in proc.stderr


def test_auto_picks_the_launcher_engine(monkeypatch):
    cfg = load_config(None, ["plan.world_size=2"])
    assert resolve_engine(cfg) == "torch"
    assert resolve_engine(load_config(None, [])) == "local"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_engine(cfg) == "torch"  # torchrun
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert resolve_engine(cfg) == "accelerate"


def test_a_missing_engine_package_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(UsageError, match=r"pip install 'distshare\[ray\]'"):
        resolve_engine(load_config(None, ["engine=ray", "plan.world_size=2"]))


@pytest.mark.launcher
@pytest.mark.slow
def test_every_engine_and_one_process_agree_bitwise_in_exact_mode(ray_cluster, tmp_path):
    # Exact mode (`--sync exact`, distshare.exact) on spawned ranks, torchrun, accelerate launch,
    # Ray Train (the module's Ray) and one process: five engines, W = 3, one final fingerprint.
    args = ["verify", "--engine", "all", "--sync", "exact", "--nproc", "3", "--ray-address", ray_cluster]
    proc = _distshare([*args, "--set", "steps=6", "--json", "--no-progress", "--out", str(tmp_path / "p")], timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = rank0_json(proc)
    rows = {r["name"]: r for r in table["rows"] if not r["skipped"]}
    assert set(rows) == {"torch (spawn)", "torch (torchrun)", "accelerate", "ray", "local (1 process)"}, table["rows"]
    assert len({r["final_fingerprint"] for r in rows.values()}) == 1
    assert table["engines_bitwise_equal"] and table["max_abs_diff_vs_reference"] == 0.0


@pytest.mark.launcher
@pytest.mark.slow
def test_ray_refuses_more_workers_than_the_cluster_holds(ray_cluster):
    # Ray would wait for the missing CPU forever; distshare says so in one line instead.
    args = ["--nproc", "4", "--ray-address", ray_cluster, "--steps", "1", "--set", "plan.global_batch=48"]
    proc = _distshare(["train", "--engine", "ray", *args])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "needs 4 CPU(s); the Ray cluster has 3" in proc.stderr


# Longer than any collective timeout the suite's Ray runs use (test_hang.py's is 3 s).
HELD_S = 5.0


def _hold(collector, seconds: float) -> None:
    """Keep the collector actor busy for `seconds`: Ray runs an actor's calls one at a time."""
    collector.__ray_call__.remote(lambda _self, s: time.sleep(s), seconds)


@pytest.mark.launcher
def test_a_worker_waits_for_a_slow_collector_by_its_own_bound_not_the_collective_timeout(ray_cluster, monkeypatch):
    # A Ray run failed in CI with "GetTimeoutError": a worker's first question to the collector
    # (an actor the driver had just started, still importing torch) was bound by the run's
    # 3-s collective timeout. A collector held for HELD_S stands in for a slow one.
    import ray

    from distshare.engines import ray as ray_engine

    collector = ray.remote(num_cpus=0)(ray_engine._Collector).remote()
    _hold(collector, HELD_S)
    assert ray_engine._ask_collector(ray, collector.started.remote(0)) == 0  # the first start of rank 0
    # The mutant: a bound shorter than the hold (as the 3-s timeout was) fails, in one line.
    monkeypatch.setattr(ray_engine, "COLLECTOR_S", 1.0)
    _hold(collector, 3.0)
    with pytest.raises(DistshareError, match=r"^the driver's collector did not answer within 1 s$"):
        ray_engine._ask_collector(ray, collector.started.remote(1))
    ray.kill(collector)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_refused_before_anything_starts():
    with pytest.raises(UsageError, match="no CUDA GPU"):
        resolve_engine(load_config(None, ["device=cuda"]))
