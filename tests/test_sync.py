"""Claim: W ranks x k micro-batches, all-reduced, compute the gradient of one process on the
whole global batch, and after the sync every rank holds the same gradient (but not before).

Real gloo process groups on spawned CPU ranks; no mocks of torch.distributed.
"""

from __future__ import annotations

import dataclasses

import pytest

from distshare.commands.verify import FirstStepProbe, rounding_bound
from distshare.config import RunConfig, load_config
from distshare.distributed.spawn import run_distributed
from distshare.distributed.sync import AllReduceSync
from distshare.distributed.world import World
from distshare.integrity.replicas import compare_replicas
from distshare.numerics.diff import diff
from distshare.training import build_run, train, train_step

G, K = 12, 2  # divisible by W x k for W in {1, 2, 3}


def _config(dtype: str, sync: str = "ddp", world_size: int = 1, k: int = K) -> RunConfig:
    return load_config(
        "configs/train/transformer.yaml",
        [
            f"model.dtype={dtype}",
            f"sync={sync}",
            f"plan.world_size={world_size}",
            f"plan.global_batch={G}",
            f"plan.accum_steps={k}",
            "plan.micro_batch=null",
            "steps=3",
            "check_every=1",
            "data.num_samples=96",
            "data.task=roles",
            "data.variable_length=true",
        ],
    )


def _train_all_modes(world: World) -> dict:
    """On every rank: train in each (dtype, sync) combination; keep grads and params."""
    out = {}
    for dtype in ("float64", "float32"):
        for sync in ("ddp", "allreduce"):
            cfg = _config(dtype, sync, world.world_size)
            r = train(cfg, world, progress=False, keep_state=True, components=[FirstStepProbe()])
            out[(dtype, sync)] = (FirstStepProbe.of(r)["grads"], r.state, r.replicas_in_sync, r.final_fingerprint)
    return out


def _single(dtype: str):
    r = train(_config(dtype, "ddp", 1, k=1), World(), progress=False, keep_state=True, components=[FirstStepProbe()])
    return FirstStepProbe.of(r)["grads"], r.state


@pytest.fixture(scope="module")
def references():
    return {dtype: _single(dtype) for dtype in ("float64", "float32")}


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_match_one_process_on_the_global_batch(world_size, references):
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
def test_gradients_differ_before_the_sync_and_agree_after(sync):
    results = run_distributed(_grads_before_and_after_sync, 2, sync, timeout_s=60, deadline_s=120)
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


def test_the_check_sees_a_sync_that_does_nothing():
    # The control: the same check on a sync that skips the all-reduce finds the ranks apart.
    assert run_distributed(_grads_without_sync, 2, timeout_s=60, deadline_s=120) == [False, False]


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


def test_an_incomplete_last_batch_is_split_not_padded():
    ranks = run_distributed(_train_with_tail, 2, timeout_s=60, deadline_s=120)
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
