"""Claim: every verdict can fail. A NaN fails every check that sees it; the sample accounting
reads what each loss consumed (so a skipped, repeated or swapped micro-batch fails it, though
the plan is untouched); a learning rate or gradient off by a hair on every rank fails the
comparison with one process. Each test names the mutant it injects; on the code before
issue 14 each of them passed the verdict it now fails."""

from __future__ import annotations

import math

import pytest
import torch

from distshare.commands.verify import DEFAULTS
from distshare.config import load_config
from distshare.data.accounting import account
from distshare.distributed.world import World
from distshare.equivalence.grid import assert_accumulation_equivalent, run_grid
from distshare.equivalence.tasks import ConfigTask
from distshare.numerics.diff import diff, worst
from distshare.numerics.rounding import excess
from distshare.testing.mutants import MutantTask, make, stepping
from distshare.training import build_run, train_step


def _grid(task, steps=3):
    return run_grid(task, [1], [2], [None], steps, progress=False).partitions[0]


def _cfg(*extra):
    return load_config(None, [*DEFAULTS, "steps=3", *extra])


def test_a_nan_is_never_a_small_difference():
    a = {"w": torch.tensor([1.0, float("nan"), 3.0])}
    b = {"w": torch.tensor([1.0, 2.0, 3.0])}
    d = diff(a, b)
    assert not d.finite and d.nonfinite == 1 and "w[1] = nan (observed)" in d.describe()
    assert math.isnan(d.norm_rel_diff) and not d.within(1e30)
    assert diff(b, b).within(0.0)  # the clean pair is within any bound
    same_nan = diff(a, a)  # bitwise equal, and still not a finite result
    assert same_nan.bitwise_equal and not same_nan.within(1.0)
    assert math.isnan(excess(a, b, {"w": torch.ones(3)}))
    assert math.isnan(worst(0.0, math.nan, 1.0)) and max(0.0, math.nan, 1.0) == 1.0  # what max did


def test_the_grid_fails_a_nan_gradient():
    p = _grid(MutantTask(_cfg(), mutant="nan-gradient"))
    assert not p.within_rounding and p.nonfinite.startswith("gradient at step 2")
    assert p.summary().startswith("NON-FINITE")


def test_assert_accumulation_equivalent_fails_a_nan_loss():
    x, y = torch.randn(16, 4, generator=torch.Generator().manual_seed(0)), torch.arange(16.0) / 4

    def loss(model, batch):
        xb, yb = batch
        per = (model(xb).squeeze(-1) - yb).pow(2)
        return torch.where(yb == 0.25, per * float("nan"), per).sum()  # the mutant: sample 1's loss is NaN

    with pytest.raises(AssertionError, match="NON-FINITE"):
        assert_accumulation_equivalent(
            lambda: torch.nn.Linear(4, 1), loss, torch.utils.data.TensorDataset(x, y), world_sizes=(1,)
        )


@pytest.mark.parametrize("name", ["skip-micro-batch", "repeat-micro-batch", "repeat-sample"])
def test_accounting_reads_what_the_loss_consumed(name):
    """The plan is untouched; only what is loaded differs. The plan's own slices would pass."""
    cfg = load_config(None, [*DEFAULTS, "plan.world_size=1", "steps=3"])
    run = build_run(cfg, World())
    step = stepping(run, make(name))
    used = [step(s)[1] for s in range(cfg.steps)]
    planned = [[m.tolist() for m in run.plan.rank_micro_batches(s, 0)] for s in range(cfg.steps)]
    assert account(run.plan, [planned]).ok  # the plan checked against itself: blind
    acc = account(run.plan, [used])
    assert not acc.ok and 2 in {**acc.missing, **acc.duplicated}, acc.summary()


def test_a_clean_step_consumes_exactly_the_plan():
    cfg = load_config(None, [*DEFAULTS, "plan.world_size=1", "steps=2"])
    run = build_run(cfg, World())
    used = [train_step(run, s).indices for s in range(cfg.steps)]
    assert account(run.plan, [used]).ok


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_update_is_replayed_bit_for_bit(dtype):
    """A learning rate 1e-7 relative off from step 1 (every rank alike) is far below any
    rounding bound on the trajectory; the replayed update sees it at step 1."""
    clean = _grid(ConfigTask(_cfg(f"model.dtype={dtype}")))
    assert clean.within_rounding and not clean.update_mismatch, clean.summary()
    bad = _grid(MutantTask(_cfg(f"model.dtype={dtype}"), mutant="learning-rate", eps=1e-7))
    assert not bad.within_rounding and bad.update_mismatch.startswith("step 1:"), bad.summary()
    assert bad.grad_excess <= 1  # the gradients themselves are right: only the update is wrong


@pytest.mark.parametrize(("dtype", "eps"), [("float32", 1e-4), ("float64", 1e-10)])
def test_a_gradient_scale_error_fails_the_bound(dtype, eps):
    """Every gradient x (1 + eps) from step 1, on every rank alike: the replayed update is the
    configured one (the optimizer is right), only the bound on the gradient can see it; in
    float64 the bound is 2^29 times tighter, and so is what it catches."""
    p = _grid(MutantTask(_cfg(f"model.dtype={dtype}"), mutant="gradient-scale", eps=eps))
    assert not p.within_rounding and p.grad_excess > 1 and not p.update_mismatch, p.summary()
