"""Claim: distshare's replica checks run where users already train — transformers' `Trainer`
under torchrun and Lightning's `Trainer(strategy="ddp")` — pass a clean run, and stop a run
whose replicas diverge with the diagnosis.

The launched tests run the scripts in `tests/scripts/` (one launch each: the clean run, a
caught mutant, then an uncaught one that must end the process). The mutants are one callback
added to the same run: a weight scaled by 1 + 1e-4 on rank 1, a learning rate multiplied by 10
on rank 0 only, and (Trainer) rank 1's scheduler given another base learning rate, with the
scheduler's state compared and without.
"""

from __future__ import annotations

import importlib
import json
import sys

import pytest
import torch
from conftest import ROOT, run_command, torchrun_command

import distshare
from distshare.distributed.world import World
from distshare.errors import UsageError
from distshare.integrations.hf_trainer import DistshareCallback, innermost_optimizer
from distshare.testing import run_distributed

SCRIPTS = ROOT / "tests" / "scripts"
SCENARIOS = ["clean", "scale_rank1", "base_lr_rank1", "base_lr_rank1_unchecked", "lr_rank0"]  # the last runs uncaught


def _rows(stdout: str) -> dict[str, dict]:
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"scenario"')]
    return {r["scenario"]: r for r in rows}


def _assert_clean_then_mutants(proc, scaled: str) -> None:
    out = f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    rows = _rows(proc.stdout)
    # The clean run: a baseline and a check after each of the 4 optimizer steps, all in sync, said on stdout.
    assert rows["clean"]["in_sync"] is True and rows["clean"]["checks"] == 5, out
    assert "distshare: replicas in sync after 4 optimizer steps (5 check(s))" in proc.stdout, out
    # A weight scaled by 1e-4 on rank 1 after step 2 is caught at the next check, with its cause.
    scaled_row = rows["scale_rank1"]
    assert scaled_row["in_sync"] is False and scaled_row["cause"] == "optimizer_state", out
    assert scaled_row["error"].startswith("replicas differ at step 2: optimizer_state:"), out
    assert "written outside the optimizer" in scaled_row["error"]
    assert f"1 tensor(s) differ: 1 parameter: param/{scaled} on ranks 0, 1" in scaled_row["error"]
    # The uncaught mutant ends the run: a non-zero exit, the diagnosis from every rank.
    assert proc.returncode != 0 and "lr_rank0" not in rows, out
    for rank in (0, 1):
        line = next((x for x in proc.stderr.splitlines() if x.startswith(f"[rank{rank}]: distshare.")), "")
        assert "ReplicaDivergenceError: replicas differ at step 2: optimizer_hyperparams:" in line, out
        assert "optim/group0/lr" in line and "rank 1 0.0" in line, out


def _assert_scheduler_state_compared(proc, name: str, groups: int) -> None:
    # Rank 1's scheduler given another base learning rate before step 2 is caught at that step,
    # before any learning rate differs; with the scheduler left out of the checks it is not.
    rows = _rows(proc.stdout)
    checked = rows["base_lr_rank1"]["error"]
    assert checked.startswith("replicas differ at step 2:"), checked
    assert f"{groups} tensor(s) differ: extra state ({groups}): {name} on ranks 0, 1" in checked  # a base lr per group


@pytest.mark.slow
@pytest.mark.launcher
def test_trainer_under_torchrun_checks_replicas_and_stops_on_divergence(tmp_path):
    cmd = [*torchrun_command(), "--standalone", "--nproc_per_node=2", str(SCRIPTS / "trainer_ddp.py"), *SCENARIOS]
    proc = run_command(cmd, timeout=150, cwd=tmp_path)
    _assert_clean_then_mutants(proc, "transformer.h.0.mlp.c_fc.weight")
    _assert_scheduler_state_compared(proc, "extra/lr_scheduler/base_lrs/0", groups=2)  # with, without decay
    # Without it, Trainer's schedule recomputes the learning rate from the base a step later.
    unchecked = _rows(proc.stdout)["base_lr_rank1_unchecked"]["error"]
    assert unchecked.startswith("replicas differ at step 3: optimizer_hyperparams:") and "extra/" not in unchecked


