"""Sharded checkpoints reshard, and prove it: one logical state, saved at one layout, loaded at another.

The claim: a checkpoint saved by FSDP2 at 4 shards (every rank its own shard files, the manifest
the logical lsh128 digests) loads into FSDP2 at 2 shards, HSDP 2 x 2, a DDP replica and one
process with no process group, and every one of them holds the state that was live when it was
saved: the same `state_digest`. `distshare checksum` verifies the files and recomputes the
logical digests from the shards in one process.

Mutants that must flip it: a flipped bit in one shard file (checksum exit 1, naming the file
and the tensor; a load that skips the byte check is refused by the logical digests), a missing
shard file, a manifest whose digests were altered consistently (refused at load, any layout).
Worlds are the slow part: one 4-rank and one 2-rank spawn hold every distributed case.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from distshare.errors import VerificationFailed
from distshare.integrity.checkpoint import (
    CheckpointCorrupted,
    load_sharded_checkpoint,
    save_sharded_checkpoint,
    verify_checkpoint,
)
from distshare.integrity.checkpoint.format import meta_digest
from distshare.integrity.fingerprint import combined_fingerprint, state_digest
from distshare.integrity.logical import LOGICAL_ALGORITHM
from distshare.testing import run_distributed

LOSSES = torch.tensor([2.5, 1.25], dtype=torch.float64)  # a run's extra state, kept verbatim


def _model(seed: int = 0) -> nn.Module:
    # Odd widths: FSDP2 cuts rows unevenly across 4 and 2 shards (7 rows: 2, 2, 2, 1).
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 13), nn.LayerNorm(13), nn.ReLU(), nn.Linear(13, 5))


def _trained(model: nn.Module, lr: float = 1e-2) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 7, generator=g), torch.randn(8, 5, generator=g)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    return opt


def _fresh(model: nn.Module) -> torch.optim.Optimizer:
    """Another init and another learning rate: everything the load must overwrite."""
    return torch.optim.AdamW(model.parameters(), lr=0.5)


def _mesh(world, layout: str):
    from torch.distributed.device_mesh import init_device_mesh

    if layout == "hsdp":
        return init_device_mesh("cpu", (world.world_size // 2, 2), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh("cpu", (world.world_size,))


def _sharded(world, layout: str, seed: int) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _model(seed)
    fully_shard(model, mesh=_mesh(world, layout))
    return model


def _four_ranks(world, root: str) -> dict:
    """Save at FSDP2 x 4; load back as HSDP 2 x 2 and as DDP replicas in the same world."""
    from torch.nn.parallel import DistributedDataParallel

    model = _sharded(world, "fsdp", seed=0)
    opt = _trained(model)
    out = {"live": state_digest(model, opt)}
    manifest = save_sharded_checkpoint(Path(root) / "fsdp4", model, opt, step=0, state={"run/losses": LOSSES})
    out["manifest"] = manifest["state_digest"]
    hsdp = _sharded(world, "hsdp", seed=7)
    hsdp_opt = _fresh(hsdp)
    load_sharded_checkpoint(Path(root) / "fsdp4", hsdp, hsdp_opt)
    out["hsdp"] = state_digest(hsdp, hsdp_opt)
    ddp = DistributedDataParallel(_model(seed=8))
    ddp_opt = _fresh(ddp)
    kept: dict[str, torch.Tensor] = {}
    load_sharded_checkpoint(Path(root) / "fsdp4", ddp, ddp_opt, state=kept)
    out["ddp"] = state_digest(ddp, ddp_opt, algorithm=LOGICAL_ALGORITHM)
    out["ddp_losses"] = kept["run/losses"].tolist()
    out["lr"] = ddp_opt.param_groups[0]["lr"]
    # HSDP whose replica groups diverged (rank 3's shard, group 1): refused before anything is written.
    split = _sharded(world, "hsdp", seed=0)
    if world.rank == 3:
        with torch.no_grad():
            split[0].weight.to_local().view(torch.int32).reshape(-1)[0] ^= 1
    try:
        save_sharded_checkpoint(Path(root) / "split", split)
        out["split"] = None
    except VerificationFailed as exc:
        out["split"] = str(exc)
    return out


def _trained_run(world, steps: int, *overrides: str) -> str:
    """`distshare train --parallel fsdp` on this world (the default small model): its final logical state."""
    from distshare.config import load_config
    from distshare.training import train

    cfg = load_config(None, ["parallel=fsdp", f"plan.world_size={world.world_size}", f"steps={steps}", *overrides])
    kept = []
    train(cfg, world, progress=False, on_step=lambda run, step: kept.append(run) if step == steps - 1 else None)
    return state_digest(kept[-1].model, kept[-1].optimizer)


def _two_ranks(world, root: str) -> dict:
    """Load the 4-shard checkpoint at 2 shards; a consistently edited manifest is refused; and the
    training loop checkpoints an FSDP run sharded and resumes from it bit for bit."""
    run_dir = f"checkpoint.dir={Path(root) / 'run'}"
    out = {
        "interrupted": _trained_run(world, 2, run_dir, "checkpoint.every=2"),
        "resumed": _trained_run(world, 3, run_dir, f"checkpoint.resume={Path(root) / 'run'}"),
        "straight": _trained_run(world, 3),
    }
    model = _sharded(world, "fsdp", seed=3)
    opt = _fresh(model)
    load_sharded_checkpoint(Path(root) / "fsdp4", model, opt)
    out["fsdp2"] = state_digest(model, opt)
    other = _sharded(world, "fsdp", seed=3)
    try:
        load_sharded_checkpoint(Path(root) / "edited", other, _fresh(other))
        out["edited"] = None
    except CheckpointCorrupted as exc:
        out["edited"] = str(exc)
    return out


def _edit_consistently(src: Path, dst: Path, tensor: str) -> None:
    """A copy whose manifest claims another digest for `tensor`, with every combined digest
    recomputed to agree: only the stored state itself can tell."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["tensors"][tensor]["digest"] = "lsh128:" + "0" * 32
    live = {n: e["digest"] for n, e in manifest["tensors"].items() if e["kind"] != "state"}
    manifest["state_digest"] = combined_fingerprint(live)
    manifest["meta_digest"] = meta_digest(manifest)
    (dst / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> tuple[Path, dict, dict]:
    root = tmp_path_factory.mktemp("sharded")
    four = run_distributed(_four_ranks, 4, str(root))
    _edit_consistently(root / "fsdp4", root / "edited", "param/0.weight")
    two = run_distributed(_two_ranks, 2, str(root))
    return root, four, two


def _one_process(path: Path, **kw) -> str:
    model = _model(seed=9)
    opt = _fresh(model)
    with warnings.catch_warnings():  # DCP says it assumes one process: that is the point here
        warnings.simplefilter("ignore", UserWarning)
        load_sharded_checkpoint(path, model, opt, **kw)
    return state_digest(model, opt, algorithm=LOGICAL_ALGORITHM)


@pytest.mark.slow
def test_saved_at_four_shards_the_state_loads_unchanged_at_two_hsdp_ddp_and_one_process(worlds):
    root, four, two = worlds
    saved = four[0]["live"]
    assert all(r["live"] == saved and r["manifest"] == saved for r in four)  # the manifest records the live state
    assert all(r["hsdp"] == saved for r in four)
    assert all(r["ddp"] == saved for r in four)
    assert all(r["fsdp2"] == saved for r in two)
    assert _one_process(root / "fsdp4") == saved
    # The run's own state and the hyperparameters came back too (lr 0.5 was overwritten).
    assert four[0]["ddp_losses"] == LOSSES.tolist() and four[0]["lr"] == 1e-2
    # HSDP replica groups that disagree are not saved (a checkpoint would mix them).
    assert all("replica groups hold different values of 1 tensor(s) (param/0.weight)" in r["split"] for r in four)
    assert not (root / "split").exists()
    # And the checkpoint records where it came from.
    layout = json.loads((root / "fsdp4" / "manifest.json").read_text())["layout"]
    assert layout["parallel"] == "fsdp" and layout["mesh_shape"] == [4]
    assert layout["placements"]["param/0.weight"] == ["Shard(dim=0)"]


@pytest.mark.slow
def test_a_consistently_edited_manifest_is_refused_at_any_layout(worlds):
    root, _, two = worlds
    for r in two:
        assert r["edited"] is not None and "param/0.weight" in r["edited"]
    with pytest.raises(CheckpointCorrupted, match=r"param/0\.weight: loaded lsh128:"):
        _one_process(root / "edited")
    # The bytes are intact: only the logical digests recomputed from the shards can tell.
    check = verify_checkpoint(root / "edited")
    assert set(check.problems) == {"param/0.weight"}


def _flip_a_value_bit(path: Path) -> str:
    """Flip the low bit of one stored float of param/0.weight (its first row, rank 0's shard)."""
    from distshare.integrity.checkpoint.sharded_verify import read_sharded_manifest, stored_tensors

    whole = stored_tensors(path, read_sharded_manifest(path))["param/0.weight"]
    needle = whole[0, :3].numpy().tobytes()
    f = path / "__0_0.distcp"
    data = bytearray(f.read_bytes())
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0
    data[at] ^= 1
    f.write_bytes(bytes(data))
    return f.name


@pytest.mark.slow
def test_checksum_verifies_a_sharded_checkpoint_and_names_a_flipped_bit_by_file_and_tensor(worlds, tmp_path, capsys):
    from distshare.cli import main

    root, _, _ = worlds
    assert main(["checksum", str(root / "fsdp4")]) == 0
    out = capsys.readouterr().out
    assert "logical digests recomputed from the shards" in out and "saved from fsdp on 4 rank(s)" in out
    flipped = tmp_path / "flipped"
    shutil.copytree(root / "fsdp4", flipped)
    name = _flip_a_value_bit(flipped)
    assert main(["checksum", str(flipped)]) == 1
    out = capsys.readouterr().out
    assert f"{name}" in out and "param/0.weight" in out and "DAMAGED" in out
    # A load that skips the byte check still refuses: the logical digest of the loaded tensor differs.
    with pytest.raises(CheckpointCorrupted, match=r"param/0\.weight: loaded"):
        _one_process(flipped, verify_bytes=False)
    with pytest.raises(CheckpointCorrupted, match=r"__0_0\.distcp"):
        _one_process(flipped)


@pytest.mark.slow
def test_a_missing_shard_file_is_named_with_the_tensors_it_held(worlds, tmp_path, capsys):
    from distshare.cli import main

    root, _, _ = worlds
    missing = tmp_path / "missing"
    shutil.copytree(root / "fsdp4", missing)
    (missing / "__3_0.distcp").unlink()
    assert main(["checksum", "--json", str(missing)]) == 1
    report = json.loads(capsys.readouterr().out)["checkpoints"][0]
    assert "missing" in report["problems"]["__3_0.distcp"]
    assert "__3_0.distcp, which is missing" in report["problems"]["param/0.weight"]


@pytest.mark.slow
def test_an_fsdp_training_run_checkpoints_sharded_and_resumes_bit_for_bit(worlds, capsys):
    from distshare.cli import main

    root, _, two = worlds
    r = two[0]
    # Steps 0..1, checkpointed; then 2 from the checkpoint == steps 0..2 in one go.
    assert r["resumed"] == r["straight"] != r["interrupted"]
    assert main(["checksum", str(root / "run" / "step-000002")]) == 0
    out = capsys.readouterr().out
    assert "saved from fsdp on 2 rank(s)" in out and r["interrupted"] in out  # the saved run's live state digest
