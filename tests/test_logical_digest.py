"""Logical digests (lsh128): one digest per logical tensor, whatever the layout holding it.

The claim: the same state gives the same `state_digest(..., algorithm="lsh128")` in one
process, a DDP replica, FSDP2 at 2 and 4 shards and HSDP 2 x 2 — computed from shards with
one all-gather of two integers per tensor, never the tensor. Mutants that must flip it: one
flipped bit in one element of one shard, two elements swapped (a position-blind sum would
miss it), replica groups that started from different weights (allenai/OLMo-core#319).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distshare.integrity.fingerprint import (
    combined_fingerprint,
    fingerprint,
    fingerprint_many,
    fingerprint_state,
    state_digest,
)
from distshare.integrity.logical import LOGICAL_ALGORITHM, logical_fingerprints
from distshare.integrity.state import named_state_tensors
from distshare.testing import run_distributed


def _model(seed: int = 0) -> nn.Module:
    # Odd widths: FSDP2 cuts rows unevenly, and a float32 row of 7 elements ends mid-word.
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 13), nn.LayerNorm(13), nn.ReLU(), nn.Linear(13, 5)).to(torch.float32)


def _trained(model: nn.Module) -> torch.optim.Optimizer:
    """One AdamW step on a fixed batch (the same on every rank): optimizer state to digest too."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 7, generator=g), torch.randn(8, 5, generator=g)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    return opt


def _single_process_init() -> dict[str, str]:
    return fingerprint_state(_model(), algorithm=LOGICAL_ALGORITHM)