@pytest.mark.slow
@pytest.mark.launcher
def test_lightning_ddp_checks_replicas_and_stops_on_divergence(tmp_path):
    pytest.importorskip("lightning", reason="Lightning is an optional extra: pip install distshare[lightning]")
    # Lightning's ddp strategy starts rank 1 itself, by running the same script again.
    proc = run_command([sys.executable, str(SCRIPTS / "lightning_ddp.py"), *SCENARIOS], timeout=150, cwd=tmp_path)
    _assert_clean_then_mutants(proc, "net.0.weight")
    _assert_scheduler_state_compared(proc, "extra/lr_scheduler/0/base_lrs/0", groups=1)
    # StepLR never reads its base learning rate: left out of the checks, the difference is never seen.
    assert _rows(proc.stdout)["base_lr_rank1_unchecked"]["in_sync"] is True


# ------------------------------------------------------------------------ in-process checks


def _watch_inside_accelerate(world: World) -> dict:
    """A real `AcceleratedOptimizer` (in a fresh process: accelerate's state is process-wide)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    watcher = distshare.watch(model, innermost_optimizer(optimizer))
    for _ in range(4):  # 4 micro-batches, 2 updates
        with accelerator.accumulate(model):
            model(torch.randn(2, 4)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    watcher.close()
    return {"wrapper": type(optimizer).__name__, "updates": watcher.iterations, "checks": watcher.checks}


@pytest.mark.slow
def test_the_optimizer_inside_accelerates_wrapper_is_the_one_watched():
    # The mutant (watching the wrapper itself) fails to register its hook: AttributeError.
    (result,) = run_distributed(_watch_inside_accelerate, 1, timeout_s=30, deadline_s=90)
    assert result == {"wrapper": "AcceleratedOptimizer", "updates": 2, "checks": 3}


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"every": 0}, "every=0"),
        ({"every": True}, "every=True"),
        ({"every": 2.5}, "every=2.5"),
        ({"grads": "yes"}, "grads='yes'"),
        ({"buffers": "all"}, "buffers='all'"),
    ],
)
def test_bad_options_are_refused_in_one_line_when_the_callback_is_built(options, named):
    callbacks = [DistshareCallback]
    if importlib.util.find_spec("lightning") is not None:
        from distshare.integrations.lightning_callback import DistshareLightningCallback

        callbacks.append(DistshareLightningCallback)
    for cls in callbacks:
        with pytest.raises(UsageError) as info:
            cls(**options)
        message = str(info.value)
        assert message.startswith(named) and "expected" in message and "\n" not in message


@pytest.mark.parametrize(
    ("module", "hidden", "fix"),
    [
        (
            "distshare.integrations.lightning_callback",
            ("lightning", "lightning.pytorch", "pytorch_lightning"),
            "pip install distshare[lightning]",
        ),
        ("distshare.integrations.hf_trainer", ("transformers",), "pip install transformers"),
    ],
)
def test_a_missing_framework_is_one_line_naming_the_install(monkeypatch, module, hidden, fix):
    for name in hidden:
        monkeypatch.setitem(sys.modules, name, None)  # import of it raises ImportError
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(UsageError) as info:
        importlib.import_module(module)
    assert fix in str(info.value) and "\n" not in str(info.value)


def test_a_callback_called_without_trainers_arguments_says_how_to_use_it():
    with pytest.raises(UsageError) as info:
        DistshareCallback().on_train_begin(None, None, None)  # what Trainer passes is missing
    assert "Trainer(callbacks=[...])" in str(info.value) and "\n" not in str(info.value)


def test_lightning_with_two_optimizers_is_refused_in_one_line():
    pytest.importorskip("lightning", reason="Lightning is an optional extra: pip install distshare[lightning]")
    from types import SimpleNamespace

    from distshare.integrations.lightning_callback import DistshareLightningCallback

    model = torch.nn.Linear(2, 1)
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(model.parameters(), lr=0.1)]
    trainer = SimpleNamespace(optimizers=optimizers, lr_scheduler_configs=[], strategy=SimpleNamespace(model=model))
    callback = DistshareLightningCallback()
    with pytest.raises(UsageError) as info:
        callback.on_train_start(trainer, model)
    assert str(info.value).startswith("DistshareLightningCallback watches one optimizer, this run has 2:")
    assert callback.watcher is None  # nothing hooked
