"""Claim: a replica check at every step can cost almost nothing and still catch a flipped bit
within a stated number of steps, with the same diagnosis as the full check.

`check_mode: rolling` digests one slice of the state per step (all of it within N =
`check_slices` steps) and keeps each step's 16-byte rolling digest; every K = `check_batch`
steps one background gather compares the K digests, judged at the next step; a difference
makes that step's check a full one, whose report names the step whose digest first differed.
So a bit flipped in one parameter element on one rank after step t is in a digested slice by
step t + N and reported, localized and diagnosed, by step t + N + K: exactly at the step after
the batch that holds the first differing digest, in every phase of the rotation and of the
batch. A digest that differs at one step only (in the middle of a batch) is caught too, and a
rank whose slice never advances is. All runs share one 2-rank gloo world (one start-up).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distshare.config import load_config
from distshare.distributed.spawn import run_distributed
from distshare.distributed.world import World
from distshare.errors import ConfigError
from distshare.integrity.replicas import ReplicaReport
from distshare.integrity.rolling import BATCH, SLICE_TENSORS, RollingDigest, bound, first_difference
from distshare.testing.faults import BIT_FLIP_BIT, BIT_FLIP_ELEMENT, BIT_FLIP_TENSOR, base_config
from distshare.training import Run, train

WORLD = 2
STEPS = 14
SLICES = 4  # forced: the tiny model fits in one slice of the default size
K = 3  # forced check_batch: small, so that every position in a batch is reached in a short run
SLICED_STEPS = 22  # room for the flips below to be reported before the last step
FAULTY = 1
# (delay until the flipped slice is digested, that step's position in its batch): every delay
# 1..SLICES, every position 0..K-1, and the worst case (delay SLICES at a batch's first
# position: reported SLICES + K steps after the flip).
PHASES = ((SLICES, 0), (3, 1), (2, 2), (1, 0))


def _flip(run: Run) -> None:
    with torch.no_grad():
        words = dict(run.model.named_parameters())[BIT_FLIP_TENSOR].view(torch.int32)
        words[BIT_FLIP_ELEMENT] ^= 1 << BIT_FLIP_BIT


def _run(
    world: World, slices: int, flip_at: int | None, out_dir: Path | None = None, steps: int = STEPS, batch: int = K
) -> tuple[dict, Run]:
    kept: list[Run] = []

    def hook(run: Run, step: int) -> None:  # at the end of the step: after its check
        if step == flip_at and world.rank == FAULTY:
            _flip(run)
        if step == steps - 1:
            kept.append(run)

    cfg = base_config(world.world_size, steps, ["check_mode=rolling", f"check_slices={slices}", f"check_batch={batch}"])
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


def _expected(flip_at: int, flip_slice: int) -> tuple[int, int]:
    """(the step whose state's digest first differs, the step that reports it) for a flip after
    `flip_at`'s check: the slice of step s is s mod SLICES (step 0 digests every slice: Adam's
    state appears, the plan is rebuilt); the batches hold steps [iK, iK + K), each judged at
    the step after its last."""
    seen = next(s for s in range(flip_at + 1, flip_at + SLICES + 1) if s % SLICES == flip_slice)
    return seen, (seen // K + 1) * K


def _flip_steps(flip_slice: int) -> list[int]:
    """One flip step per entry of PHASES (see there), the earliest after step 1."""
    chosen = []
    for delay, position in PHASES:
        t = next(t for t in range(2, 40) if _expected(t, flip_slice)[0] - t == delay and (t + delay) % K == position)
        chosen.append(t)
    return chosen


def _watched_loop(
    world: World, flip_at: int | None, slices: int = 2, steps: int = 10, batch: int = K, transient: bool = False
) -> dict:
    """A user's own DDP loop under `distshare.watch(..., mode="rolling")`: where does it raise?

    `transient`: the bit is flipped on the faulty rank right after step `flip_at`'s update and
    flipped back before the next forward, so exactly one step's digest (`flip_at`'s, in the
    middle of a batch) differs: the full check after it finds every tensor equal again.
    """
    import distshare
    from distshare.integrity.replicas import ReplicaDivergenceError

    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    data = torch.Generator().manual_seed(world.rank)
    iteration = [0]

    def flip() -> None:
        with torch.no_grad():
            model.module[0].weight.view(torch.int32)[1, 2] ^= 1 << BIT_FLIP_BIT

    def after_update(*_: object) -> None:  # registered before the watch's hook: runs before its digest
        if transient and iteration[0] == flip_at and world.rank == FAULTY:
            flip()

    hook = optimizer.register_step_post_hook(after_update)
    raised_at = coverage = cause = differing = None
    watcher = distshare.watch(model, optimizer, every=1, mode="rolling", slices=slices, batch=batch, timeout_s=30)
    try:
        for step in range(steps):
            iteration[0] = step
            if transient and step == flip_at + 1 and world.rank == FAULTY:
                flip()  # back, before this step's forward: nothing but step flip_at's digest saw it
            optimizer.zero_grad()
            x = torch.randn(4, 8, generator=data)
            torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 0, 1])).backward()
            try:
                optimizer.step()
            except ReplicaDivergenceError as exc:
                raised_at, report = step, exc.report
                break
            if not transient and step == flip_at and world.rank == FAULTY:
                flip()
        else:
            try:
                watcher.close()
            except ReplicaDivergenceError as exc:
                raised_at, report = "close", exc.report
        if raised_at is not None:
            coverage, differing = report.coverage, report.differing
            cause = report.diagnosis.cause if report.diagnosis else None
    finally:
        watcher.remove()
        hook.remove()
    return {
        "mode": watcher.mode,
        "raised_at": raised_at,
        "coverage": coverage,
        "cause": cause,
        "differing": differing,
        "rolling_checks": watcher.rolling_checks,
        "gathers": watcher.exchange.gathers,
        "slices": watcher.rolling.slices,
        "batch": watcher.exchange.batch,
    }


def _stuck_slice(world: World) -> dict:
    """The mutant: the faulty rank's rolling digest never advances its slice (it re-digests
    slice 0 at every step; the others keep step 0's digests)."""
    original = RollingDigest.advance

    def stuck(self: RollingDigest, step: int):  # noqa: ANN202
        coverage = original(self, step)
        self.counter -= 1
        return coverage

    if world.rank == FAULTY:
        RollingDigest.advance = stuck  # type: ignore[method-assign]
    try:
        return _run(world, SLICES, None)[0]
    finally:
        RollingDigest.advance = original  # type: ignore[method-assign]


