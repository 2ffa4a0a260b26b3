"""Claim: a replica check at every step can cost almost nothing and still catch a flipped bit
within a stated number of steps, with the same diagnosis as the full check.

`check_mode: rolling` digests one slice of the state per step (all of it within `slices`
steps) and compares the rolling digest of every slice one step late; a difference makes the
next check a full one. A bit flipped in one parameter element on one rank after step t is in
a digested slice by step t + slices and reported, localized and diagnosed, by the check of
the step after. All runs share one 2-rank gloo world (one start-up).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distshare.distributed.spawn import run_distributed
from distshare.distributed.world import World
from distshare.integrity.replicas import ReplicaReport
from distshare.integrity.rolling import RollingDigest
from distshare.testing.faults import BIT_FLIP_BIT, BIT_FLIP_ELEMENT, BIT_FLIP_TENSOR, base_config
from distshare.training import Run, train

WORLD = 2
STEPS = 14
SLICES = 4  # forced: the tiny model fits in one slice of the default size
FLIPS = (4, 5, 6, 7)  # one run per flip step: every phase of the 4-slice rotation
FAULTY = 1


def _flip(run: Run) -> None:
    with torch.no_grad():
        words = dict(run.model.named_parameters())[BIT_FLIP_TENSOR].view(torch.int32)
        words[BIT_FLIP_ELEMENT] ^= 1 << BIT_FLIP_BIT


def _run(world: World, slices: int, flip_at: int | None, out_dir: Path | None = None) -> tuple[dict, Run]:
    kept: list[Run] = []

    def hook(run: Run, step: int) -> None:  # at the end of the step: after its check
        if step == flip_at and world.rank == FAULTY:
            _flip(run)
        if step == STEPS - 1:
            kept.append(run)

    cfg = base_config(world.world_size, STEPS, ["check_mode=rolling", f"check_slices={slices}"])
    result = train(cfg, world, out_dir=out_dir, progress=False, on_step=hook)
    return {
        "first_divergence": result.first_divergence,
        "final_fingerprint": result.final_fingerprint,
        "in_sync": result.replicas_in_sync,
        "checks": result.checks,
        "account": result.extras.get("replica_check"),
    }, kept[0]


def _rotation(run: Run) -> dict:
    """On the final (unchanging) state: a full rotation's rolling digest against one taken at
    once; every byte of every tensor in exactly one slice; a flipped bit changes the digest
    once its slice comes round, and not before."""
    digest = RollingDigest(run.model, run.optimizer, slices=SLICES)
    for k in range(SLICES):
        digest.advance(100 + k)
    equal = digest.value == digest.full()
    spans: dict[str, list[tuple[int, int]]] = {}
    for pieces in digest.plan:
        for p in pieces:
            start = int(p.header.rsplit(b"|", 2)[1])
            spans.setdefault(p.name, []).append((start, start + p.view.nbytes))
    sizes = {n: t.numel() * t.element_size() for n, t in _state(run).items()}
    tiled = all(
        [s for s, _ in sorted(spans[n])] == [0] + [e for _, e in sorted(spans[n])][:-1]
        and max(e for _, e in spans[n]) == size
        for n, size in sizes.items()
    )
    before = digest.value
    _flip(run)
    where = next(k for k, pieces in enumerate(digest.plan) if any(p.name == f"param/{BIT_FLIP_TENSOR}" for p in pieces))
    changed_at = None
    for k in range(SLICES):
        slice_now = digest.advance(200 + k).slice
        if digest.value != before and changed_at is None:
            changed_at = slice_now
    _flip(run)  # back
    return {"equal": equal, "tiled": tiled and set(spans) == set(sizes), "flip_slice": where, "seen_in": changed_at}


def _state(run: Run) -> dict[str, torch.Tensor]:
    from distshare.integrity.state import named_state_tensors

    return {n: t for n, t in named_state_tensors(run.model, run.optimizer) if not n.startswith("optim/group")}


def _watched_loop(world: World, flip_at: int | None, slices: int = 2, steps: int = 10) -> dict:
    """A user's own DDP loop under `distshare.watch(..., mode="rolling")`: where does it raise?"""
    import distshare
    from distshare.integrity.replicas import ReplicaDivergenceError

    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    data = torch.Generator().manual_seed(world.rank)
    raised_at = coverage = cause = None
    watcher = distshare.watch(model, optimizer, every=1, mode="rolling", slices=slices, timeout_s=30)
    try:
        for step in range(steps):
            optimizer.zero_grad()
            x = torch.randn(4, 8, generator=data)
            torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 0, 1])).backward()
            try:
                optimizer.step()
            except ReplicaDivergenceError as exc:
                raised_at, coverage = step, exc.report.coverage
                cause = exc.report.diagnosis.cause if exc.report.diagnosis else None
                break
            if step == flip_at and world.rank == FAULTY:
                with torch.no_grad():
                    model.module[0].weight.view(torch.int32)[1, 2] ^= 1 << BIT_FLIP_BIT
        else:
            watcher.close()
    finally:
        watcher.remove()
    return {
        "mode": watcher.mode,
        "raised_at": raised_at,
        "coverage": coverage,
        "cause": cause,
        "rolling_checks": watcher.rolling_checks,
        "slices": watcher.rolling.slices,
    }