def _sharded(world, layout: str, mutant: str | None = None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if layout == "fsdp":
        mesh = init_device_mesh("cpu", (world.world_size,))
    else:
        mesh = init_device_mesh("cpu", (world.world_size // 2, 2), mesh_dim_names=("replicate", "shard"))
    # The OLMo-core bug: each rank builds the model under its own seed; FSDP2 never broadcasts.
    model = _model(seed=world.rank if mutant == "per_rank_seed" else 0)
    fully_shard(model, mesh=mesh)
    if mutant == "flipped_bit" and world.rank == world.world_size - 1:
        with torch.no_grad():
            local = model[0].weight.to_local()
            local.view(torch.int32).reshape(-1)[-1] ^= 1  # the last mantissa bit of one element
    if mutant == "swapped" and world.rank == 0:
        with torch.no_grad():
            local = model[0].weight.to_local()
            a, b = local[0, 0].clone(), local[0, 1].clone()
            local[0, 0], local[0, 1] = b, a
    init = fingerprint_state(model)
    _, groups = logical_fingerprints({"w": model[0].weight}, all_groups=True)
    if mutant:
        return init, groups["w"]
    opt = _trained(model)
    # The same state gathered whole (what one process holding it would digest): a test-only
    # all-gather, the very thing the logical digest avoids.
    gathered = {
        name: t.full_tensor() if hasattr(t, "full_tensor") else t
        for name, t in named_state_tensors(model, opt, shards=False)
    }
    whole = fingerprint_many(gathered, LOGICAL_ALGORITHM)
    return (
        init,
        fingerprint_state(model, opt),
        whole,
        combined_fingerprint(whole),
        state_digest(model, opt),
        groups["w"],
    )


def test_logical_digests_tell_dtype_shape_bits_and_positions_apart():
    t = torch.tensor([1.0, 2.0, 3.0])
    d = fingerprint(t, LOGICAL_ALGORITHM)
    assert d.startswith("lsh128:") and d == fingerprint(t.clone(), LOGICAL_ALGORITHM)
    assert fingerprint(t.flip(0), LOGICAL_ALGORITHM) != d  # the same elements, other positions
    assert fingerprint(t.double(), LOGICAL_ALGORITHM) != d
    assert fingerprint(t.reshape(3, 1), LOGICAL_ALGORITHM) != d
    flipped = t.clone()
    flipped.view(torch.int32)[1] ^= 1
    assert fingerprint(flipped, LOGICAL_ALGORITHM) != d
    rows = torch.arange(12.0).reshape(4, 3)
    assert fingerprint(rows.flip(0), LOGICAL_ALGORITHM) != fingerprint(rows, LOGICAL_ALGORITHM)  # rows swapped
    assert fingerprint(rows.reshape(2, 6), LOGICAL_ALGORITHM) != fingerprint(rows, LOGICAL_ALGORITHM)
    assert fingerprint(torch.zeros(5, 0), LOGICAL_ALGORITHM) != fingerprint(torch.zeros(0, 5), LOGICAL_ALGORITHM)
    for dtype in (torch.bfloat16, torch.float16, torch.int8, torch.bool, torch.int64):
        assert fingerprint(t.to(dtype), LOGICAL_ALGORITHM).startswith("lsh128:")
    # -0.0 and 0.0 are different bits, so a different state (a float sum would call them equal).
    assert fingerprint(torch.tensor([-0.0]), LOGICAL_ALGORITHM) != fingerprint(torch.tensor([0.0]), LOGICAL_ALGORITHM)


def _every_layout(world) -> dict:
    """All the sharded runs one world can hold, in one spawn (worlds are the slow part)."""
    out = {"fsdp": _sharded(world, "fsdp")}
    if world.world_size == 4:
        out["hsdp"] = _sharded(world, "hsdp")
        for mutant in ("flipped_bit", "swapped", "per_rank_seed"):
            out[mutant] = _sharded(world, "hsdp", mutant)
    return out


@pytest.fixture(scope="module")
def four_ranks() -> list[dict]:
    return run_distributed(_every_layout, 4)


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_distributed(_every_layout, 2)


# fsdp2 (one 2-rank world, about 5 s) is the quick loop's FSDP case; the 4-rank world is slow.
@pytest.mark.parametrize(
    "layout", ["fsdp2", pytest.param("fsdp4", marks=pytest.mark.slow), pytest.param("hsdp2x2", marks=pytest.mark.slow)]
)
def test_one_state_has_one_logical_digest_under_every_layout(layout, request):
    results = [
        r["fsdp" if layout.startswith("fsdp") else "hsdp"]
        for r in request.getfixturevalue("two_ranks" if layout == "fsdp2" else "four_ranks")
    ]
    init = _single_process_init()
    for rank_init, from_shards, whole, whole_state, state, groups in results:
        # Built under the shared seed, the sharded model holds one process's init, bit for bit.
        assert rank_init == init
        # After a step: each logical digest from shards equals the digest of the gathered
        # tensor (parameters, Adam moments, step counts, hyperparameters), and so does the state's.
        assert from_shards == whole, {k for k in whole if whole[k] != from_shards.get(k)}
        assert state == whole_state
        assert len(set(groups.values())) == 1  # HSDP: both replica groups hold the same tensor
    assert len({r[4] for r in results}) == 1


@pytest.mark.slow
@pytest.mark.parametrize("mutant", ["flipped_bit", "swapped", "per_rank_seed"])
def test_a_changed_shard_changes_its_replica_groups_logical_digest(mutant, four_ranks):
    init = _single_process_init()
    results = [r[mutant] for r in four_ranks]
    digests = [r[0]["param/0.weight"] for r in results]
    if mutant == "per_rank_seed":
        # Every rank initialized its own tensor: no replica group holds the shared init, and the
        # two groups disagree with each other (what compare_replicas diagnoses as init_mismatch).
        assert all(d != init["param/0.weight"] for d in digests)
        assert len(set(results[0][1].values())) == 2
    else:
        # Rank 3 (group 1) flipped a bit / rank 0 (group 0) swapped two elements: that rank's
        # replica group gets another digest; the other group still matches one process.
        culprit_group = {"flipped_bit": 1, "swapped": 0}[mutant]
        by_group = results[0][1]
        assert by_group[(culprit_group,)] != init["param/0.weight"]
        assert by_group[(1 - culprit_group,)] == init["param/0.weight"]
        assert len({digests[r] for r in (2 * culprit_group, 2 * culprit_group + 1)}) == 1