def every_step_world(world: World, out_dir: str) -> dict:
    out: dict = {
        "watch_clean": _watched_loop(world, None, batch=BATCH),
        "watch_flip": _watched_loop(world, 3),
        "watch_transient": _watched_loop(world, 5, slices=1, batch=4, transient=True),
    }
    clean, run = _run(world, 0, None, Path(out_dir) if world.is_main else None)
    out["clean"] = clean
    out["rotation"] = rotation = _rotation(run)
    full_cfg = base_config(world.world_size, STEPS)  # check_mode full, every step: the reference
    out["full_fingerprint"] = train(full_cfg, world, progress=False).final_fingerprint
    out["whole"] = _run(world, 1, 4)[0]
    flips = _flip_steps(rotation["flip_slice"])
    out["sliced"] = {t: _run(world, SLICES, t, steps=SLICED_STEPS)[0] for t in flips}
    out["stuck"] = _stuck_slice(world)
    return out


@pytest.fixture(scope="module")
def world_out(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("every-step")
    per_rank = run_distributed(every_step_world, WORLD, str(out_dir), timeout_s=60, deadline_s=240)
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


# ---------------------------------------------------------------------------------------------
# Without a world: the bound, the comparison of a batch, the settings.


def test_a_state_of_many_small_tensors_is_cut_into_slices_of_at_most_32_tensors_each():
    # Bytes alone would make this one slice (a few KiB); its cost is per tensor, so each step
    # takes a quarter of them. Mutant: slices counted by bytes only -> 1 slice of 100 tensors.
    model = torch.nn.Sequential(*[torch.nn.LayerNorm(4) for _ in range(50)])  # 100 tensors, 1.6 KiB
    digest = RollingDigest(model)
    assert digest.slices == 4 == -(-100 // SLICE_TENSORS)
    pieces = sorted(p.name for plan in digest.plan for p in plan)
    assert pieces == sorted(f"param/{name}" for name, _ in model.named_parameters())  # each tensor once
    assert all(len(plan) <= SLICE_TENSORS + 1 for plan in digest.plan)  # + 1: a tensor cut at a border
    assert RollingDigest(torch.nn.Sequential(*[torch.nn.LayerNorm(4) for _ in range(16)])).slices == 1
    assert RollingDigest(model, slices=1).slices == 1  # check_slices still decides when given


def test_the_bound_is_slices_plus_batch_checks():
    assert bound(SLICES, K) == {"digested_within_steps": SLICES, "reported_within_steps": SLICES + K}
    assert bound(5, 16, every=2) == {"digested_within_steps": 10, "reported_within_steps": 42}


def test_a_batch_is_judged_by_its_first_differing_digest_not_its_last():
    same = [bytes([i]) * 16 for i in range(4)]
    odd = list(same)
    odd[1] = b"\xff" * 16  # one check in the middle of the batch differs, the last agrees
    assert first_difference([b"".join(same), b"".join(same)]) is None
    assert first_difference([b"".join(same), b"".join(odd)]) == 1
    assert first_difference([b"".join(odd), b"".join(same), b"".join(same)]) == 1


def test_check_batch_must_be_a_positive_number_of_checks():
    assert load_config(None, []).check_batch == BATCH == 16
    with pytest.raises(ConfigError, match="check_batch"):
        load_config(None, ["check_batch=0"])
    import distshare

    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="batch=0"):
        distshare.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), mode="rolling", batch=0)


