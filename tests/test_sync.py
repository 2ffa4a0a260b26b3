"""Claim: W ranks x k micro-batches, all-reduced, compute the gradient of one process on the
whole global batch, and after the sync every rank holds the same gradient (but not before).

First the sync classes themselves (`distshare.distributed.sync`: `make_sync` gives DDPSync,
AllReduceSync or ExactSync), driven micro-batch by micro-batch on a small MLP against a
gradient computed here with plain autograd; then the whole training step and loop.
Real gloo process groups on spawned CPU ranks; no mocks of torch.distributed.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, tiny_config
from torch import nn

from distshare.commands.verify import rounding_bound
from distshare.config import RunConfig
from distshare.distributed.sync import AllReduceSync, DDPSync, ExactSync, GradSync, make_sync
from distshare.distributed.world import World
from distshare.integrity.replicas import compare_replicas
from distshare.numerics.diff import diff
from distshare.numerics.rounding import reorder_norm_bound
from distshare.testing import run_distributed
from distshare.training import build_run, train, train_step
from distshare.training.loop import Component

G, K = 12, 2  # divisible by W x k for W in {1, 2, 3}

# --- the sync classes, one step by hand -----------------------------------------------------

N = 24  # samples in the global batch: W x k divides it for W in {1, 2, 3} and k in {1, 2}
MODES = {"ddp": DDPSync, "allreduce": AllReduceSync, "exact": ExactSync}


def _mlp() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same initial weights on every rank and in the test
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(N, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (N,), generator=gen)


def _sample_losses(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")  # each sample's loss, [n]


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _one_process_gradient() -> dict[str, torch.Tensor]:
    """The large-batch gradient, by plain autograd: mean loss over the whole global batch."""
    model = _mlp()
    (_sample_losses(model, _global_batch()).sum() / N).backward()
    return _grads(model)


def _sync_step(world: World, mode: str, k: int) -> tuple[str, dict | None, dict]:
    """One step of this rank's k micro-batches under `make_sync(mode, W)`, called the way the
    training step calls it: (the sync's class, this rank's own gradient before the sync, the
    gradient after it). Each rank holds a contiguous 1/W of the global batch."""
    sync = make_sync(mode, world.world_size)
    model = _mlp()
    wrapped, _ = sync.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = _global_batch()
    share = slice(world.rank * N // world.world_size, (world.rank + 1) * N // world.world_size)
    micro = list(zip(x[share].chunk(k), y[share].chunk(k), strict=True))
    sync.start_step(model, N, N)
    local = None
    for i, batch in enumerate(micro):
        last = i == k - 1
        if sync.per_sample:  # exact mode takes the samples and computes in synchronize()
            sync.accumulate(model, batch, _sample_losses)
            continue
        with sync.micro_step(wrapped, last):
            sync.backward(_sample_losses(wrapped, batch).sum() / N)
        if not (last and sync.reduces_in_backward):  # DDP's last backward already all-reduces
            local = _grads(model)
    sync.synchronize(model)
    return type(sync).__name__, local, _grads(model)


def _every_mode(world: World, k: int) -> dict[str, tuple[str, dict | None, dict]]:
    return {mode: _sync_step(world, mode, k) for mode in MODES}


@pytest.fixture(scope="module")
def two_ranks(world_of_two) -> list[dict[str, tuple[str, dict | None, dict]]]:
    """Each sync class's step on 2 gloo ranks, k = 2 micro-batches each."""
    return [rank["every_mode"] for rank in world_of_two]


def test_make_sync_gives_each_mode_its_class():
    for mode, cls in MODES.items():
        assert type(make_sync(mode, 2)) is cls, mode
    assert type(make_sync("ddp", 1)) is GradSync and type(make_sync("allreduce", 1)) is GradSync  # nothing to sync
    assert type(make_sync("exact", 1)) is ExactSync and make_sync("exact", 3).world_size == 3


@pytest.mark.parametrize("mode", list(MODES))
def test_the_sync_leaves_every_rank_the_one_process_gradient(two_ranks, mode):
    reference = _one_process_gradient()
    cls, _, rank0 = two_ranks[0][mode]
    assert cls == MODES[mode].__name__
    for rank in two_ranks[1:]:  # the same bits on every rank
        assert all(torch.equal(rank[mode][2][n], rank0[n]) for n in reference), mode
    # Summed over the ranks, not averaged: the gradient of the whole batch, up to the order
    # of summation (an average would be 1/W of it, a skipped all-reduce half of the data's).
    d = diff(rank0, reference)
    assert d.norm_rel_diff <= reorder_norm_bound(torch.float64, N), (mode, d.describe())


