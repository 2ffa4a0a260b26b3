"""Claim: a checkpoint stores the whole training state losslessly (a resume continues bit for
bit), is written atomically, and names every damaged tensor: a flipped bit, a truncated file,
a tampered manifest. `distshare checksum` and `distshare compare` say the same on the command
line: exit 0 same, 1 different or damaged, 2 a missing path or not a checkpoint."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from distshare.cli import main
from distshare.distributed.spawn import run_distributed
from distshare.distributed.world import World
from distshare.integrity.checkpoint import (
    MANIFEST,
    MODEL_FILE,
    CheckpointCorrupted,
    compare_checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_run_checkpoint,
    verify_checkpoint,
)
from distshare.integrity.fingerprint import state_digest
from distshare.testing.faults import BIT_FLIP_TENSOR, base_config
from distshare.training import build_run, train_step


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(6, 4, generator=g)).pow(2).sum().backward()
        opt.step()


@pytest.fixture
def trained(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, 3, seed=1)
    path = tmp_path / "ckpt"
    save_checkpoint(path, model, opt, step=2, cfg={"note": "test"}, extra={"who": "fixture"})
    return path, model, opt


def test_roundtrip_is_lossless_and_resume_continues_bit_for_bit(trained):
    path, model, opt = trained
    fresh = _model()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    _train(fresh, fresh_opt, 1, seed=9)  # different state, overwritten by the load
    manifest = load_checkpoint(path, fresh, fresh_opt)
    assert manifest["step"] == 2 and manifest["extra"] == {"who": "fixture"} and manifest["config"] == {"note": "test"}
    assert {"torch", "safetensors", "python"} <= set(manifest["versions"])
    assert state_digest(fresh, fresh_opt) == state_digest(model, opt)  # params, buffers, Adam moments, steps
    _train(model, opt, 2, seed=5)
    _train(fresh, fresh_opt, 2, seed=5)
    assert state_digest(fresh, fresh_opt) == state_digest(model, opt)


def test_written_atomically_and_replaced_whole(trained):
    path, model, opt = trained
    first = json.loads((path / MANIFEST).read_text())["combined"]
    _train(model, opt, 1, seed=2)
    save_checkpoint(path, model, opt, step=3)
    assert json.loads((path / MANIFEST).read_text())["combined"] != first
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]  # no temporary left behind
    assert verify_checkpoint(path).ok


def test_a_crash_while_writing_leaves_the_old_checkpoint_whole(trained):
    path, model, opt = trained
    before = verify_checkpoint(path).combined

    def crash(written: str) -> None:  # the disk fills up after the model file was written
        if written.endswith("model.safetensors"):
            raise OSError("disk full")

    _train(model, opt, 1, seed=3)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, opt, step=3, after_file=crash)
    check = verify_checkpoint(path)
    assert check.ok and check.combined == before and check.step == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]


def test_an_unreadable_manifest_is_damage_not_a_usage_error(trained, capsys):
    path, _, _ = trained
    (path / MANIFEST).write_text('{"format": "distshare-checkpoint", "tensors": {')  # cut short
    code, out, err = _cli(capsys, "checksum", str(path))
    assert code == 1 and "manifest.json" in err and "Traceback" not in err


def _tensor_offsets(file: Path) -> dict[str, tuple[int, int]]:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    return {
        k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
        for k, v in header.items()
        if k != "__metadata__"
    }


def test_a_flipped_bit_is_named_by_tensor(trained):
    path, _, _ = trained
    file = path / MODEL_FILE
    begin, _ = _tensor_offsets(file)["3.weight"]
    raw = bytearray(file.read_bytes())
    raw[begin + 5] ^= 0x10
    file.write_bytes(bytes(raw))
    check = verify_checkpoint(path)
    assert list(check.problems) == ["model/3.weight"] and "bytes changed" in check.problems["model/3.weight"]
    before = _model().state_dict()
    victim = _model()
    with pytest.raises(CheckpointCorrupted, match="model/3.weight"):
        load_checkpoint(path, victim, torch.optim.AdamW(victim.parameters()))
    assert all(torch.equal(victim.state_dict()[k], v) for k, v in before.items())  # nothing loaded


def test_a_truncated_file_names_the_lost_tensors_and_verifies_the_rest(trained):
    path, _, _ = trained
    file = path / MODEL_FILE
    offsets = _tensor_offsets(file)
    cut = sorted(offsets.values())[-1][0] + 2  # inside the last tensor's bytes
    file.write_bytes(file.read_bytes()[:cut])
    check = verify_checkpoint(path)
    lost = {f"model/{name}" for name, (_, end) in offsets.items() if end > cut}
    assert lost and set(check.problems) == lost
    assert all("truncated" in why for why in check.problems.values())
    assert len(check.digests) == len(check.info) - len(check.problems)  # the intact ones were verified


def test_a_tampered_manifest_is_caught(trained):
    path, _, _ = trained
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["tensors"]["optim/0.weight/exp_avg"]["digest"] = "xxh3_128:" + "0" * 32
    (path / MANIFEST).write_text(json.dumps(manifest))
    problems = verify_checkpoint(path).problems
    assert set(problems) == {"optim/0.weight/exp_avg", MANIFEST}  # the tensor, and the combined digest


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_checksum_command(trained, capsys, tmp_path):
    path, _, _ = trained
    code, out, _ = _cli(capsys, "checksum", str(path))
    assert code == 0 and "model/0.weight" in out and "combined" in out and "distshare checksum: OK" in out
    code, out, _ = _cli(capsys, "checksum", str(path), "--json")
    result = json.loads(out)
    assert code == 0 and result["ok"] and result["checkpoints"][0]["combined"].startswith("xxh3_128:")
    # A bare safetensors file: digests only, and the same digests as in the checkpoint.
    code, out, _ = _cli(capsys, "checksum", str(path / MODEL_FILE), "--json")
    bare = json.loads(out)["checkpoints"][0]["tensors"]["0.weight"]["digest"]
    assert code == 0 and bare == result["checkpoints"][0]["tensors"]["model/0.weight"]["digest"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    for bad in ("missing-dir", "empty", "notes.txt"):
        code, out, err = _cli(capsys, "checksum", str(tmp_path / bad))
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_checksum_command_names_a_damaged_tensor(trained, capsys):
    path, _, _ = trained
    file = path / MODEL_FILE
    begin, _ = _tensor_offsets(file)["1.running_var"]
    raw = bytearray(file.read_bytes())
    raw[begin] ^= 1
    file.write_bytes(bytes(raw))
    code, out, _ = _cli(capsys, "checksum", str(path))
    assert code == 1 and "model/1.running_var" in out and "DAMAGED" in out and "FAILED" in out


def test_compare_command(trained, capsys, tmp_path):
    path, model, opt = trained
    same = tmp_path / "same"
    save_checkpoint(same, model, opt, step=2)
    code, out, _ = _cli(capsys, "compare", str(path), str(same))
    assert code == 0 and "OK" in out
    with torch.no_grad():
        model[0].weight[2, 1] += 0.5
    other = tmp_path / "other"
    save_checkpoint(other, model, opt, step=2)
    code, out, _ = _cli(capsys, "compare", str(path), str(other), "--json")
    result = json.loads(out)
    assert code == 1 and not result["ok"] and list(result["differing"]) == ["model/0.weight"]
    d = result["differing"]["model/0.weight"]
    assert d["differing"] == 1 and d["first_index"] == [2, 1] and d["max_abs_diff"] == pytest.approx(0.5, rel=1e-6)
    code, out, err = _cli(capsys, "compare", str(path), str(tmp_path / "nope"))
    assert code == 2 and "no such file" in err and "Traceback" not in err


def _ranks_checkpoint(world: World, root: str) -> None:
    run = build_run(base_config(world.world_size, 3), world)
    for step in range(3):
        train_step(run, step)
    if world.rank == 1:
        with torch.no_grad():
            dict(run.model.named_parameters())[BIT_FLIP_TENSOR].view(-1)[9] *= -1
    save_run_checkpoint(Path(root) / f"rank{world.rank}", run, step=2)


@pytest.mark.slow
def test_two_ranks_checkpoints_compare_down_to_the_element(tmp_path):
    run_distributed(_ranks_checkpoint, 2, str(tmp_path), timeout_s=60, deadline_s=120)
    manifest = json.loads((tmp_path / "rank1" / MANIFEST).read_text())
    assert manifest["extra"]["rank"] == 1 and manifest["position"]["next_step"] == 3
    assert manifest["config"]["plan"]["world_size"] == 2
    cmp = compare_checkpoints(tmp_path / "rank0", tmp_path / "rank1")
    assert list(cmp.differing) == [f"model/{BIT_FLIP_TENSOR}"]
    d = cmp.differing[f"model/{BIT_FLIP_TENSOR}"]
    assert d.differing == 1 and d.first_index == [0, 9] and d.mine == -d.reference


def test_cli_is_one_line_in_a_real_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "distshare", "compare", str(tmp_path / "a"), str(tmp_path / "b")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