def test_the_run_report_reads_every_step_a_batched_verdict_covered(tmp_path):
    from distshare.report import replica_checks

    rows = [
        {"step": 3, "replicas_in_sync": True, "checked_steps": [0, 1, 2]},
        {"step": 6, "replicas_in_sync": False, "checked_steps": [3, 4, 5], "first_differing_step": 4},
        {"step": 7, "replicas_in_sync": True},  # a full check: its own step
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # The steps before the first differing one agreed; it and the ones after did not.
    checks = replica_checks(tmp_path / "metrics.jsonl")
    assert checks == {0: True, 1: True, 2: True, 3: True, 4: False, 5: False, 7: True}


# ---------------------------------------------------------------------------------------------
# Real 2-rank gloo runs.


def test_a_clean_run_checks_every_step_and_ends_with_the_full_fingerprint(world_out):
    per_rank, out_dir = world_out
    clean = per_rank[0]["clean"]
    assert clean["in_sync"] and clean["first_divergence"] is None
    # The same training as a full check at every step: the last check is a full one.
    assert clean["final_fingerprint"] == per_rank[0]["full_fingerprint"]
    account = clean["account"]
    # check_slices 0 (auto): 116 tensors once Adam has its state (29 parameters, and their
    # step, exp_avg, exp_avg_sq), at most SLICE_TENSORS a slice: 4 slices of a few KiB each.
    assert account["mode"] == "rolling" and account["slices"] == 4 and account["batch"] == K
    assert (account["digested_within_steps"], account["reported_within_steps"]) == (4, 4 + K)
    # A rolling digest of every step but the last (a full one): as many checks as the full mode
    # makes, in one gather per K steps and one for the partial batch at the end.
    assert account["rolling_checks"] == STEPS - 1 and clean["checks"] == STEPS
    assert account["gathers"] == -(-(STEPS - 1) // K)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    # Each judging row lists the steps whose states its verdict covers: batch i at step (i + 1) K,
    # and the last row the partial batch and its own step (its full check).
    covered = [(r["step"], r.get("checked_steps")) for r in rows if "replicas_in_sync" in r]
    batches = [(s, list(range(s - K, s))) for s in range(K, STEPS - 1, K)]
    tail = list(range(batches[-1][0], STEPS))
    assert covered == [*batches, (STEPS - 1, tail)]
    assert all(r["replicas_in_sync"] and "first_differing_step" not in r for r in rows if "replicas_in_sync" in r)
    assert account["last_rolling"]["state_step"] == STEPS - 2 and account["last_rolling"]["bytes"] > 0


def test_a_full_rotation_of_an_unchanged_state_gives_the_digest_taken_at_once(world_out):
    rotation = world_out[0][0]["rotation"]
    assert rotation["equal"] and rotation["tiled"]
    # The control: the flip changes the digest in the very advance that digests its slice.
    assert rotation["seen_in"] == rotation["flip_slice"]


def test_one_slice_catches_a_flipped_bit_in_the_next_steps_state(world_out):
    report = _report(world_out[0][0]["whole"])
    _assert_localized(report)
    # Flipped after step 4's check: in the state of step 5, whose batch (3, 4, 5) is judged at 6.
    assert (report.coverage["state_step"], report.step) == (5, 6)
    assert report.coverage["compared_steps"] == [3, 5] and report.coverage["batch"] == K


def test_sliced_batched_checks_catch_a_flipped_bit_within_the_stated_number_of_steps(world_out):
    per_rank = world_out[0]
    flip_slice = per_rank[0]["rotation"]["flip_slice"]
    reported_after = {}
    for flip_at, outcome in per_rank[0]["sliced"].items():
        report = _report(outcome)
        _assert_localized(report)
        account = outcome["account"]
        assert (account["digested_within_steps"], account["reported_within_steps"]) == (SLICES, SLICES + K)
        seen, reported = report.coverage["state_step"], report.step
        # The step whose digest first differed, not the batch's last (nor a later one), and the
        # step right after its batch; both within the bound.
        assert (seen, reported) == _expected(flip_at, flip_slice), report.summary()
        assert flip_at < seen <= flip_at + SLICES and reported <= flip_at + SLICES + K
        reported_after[flip_at] = reported - flip_at
        # Every rank reached the same verdict.
        assert per_rank[1]["sliced"][flip_at]["first_divergence"] == outcome["first_divergence"]
    # The phases reach the bound: the worst case is reported exactly SLICES + K steps after the flip.
    assert max(reported_after.values()) == SLICES + K, reported_after


def test_a_rank_whose_slice_never_advances_is_caught_in_the_first_batch(world_out):
    stuck = world_out[0][0]["stuck"]
    assert not stuck["in_sync"]
    report = _report(stuck)
    # Step 0 digests every slice on both ranks (the plan is rebuilt): they agree. At step 1
    # rank 0 digests slice 1 of 4 and the faulty rank slice 0 again: the digests differ.
    assert report.coverage["state_step"] == 1 and report.step == K
    # The state itself is identical: named by the slice whose digests differed, both ranks.
    assert list(report.differing) == ["extra/rolling/slice1"] and report.differing["extra/rolling/slice1"] == [0, 1]


def test_watch_in_a_users_loop_raises_within_the_bound(world_out):
    clean, flip = world_out[0][0]["watch_clean"], world_out[0][0]["watch_flip"]
    # The default batch is longer than the loop: every digest is compared by close()'s flush.
    assert clean["mode"] == "rolling" and clean["raised_at"] is None and clean["batch"] == BATCH
    assert clean["rolling_checks"] == 10 and clean["gathers"] == 1
    assert flip["cause"] == "corruption" and flip["slices"] == 2 and flip["batch"] == K
    # Flipped after step 3: in a digested slice by step 3 + 2, raised right after its batch.
    seen = flip["coverage"]["state_step"]
    assert 3 < seen <= 3 + flip["slices"] and flip["raised_at"] == (seen // K + 1) * K <= 3 + flip["slices"] + K


def test_a_digest_that_differs_at_one_step_in_the_middle_of_a_batch_is_caught(world_out):
    transient = world_out[0][0]["watch_transient"]
    # Only step 5's digest differs (batch 4..7: neither its first nor its last); judged at step 8.
    assert transient["raised_at"] == 8 and transient["coverage"]["state_step"] == 5
    assert transient["coverage"]["compared_steps"] == [4, 7]
    # The bit was flipped back before anything read it: the full check finds every tensor equal,
    # and the report names the slice whose digests differed.
    assert transient["differing"] == {"extra/rolling/slice0": [0, 1]}