@pytest.mark.parametrize("mode", ["ddp", "allreduce"])
def test_the_ranks_gradients_differ_before_the_sync(two_ranks, mode):
    """What a rank computed alone (DDP: inside no_sync, after the first micro-batch;
    all-reduce: after the last backward) is its own: the ranks saw different samples."""
    (_, local0, synced0), (_, local1, _) = two_ranks[0][mode], two_ranks[1][mode]
    assert local0 is not None and local1 is not None
    assert any(not torch.equal(local0[n], local1[n]) for n in local0)
    assert any(not torch.equal(local0[n], synced0[n]) for n in local0)


def _exact_alone(k: int) -> dict[str, torch.Tensor]:
    _, _, grads = _sync_step(World(), "exact", k)
    return grads


def test_exact_sync_gives_the_same_bits_for_every_split(two_ranks):
    """ExactSync sums per-sample gradients in integers: 2 ranks x 2 micro-batches, 1 process
    x 1 batch and 1 process x 2 micro-batches are bitwise the same gradient."""
    on_two_ranks = two_ranks[0]["exact"][2]
    for grads in (_exact_alone(1), _exact_alone(2)):
        assert all(torch.equal(grads[n], on_two_ranks[n]) for n in grads)


# --- the training step and loop -------------------------------------------------------------


def _config(dtype: str, sync: str = "ddp", world_size: int = 1, k: int = K) -> RunConfig:
    return tiny_config(
        f"model.dtype={dtype}",
        f"sync={sync}",
        f"plan.world_size={world_size}",
        f"plan.accum_steps={k}",
        "steps=3",
        "check_every=1",
        path=ROOT / "configs/train/transformer.yaml",
        global_batch=G,
        num_samples=96,
    )


class _Step0Grads(Component):
    """Keeps the synced gradient of step 0 (what the optimizer stepped with), on every rank."""

    def after_step(self, loop, step, row) -> None:
        if step == 0:
            loop.result.extras["step0_grads"] = {
                n: p.grad.detach().clone() for n, p in loop.run.model.named_parameters() if p.grad is not None
            }


def _train_all_modes(world: World) -> dict:
    """On every rank: train in each (dtype, sync) combination; keep grads and params."""
    out = {}
    for dtype in ("float64", "float32"):
        for sync in ("ddp", "allreduce"):
            cfg = _config(dtype, sync, world.world_size)
            r = train(cfg, world, progress=False, keep_state=True, components=[_Step0Grads()])
            out[(dtype, sync)] = (r.extras["step0_grads"], r.state, r.replicas_in_sync, r.final_fingerprint)
    return out


def _single(dtype: str):
    r = train(_config(dtype, "ddp", 1, k=1), World(), progress=False, keep_state=True, components=[_Step0Grads()])
    return r.extras["step0_grads"], r.state


@pytest.fixture(scope="module")
def references():
    return {dtype: _single(dtype) for dtype in ("float64", "float32")}