def every_step_world(world: World, out_dir: str) -> dict:
    out: dict = {"watch_clean": _watched_loop(world, None), "watch_flip": _watched_loop(world, 3)}
    clean, run = _run(world, 0, None, Path(out_dir) if world.is_main else None)
    out["clean"] = clean
    out["rotation"] = _rotation(run)
    full_cfg = base_config(world.world_size, STEPS)  # check_mode full, every step: the reference
    out["full_fingerprint"] = train(full_cfg, world, progress=False).final_fingerprint
    out["whole"] = _run(world, 0, FLIPS[0])[0]
    out["sliced"] = {t: _run(world, SLICES, t)[0] for t in FLIPS}
    return out


@pytest.fixture(scope="module")
def world_out(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("every-step")
    per_rank = run_distributed(every_step_world, WORLD, str(out_dir), timeout_s=60, deadline_s=180)
    return per_rank, out_dir


def _report(outcome: dict) -> ReplicaReport:
    assert outcome["first_divergence"] is not None, "the flipped bit was never caught"
    return ReplicaReport.from_dict(outcome["first_divergence"])


def _assert_localized(report: ReplicaReport) -> None:
    name = f"param/{BIT_FLIP_TENSOR}"
    assert name in report.differing, report.summary()
    assert report.diagnosis is not None and report.diagnosis.cause == "corruption", report.summary()
    # Two ranks: no majority, both named; the element is found against rank 0's copy.
    assert report.differing[name] == [0, 1] and [d.first_index for d in report.elements[name]] == [[3, 5]]
    assert report.coverage is not None and "first seen in the state of step" in report.summary()


def test_a_clean_run_checks_every_step_and_ends_with_the_full_fingerprint(world_out):
    per_rank, out_dir = world_out
    clean = per_rank[0]["clean"]
    assert clean["in_sync"] and clean["first_divergence"] is None
    # The same training as a full check at every step: the last check is a full one.
    assert clean["final_fingerprint"] == per_rank[0]["full_fingerprint"]
    account = clean["account"]
    assert account["mode"] == "rolling" and account["slices"] == 1 and account["bound_steps"] == 1
    # A rolling check after every step but the last (a full one), each judged at the next step:
    # as many checks as the full mode makes.
    assert account["rolling_checks"] == STEPS - 1 and clean["checks"] == STEPS
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    # Each row says which step's state its verdict covers: the step before, and the last its own.
    covered = [(r["step"], r.get("checked_step")) for r in rows if "replicas_in_sync" in r]
    assert covered == [(s, s - 1) for s in range(1, STEPS - 1)] + [(STEPS - 1, None)]
    assert all(r["replicas_in_sync"] for r in rows if "replicas_in_sync" in r)
    assert account["last_rolling"]["state_step"] == STEPS - 2 and account["last_rolling"]["bytes"] > 0


def test_a_full_rotation_of_an_unchanged_state_gives_the_digest_taken_at_once(world_out):
    rotation = world_out[0][0]["rotation"]
    assert rotation["equal"] and rotation["tiled"]
    # The control: the flip changes the digest in the very advance that digests its slice.
    assert rotation["seen_in"] == rotation["flip_slice"]


def test_one_slice_catches_a_flipped_bit_in_the_next_steps_state(world_out):
    report = _report(world_out[0][0]["whole"])
    _assert_localized(report)
    # Flipped after step 4's check: in the state of step 5, reported (localized) at step 6.
    assert (report.coverage["state_step"], report.step) == (FLIPS[0] + 1, FLIPS[0] + 2)


def test_sliced_checks_catch_a_flipped_bit_within_the_stated_number_of_steps(world_out):
    per_rank = world_out[0]
    delays = {}
    for flip_at, outcome in per_rank[0]["sliced"].items():
        report = _report(outcome)
        _assert_localized(report)
        assert outcome["account"]["bound_steps"] == SLICES
        seen = report.coverage["state_step"]
        assert flip_at < seen <= flip_at + SLICES and report.step == seen + 1, report.summary()
        delays[flip_at] = seen - flip_at
        # Every rank reached the same verdict.
        assert per_rank[1]["sliced"][flip_at]["first_divergence"] == outcome["first_divergence"]
    # Over the four phases of the rotation the delay takes every value 1..SLICES: the bound is tight.
    assert sorted(delays.values()) == list(range(1, SLICES + 1))


def test_watch_in_a_users_loop_raises_within_the_bound(world_out):
    clean, flip = world_out[0][0]["watch_clean"], world_out[0][0]["watch_flip"]
    assert clean["mode"] == "rolling" and clean["raised_at"] is None and clean["rolling_checks"] == 10
    assert flip["cause"] == "corruption" and flip["slices"] == 2
    # Flipped after step 3: in a digested slice by step 3 + 2, raised by the check after it.
    seen = flip["coverage"]["state_step"]
    assert 3 < seen <= 3 + flip["slices"] and flip["raised_at"] == seen + 1
