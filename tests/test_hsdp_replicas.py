"""Claim: one logical parameter set, sharded, is checkable like a replicated one.

Under HSDP (FSDP2's `fully_shard` on a replicate x shard mesh) `compare_replicas`,
`assert_replicas_in_sync` and `distshare.watch` need no group: they read the mesh from the
model's DTensors and compare each rank's shard with the same shard in the other replica
groups (the plain tensors, step counts and hyperparameters across every rank). The
OLMo-core bug (allenai/OLMo-core#319: per-rank init seeds, and FSDP2 never broadcasts
initial weights) is caught at the first check by all three and by the init check, diagnosed
`init_mismatch` with its fix; the fixed code raises no alarm. A flipped bit in one shard of
one replica group is localized to (replica group, shard, tensor, element of the logical
tensor). Under pure FSDP no shard has a copy: the report says so and counts none as checked,
and only the init check against a digest computed in one process can catch a wrong init.

One spawned world of 4 ranks (2 replica groups x 2 shards) runs everything (worlds are the slow part).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distshare.distributed.spawn import run_distributed
from distshare.integrity.fingerprint import fingerprint_state, state_digest
from distshare.integrity.replicas import ReplicaReport
from distshare.testing import (
    InitMismatchError,
    ReplicaDivergenceError,
    assert_replicas_in_sync,
    assert_sharded_init,
    check_sharded_init,
    compare_replicas,
)
from distshare.testing.divergences import BASELINE, SHARDED, STEPS, _mlp, hsdp_model, run_hsdp
from distshare.testing.selftest import diagnosis_rows_of

pytestmark = [pytest.mark.faults, pytest.mark.slow]  # spawns ranks that diverge on purpose

FLIP_RANK = 3  # mesh coordinate (1, 1): replica group 1, shard 1
FLIP_LOCAL = (2, 3)  # the element of rank 3's shard of 0.weight ([16, 4], cut in rows 0-7 and 8-15)
FLIP_LOGICAL = [8 + 2, 3]  # ... in the logical tensor
FLIP_BIT = 20


def _step(model: nn.Module, opt: torch.optim.Optimizer, rank: int) -> None:
    g = torch.Generator().manual_seed(100 + rank)
    opt.zero_grad()
    nn.functional.mse_loss(model(torch.randn(8, 4, generator=g)), torch.randn(8, 2, generator=g)).backward()
    opt.step()


def _error(fn, *args, **kwargs) -> str | None:
    try:
        fn(*args, **kwargs)
    except (ReplicaDivergenceError, InitMismatchError) as exc:
        return str(exc)
    return None


def _flipped_bit(world) -> dict:
    """The fixed model, one step, then one bit of rank 3's shard flips (silent data corruption)."""
    model = hsdp_model(world, fixed=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _step(model, opt, world.rank)
    before = compare_replicas(model, opt, step=0)
    if world.rank == FLIP_RANK:
        with torch.no_grad():
            model[0].weight.to_local().view(torch.int32)[FLIP_LOCAL] ^= 1 << FLIP_BIT
    after = compare_replicas(model, opt, step=0)
    return {"before": before, "after": after, "message": _error(assert_replicas_in_sync, model, opt, step=0)}


def _layout_dependent(world) -> nn.Module:
    """The shared seed, but an init that draws per shard: every replica group alike, the logical
    tensor not what one process builds from the seed (it depends on the number of shards)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _mlp(seed=0)
    fully_shard(model, mesh=init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().uniform_(-0.5, 0.5)  # the shard drawn on its own: shard 1 repeats shard 0's draws
    return model


def _fsdp(world, seed_per_rank: bool) -> dict:
    """Pure FSDP over the 4 ranks: every shard held once."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _mlp(seed=1 + world.rank if seed_per_rank else 0)
    fully_shard(model, mesh=init_device_mesh("cpu", (world.world_size,), mesh_dim_names=("shard",)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    expected = state_digest(_mlp(seed=0), algorithm="lsh128")
    init = check_sharded_init(model, expected=expected)
    _step(model, opt, world.rank)
    return {"report": compare_replicas(model, opt, step=0), "init": init}


def _hsdp_world(world) -> dict:
    out: dict = {"outcomes": run_hsdp(world)}  # the reproduction, bug then fixed, by compare and by watch
    # The init check, on the same user code; the expected init computed in this process alone.
    reference = _mlp(seed=0)
    expected = state_digest(reference, algorithm="lsh128")
    per_tensor = fingerprint_state(reference, algorithm="lsh128")
    bug, fixed = hsdp_model(world, fixed=False), hsdp_model(world, fixed=True)
    out["init_bug"] = check_sharded_init(bug)
    out["init_bug_message"] = _error(assert_sharded_init, bug)
    out["init_fixed"] = assert_sharded_init(fixed, expected=expected)
    out["init_fixed_mapping"] = check_sharded_init(fixed, expected=per_tensor)
    layout_dependent = _layout_dependent(world)
    out["init_layout"] = check_sharded_init(layout_dependent)
    out["init_layout_expected"] = check_sharded_init(layout_dependent, expected=per_tensor)
    out["init_layout_message"] = _error(assert_sharded_init, layout_dependent, expected=expected)
    # The explicit group API still compares shard against shard across the group it is given.
    out["explicit"] = compare_replicas(bug, group=bug[0].weight.device_mesh.get_group("replicate"))
    out["assert_bug"] = _error(assert_replicas_in_sync, hsdp_model(world, fixed=False))
    out["flip"] = _flipped_bit(world)
    out["fsdp"] = _fsdp(world, seed_per_rank=False)
    out["fsdp_seed_per_rank"] = _fsdp(world, seed_per_rank=True)
    return out


@pytest.fixture(scope="module")
def hsdp() -> list[dict]:
    return run_distributed(_hsdp_world, 4, timeout_s=60, deadline_s=300)


def _outcome(results: dict, fixed: bool, checker: str):
    return next(o for o in results["outcomes"] if o.fixed == fixed and o.checker == checker)


def test_the_selftests_rows_name_the_cause_and_pass_the_fix(hsdp):
    # `distshare selftest`'s diagnosis group, its HSDP part, built from this module's world.
    rows = diagnosis_rows_of(hsdp[0]["outcomes"])
    assert len(rows) == 2 * len(SHARDED) * 2  # bug and fix, by compare and by watch
    assert all(r.caught for r in rows), [r for r in rows if not r.caught]


@pytest.mark.parametrize("checker", ["compare", "watch"])
def test_replica_groups_started_apart_are_caught_at_the_start_and_the_fix_is_clean(hsdp, checker):
    """compare_replicas(model, opt) and distshare.watch(model, opt), no group passed."""
    for results in hsdp:
        bug = _outcome(results, False, checker)
        assert bug.detected_at == BASELINE, bug.report.summary() if bug.report else "never detected"
        report = bug.report
        assert report.diagnosis.cause == SHARDED[bug.name].cause == "init_mismatch"
        assert set(report.differing) == {f"param/{n}" for n in ("0.weight", "0.bias", "2.weight", "2.bias")}
        # Each shard against its copy in the other replica group: no majority of 2, all 4 ranks named.
        assert all(ranks == [0, 1, 2, 3] for ranks in report.differing.values())
        assert report.layout["kind"] == "hsdp" and report.layout["replica_groups"] == 2
        text = report.summary()
        assert "fully_shard never broadcasts" in text and "allenai/OLMo-core#319" in text
        assert "build the model under the shared seed before fully_shard" in text and "init_sync" not in text
        fixed = _outcome(results, True, checker)
        assert fixed.report is None and fixed.checks == STEPS + 1
    # Every rank ends with the same report, each shard localized in the logical tensor.
    first = _outcome(hsdp[0], False, checker).report
    assert all(_outcome(r, False, checker).report.to_dict() == first.to_dict() for r in hsdp)
    sites = {(s.shard[0], s.replica_group[0], s.offset[0]) for s in first.sites["param/0.weight"]}
    assert sites == {(0, 1, 0), (1, 1, 8)}  # each shard's copy in replica group 1, at its offset


def test_a_clean_hsdp_check_says_what_it_compared(hsdp):
    report: ReplicaReport = hsdp[0]["flip"]["before"]
    assert report.in_sync and report.identical
    lay = report.layout
    # 4 parameters + 8 Adam moments sharded; step counts and hyperparameters replicated.
    assert (lay["compared"], lay["held_once"]) == (12, 0) and lay["replicated"] > 0
    assert report.summary().startswith("HSDP mesh 2 x 2 (replicate, shard): 12 sharded tensors: each shard identical")
    assert "replicated tensors identical across 4 ranks" in report.summary()


def test_a_flipped_bit_is_localized_to_replica_group_shard_tensor_and_logical_element(hsdp):
    for results in hsdp:
        report = results["flip"]["after"]
        assert report.differing == {"param/0.weight": [1, 3]}  # shard 1's two copies: ranks 1 and 3
        (d,) = report.elements["param/0.weight"]
        (site,) = report.sites["param/0.weight"]
        assert (d.rank, d.reference_rank, d.differing) == (FLIP_RANK, 1, 1)
        assert d.first_index == FLIP_LOGICAL and site.local_index == list(FLIP_LOCAL)
        assert (site.replica_group, site.reference_group, site.shard, site.shards) == ([1], [0], [1], 2)
        assert site.offset == [8, 0] and site.shape == [16, 4]
        assert d.mine != d.reference
        assert report.diagnosis.cause == "corruption"
        message = results["flip"]["message"]
        assert "shard 1 of 2, replica group 1 (rank 3) vs replica group 0 (rank 1)" in message
        assert "1 of 32 element(s) differ, first at logical [10, 3]" in message and "[2, 3] in the shard" in message
        # Both values, in the text and in the JSON form.
        assert f"group 0 {d.reference:.6g}" in message or "group 0 " in message
        as_dict = report.to_dict()
        assert as_dict["sites"]["param/0.weight"][0]["replica_group"] == [1]
        assert as_dict["elements"]["param/0.weight"][0]["first_index"] == FLIP_LOGICAL
        assert ReplicaReport.from_dict(as_dict).to_dict() == as_dict


def test_explicit_replicate_group_still_works(hsdp):
    for rank, results in enumerate(hsdp):
        report = results["explicit"]
        assert report.world_size == 2 and report.diagnosis.cause == "init_mismatch"
        assert "fully_shard never broadcasts" in report.summary()
        # Ranks there are the group's; the text names the world's ranks of this shard's two copies.
        shard = rank % 2
        assert f"shard {shard} of 2, replica group 1 (rank {2 + shard}) vs replica group 0 (rank {shard})" in (
            report.summary()
        )
        assert results["assert_bug"] is not None and results["assert_bug"].startswith("replicas differ")


def test_the_init_check_catches_the_olmo_core_bug_and_passes_the_fix(hsdp):
    for results in hsdp:
        bug = results["init_bug"]
        assert not bug.ok and bug.diagnosis.cause == "init_mismatch"
        assert [c.label for c in bug.copies] == ["replica group 0 (ranks 0, 1)", "replica group 1 (ranks 2, 3)"]
        assert set(bug.differing) == {f"param/{n}" for n in ("0.weight", "0.bias", "2.weight", "2.bias")}
        message = results["init_bug_message"]
        assert message.startswith("init_mismatch: the replica groups hold different initial weights: 4 of 4")
        assert "between replica group 0 (ranks 0, 1) and replica group 1 (ranks 2, 3)" in message
        assert "Fix: build the model under the shared seed before fully_shard" in message
        fixed = results["init_fixed"]
        assert fixed.ok and fixed.expected == fixed.copies[0].digest
        assert fixed.summary().startswith("hsdp mesh 2 x 2 (replicate, shard): every replica group holds one")
        assert results["init_fixed_mapping"].ok


def test_the_init_check_against_one_process_catches_a_layout_dependent_init(hsdp):
    for results in hsdp:
        alike = results["init_layout"]
        assert alike.ok  # the replica groups agree with each other: only the expected digest can tell
        wrong = results["init_layout_expected"]
        assert not wrong.ok and wrong.unexpected == ["replica groups 0, 1 (ranks 0, 1, 2, 3)"]
        assert wrong.unexpected_tensors == [f"param/{n}" for n in ("0.bias", "0.weight", "2.bias", "2.weight")]
        message = results["init_layout_message"]
        assert "not the expected one" in message and "depends on the layout" in message


def test_pure_fsdp_says_its_shards_have_no_copy_and_counts_none_as_checked(hsdp):
    for results in hsdp:
        for name in ("fsdp", "fsdp_seed_per_rank"):
            report = results[name]["report"]
            lay = report.layout
            assert report.in_sync and (lay["kind"], lay["compared"], lay["held_once"]) == ("fsdp", 0, 12)
            text = report.summary()
            assert text.startswith("FSDP mesh 4 (shard): 12 tensors sharded once: nothing to compare")
            assert "replicated tensors identical across 4 ranks" in text and "each shard identical" not in text
        assert results["fsdp"]["init"].ok and "nothing to compare them with" in results["fsdp"]["init"].summary()
        # Per-rank seeds under FSDP: no replica check can see it; the init check against one process can.
        per_rank = results["fsdp_seed_per_rank"]["init"]
        assert not per_rank.ok and per_rank.diagnosis.cause == "init_mismatch"


def test_the_init_check_refuses_digests_of_another_algorithm():
    with pytest.raises(ValueError, match="lsh128"):
        check_sharded_init(_mlp(), expected=fingerprint_state(_mlp()))
    assert check_sharded_init(_mlp(), expected=state_digest(_mlp(), algorithm="lsh128")).ok
    report = check_sharded_init(_mlp(seed=1), expected=state_digest(_mlp(), algorithm="lsh128"))
    assert not report.ok and report.diagnosis.cause == "init_mismatch"
    assert math.isfinite(report.tensors)