@pytest.mark.parametrize("world_size", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_ranks_match_one_process_on_the_global_batch(world_size, references, request):
    if world_size == 2:
        ranks = [rank["train_all_modes"] for rank in request.getfixturevalue("world_of_two")]
    else:
        ranks = run_distributed(_train_all_modes, world_size, timeout_s=60, deadline_s=240)
    for (dtype, sync), (grads, state, in_sync, fp) in ranks[0].items():
        ref_grads, ref_state = references[dtype]
        g, p = diff(grads, ref_grads), diff(state, ref_state)
        print(
            f"W={world_size} {sync:9s} {dtype}: step-0 grad {g.max_abs_diff:.2e} abs, "
            f"{g.norm_rel_diff:.2e} norm rel; params after 3 steps {p.max_abs_diff:.2e} abs"
        )
        assert in_sync, (dtype, sync)
        assert all(r[(dtype, sync)][3] == fp for r in ranks), "final fingerprints differ across ranks"
        if dtype == "float64":
            assert g.max_abs_diff <= 1e-12 and p.max_abs_diff <= 1e-12, (sync, g, p)
        else:
            # float32: only the summation order differs; the difference stays at rounding scale.
            cfg = _config(dtype)
            assert g.norm_rel_diff <= rounding_bound(cfg, G * 5), (sync, g)


def _grads_before_and_after_sync(world: World, sync: str) -> tuple[bool | None, bool]:
    """(gradients identical across ranks before the sync?, ... after the sync?), on the real
    step (`train_step`) with the real sync of `make_sync`: the step calls back when `.grad`
    holds what this rank computed alone."""
    run = build_run(_config("float64", sync, world.world_size), world)
    before: list[bool] = []
    train_step(run, 0, lambda: before.append(compare_replicas(run.model, grads=True).in_sync))
    after = compare_replicas(run.model, grads=True).in_sync
    return (before[0] if before else None), after


@pytest.mark.parametrize("sync", ["ddp", "allreduce"])
def test_gradients_differ_before_the_sync_and_agree_after(world_of_two, sync):
    results = [rank["before_and_after_sync"][sync] for rank in world_of_two]
    for before, after in results:
        assert before is False, "ranks saw different samples, so their local gradients must differ"
        assert after is True, "after the all-reduce every rank must hold the same gradient"


class _SkippedAllReduce(AllReduceSync):
    """The mutant: the explicit all-reduce, except that it never reduces."""

    def synchronize(self, model):
        pass


def _grads_without_sync(world: World) -> bool:
    run = build_run(_config("float64", "allreduce", world.world_size), world, sync=_SkippedAllReduce())
    train_step(run, 0)
    return compare_replicas(run.model, grads=True).in_sync


def test_the_check_sees_a_sync_that_does_nothing(world_of_two):
    # The control: the same check on a sync that skips the all-reduce finds the ranks apart.
    assert [rank["without_sync"] for rank in world_of_two] == [False, False]


def test_single_process_plan_is_the_reference():
    cfg = _config("float64", world_size=1, k=1)
    assert dataclasses.asdict(cfg.plan.resolve())["micro_batch"] == G


def _train_with_tail(world: World) -> tuple:
    # 50 samples, G = 12: the epoch's last global batch holds 2 samples, split over 4 slots,
    # so rank 1 runs two empty micro-batches and must still join the all-reduce.
    cfg = _config("float64", "ddp", world.world_size)
    cfg = dataclasses.replace(
        cfg,
        steps=5,
        data=dataclasses.replace(cfg.data, num_samples=50),
        plan=dataclasses.replace(cfg.plan, drop_last=False),
    )
    r = train(cfg, world, progress=False, keep_state=True)
    return r.state, r.samples_by_step, r.replicas_in_sync


def test_an_incomplete_last_batch_is_split_not_padded(world_of_two):
    ranks = [rank["tail"] for rank in world_of_two]
    state, samples, in_sync = ranks[0]
    assert in_sync
    assert [len(m) for m in samples[4]] == [1, 1]
    assert [len(m) for m in ranks[1][1][4]] == [0, 0]  # rank 1's slots are empty: nothing padded or repeated
    ref = dataclasses.replace(_config("float64", "ddp", 1, k=1), steps=5)
    ref = dataclasses.replace(
        ref, data=dataclasses.replace(ref.data, num_samples=50), plan=dataclasses.replace(ref.plan, drop_last=False)
    )
    expected = train(ref, World(), progress=False, keep_state=True).state
    assert diff(state, expected).max_abs_diff <= 1e-12


# --- one spawned world of 2 ranks for the module ----------------------------------------------


def _on_two_ranks(world: World) -> dict:
    """Everything this module runs on 2 ranks, in one spawned world (one start-up instead of
    one per test), in the same order on every rank."""
    return {
        "every_mode": _every_mode(world, K),
        "train_all_modes": _train_all_modes(world),
        "before_and_after_sync": {sync: _grads_before_and_after_sync(world, sync) for sync in ("ddp", "allreduce")},
        "without_sync": _grads_without_sync(world),
        "tail": _train_with_tail(world),
    }


@pytest.fixture(scope="module")
def world_of_two() -> list[dict]:
    """Rank by rank, what `_on_two_ranks` returned."""
    return run_distributed(_on_two_ranks, 2, timeout_s=60, deadline_s=300)
