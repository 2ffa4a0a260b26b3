"""Claim: a resumed run is the run that never stopped. 20 steps straight and 10 steps, a
checkpoint, and 10 more end with the same final fingerprint, the same losses and the same
sample accounting; a damaged newest checkpoint is passed over (and said so); a save cut
short never leaves a checkpoint that verifies; and a checkpoint that is not a state of this
run (another world size, model, plan, data set) is refused in one line with the reason."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from small_split import SMALL_SPLIT

from distshare.cli import main
from distshare.config import load_config
from distshare.data import build_dataset
from distshare.errors import UsageError
from distshare.integrity.checkpoint import (
    MANIFEST,
    MODEL_FILE,
    STATE_FILE,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from distshare.integrity.resume import Found, list_checkpoints, refuse_incompatible, rng_state, set_rng_state
from distshare.models import build_model
from distshare.testing.faults import FAULT_EXIT_CODE, fault_env

ROOT = Path(__file__).resolve().parents[1]

# A real split on 2 ranks (G = 16 = W 2 x k 2 x b 4), float64, Adam's moments in play.
RUN = [
    *SMALL_SPLIT,
    "--check-every",
    "5",
    "--no-progress",
    "--json",
]


def _train(out: Path, *args: str) -> tuple[int, dict | None, str]:
    """`distshare train` in this process (its ranks are spawned): exit code, result, stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = main(["train", *RUN, "--out", str(out), *args])
    lines = [line for line in stdout.getvalue().splitlines() if line.startswith("{")]
    return code, (json.loads(lines[-1]) if lines else None), stderr.getvalue()


def _refused(tmp_path: Path, *args: str) -> str:
    code, result, err = _train(tmp_path / "refused", *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and result is None, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory) -> dict:
    """10 steps on 2 spawned ranks, a checkpoint every 2, the newest 2 kept: `pristine`, a copy of
    those checkpoints that no later run touches, is what the refusals and the damage resume from."""
    tmp = tmp_path_factory.mktemp("resume")
    ck = tmp / "ckpt"
    first = _train(
        tmp / "first",
        "--nproc",
        "2",
        "--steps",
        "10",
        "--checkpoint-dir",
        str(ck),
        "--checkpoint-every",
        "2",
        "--keep-checkpoints",
        "2",
    )
    kept = sorted(p.name for _, p in list_checkpoints(ck))
    pristine = tmp / "pristine"
    shutil.copytree(ck, pristine)  # before the resumed run adds its own checkpoints
    return {"tmp": tmp, "ckpt": ck, "pristine": pristine, "kept": kept, "first": first}


@pytest.fixture(scope="module")
def two_ranks(checkpointed, twenty_steps_straight) -> dict:
    """`checkpointed`, plus 20 steps straight on 2 spawned ranks (conftest's run of RUN, shared
    with test_restart.py) and 10 more steps resumed from `checkpointed`'s newest checkpoint."""
    ck, out = checkpointed["ckpt"], checkpointed["tmp"] / "resumed"
    resumed = _train(out, "--nproc", "2", "--steps", "20", "--checkpoint-dir", str(ck), "--resume", str(ck))
    return {**checkpointed, "straight": twenty_steps_straight, "resumed": resumed}


@pytest.mark.slow
def test_ten_plus_ten_steps_equal_twenty_straight_on_two_spawned_ranks(two_ranks):
    straight = two_ranks["straight"]  # exit code 0, or the fixture fails
    code_f, first, err_f = two_ranks["first"]
    code_r, resumed, err_r = two_ranks["resumed"]
    assert code_f == code_r == 0, (err_f, err_r)
    assert straight["world_size"] == resumed["world_size"] == 2
    assert resumed["resume"]["from_step"] == 10 and resumed["resume"]["restart"] == 0
    assert resumed["final_fingerprint"] == straight["final_fingerprint"]
    assert first["final_fingerprint"] != straight["final_fingerprint"]  # 10 steps are not 20
    assert resumed["losses"] == straight["losses"]  # every step once, bit for bit
    assert resumed["accounting"]["ok"] and resumed["accounting"]["steps"] == 20
    assert resumed["replica_checks"] == straight["replica_checks"] == 4
    rows = [json.loads(line) for line in (two_ranks["tmp"] / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(20))  # no step lost, none repeated
    assert [r["loss"] for r in rows] == straight["losses"]
    assert "resumed on request: continued from step 10" in (two_ranks["tmp"] / "resumed" / "report.md").read_text()


@pytest.mark.slow
def test_exact_mode_resumes_bitwise_and_equals_one_process(tmp_path):
    # Exact mode's sum does not depend on the split: a resumed 2-rank run also ends on the
    # fingerprint of one process trained straight through.
    ck = tmp_path / "ck"
    code_1, one, err_1 = _train(tmp_path / "one", "--sync", "exact", "--steps", "8")
    code_a, _, err_a = _train(
        tmp_path / "a", "--sync", "exact", "--nproc", "2", "--steps", "4", "--checkpoint-dir", str(ck)
    )
    code_b, resumed, err_b = _train(
        tmp_path / "b", "--sync", "exact", "--nproc", "2", "--steps", "8", "--resume", str(ck)
    )
    assert code_1 == code_a == code_b == 0, (err_1, err_a, err_b)
    assert resumed["resume"]["from_step"] == 4
    assert resumed["final_fingerprint"] == one["final_fingerprint"]


def test_only_the_newest_k_checkpoints_are_kept(checkpointed):
    assert checkpointed["kept"] == ["step-000008", "step-000010"]  # every 2 steps, keep 2


def test_every_ranks_rng_state_is_stored_and_digested(checkpointed):
    path = checkpointed["pristine"] / "step-000010"
    manifest = json.loads((path / MANIFEST).read_text())
    rng = {name for name, e in manifest["tensors"].items() if e["file"] == STATE_FILE and name.startswith("rng/")}
    assert {n.split("/")[1] for n in rng} == {"rank0", "rank1"}
    assert {"rng/rank0/torch", "rng/rank1/torch", "rng/rank1/python", "rng/rank1/numpy"} <= rng
    assert manifest["step"] == 9 and manifest["position"]["next_step"] == 10 and manifest["extra"]["scheduler"] is None
    damaged = checkpointed["tmp"] / "rng-damaged"
    shutil.copytree(path, damaged)
    _flip_a_byte(damaged / STATE_FILE, "rng/rank1/torch")
    assert list(verify_checkpoint(damaged).problems) == ["rng/rank1/torch"]


@pytest.mark.faults
@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_skipped_and_said_so(checkpointed, twenty_steps_straight, tmp_path):
    ck = tmp_path / "ckpt"
    shutil.copytree(checkpointed["pristine"], ck)
    _flip_a_byte(ck / "step-000010" / MODEL_FILE, "layers.0.attn.W_Q.weight")
    code, result, err = _train(tmp_path / "out", "--nproc", "2", "--steps", "20", "--resume", str(ck))
    assert code == 0, err
    assert result["resume"]["from_step"] == 8
    assert result["resume"]["skipped"] and "model/layers.0.attn.W_Q.weight" in result["resume"]["skipped"][0]
    assert result["final_fingerprint"] == twenty_steps_straight["final_fingerprint"]  # 8 + 12 = 20 too


def _flip_a_byte(file: Path, tensor: str) -> None:
    raw = bytearray(file.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    begin = 8 + n + json.loads(raw[8 : 8 + n])[tensor]["data_offsets"][0]
    raw[begin + 3] ^= 0x08
    file.write_bytes(bytes(raw))


# ---------------------------------------------------------------- refusals, each with its reason


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--nproc", "1"], "written by 2 rank(s), this run has 1: resume with --nproc 2"),
        (["--nproc", "2", "--set", "model.d_model=16", "--set", "model.n_heads=2"], "another model: model.d_model"),
        (["--nproc", "2", "--set", "model.positional=false"], "another model: model.positional"),
        (["--nproc", "2", "--set", "plan.global_batch=32"], "an incompatible plan: plan.global_batch is 16"),
        (["--nproc", "2", "--set", "plan.seed=1"], "an incompatible plan: plan.seed is 0 in the checkpoint, 1 here"),
        (["--nproc", "2", "--set", "data.num_samples=96"], "another data set: data.num_samples is 160"),
        (["--nproc", "2", "--set", "optim.lr=0.01"], "another optimizer: optim.lr"),
        (["--nproc", "2", "--steps", "5"], "holds the state after 10 steps, this run has steps=5"),
        (["--nproc", "2", "--sync", "exact"], "written with sync=ddp, this run has sync=exact: resume with --sync ddp"),
    ],
)
def test_a_checkpoint_of_another_run_is_refused_with_the_reason(checkpointed, tmp_path, args, reason):
    line = _refused(tmp_path, "--steps", "20", *args, "--resume", str(checkpointed["pristine"]))
    assert reason in line, line


def test_another_model_is_refused_by_its_tensors_too(checkpointed, tmp_path):
    """A model whose config reads the same but whose tensors differ (a hand-built checkpoint)."""
    src = checkpointed["pristine"] / "step-000010"
    manifest = json.loads((src / MANIFEST).read_text())
    entry = manifest["tensors"]["model/layers.0.attn.W_Q.weight"]
    entry["shape"] = [16, 32]
    cfg = load_config(None, [*RUN[1:8:2], "plan.world_size=2", "steps=20"])
    _, info = build_dataset(cfg.data)
    model = build_model(cfg.model, info, seed=0)
    with pytest.raises(UsageError, match=r"another model: layers.0.attn.W_Q.weight is float64 \[16, 32\]"):
        refuse_incompatible(Found(src, manifest), cfg, 2, model)


def test_resume_from_nothing_is_refused(tmp_path):
    missing = _refused(tmp_path, "--resume", str(tmp_path / "nowhere"))
    assert "no such directory" in missing
    (tmp_path / "empty").mkdir()
    empty = _refused(tmp_path, "--resume", str(tmp_path / "empty"))
    assert "holds no checkpoint" in empty


@pytest.mark.faults
def test_no_checkpoint_that_verifies_is_refused_naming_the_tensor(checkpointed, tmp_path):
    ck = tmp_path / "ckpt"
    shutil.copytree(checkpointed["pristine"], ck)
    for path in (ck / "step-000010", ck / "step-000008"):
        _flip_a_byte(path / MODEL_FILE, "layers.0.attn.W_Q.weight")
    line = _refused(tmp_path, "--nproc", "2", "--steps", "20", "--resume", str(ck))
    assert "no checkpoint verifies" in line and "step-000010: damaged: model/layers.0.attn.W_Q.weight" in line


def test_a_fresh_run_does_not_write_over_another_runs_checkpoints(checkpointed, tmp_path):
    line = _refused(tmp_path, "--nproc", "2", "--steps", "20", "--checkpoint-dir", str(checkpointed["pristine"]))
    assert "already holds checkpoints (newest step-000010)" in line and "--resume" in line


def test_checkpoint_flags_without_a_directory_are_refused(tmp_path):
    assert "--checkpoint-every needs --checkpoint-dir" in _refused(tmp_path, "--checkpoint-every", "5")
    assert "auto resumes from checkpoint.dir" in _refused(tmp_path, "--resume", "auto")
    assert "--max-failures restarts Ray Train workers" in _refused(tmp_path, "--max-failures", "1")
    (tmp_path / "a-file").write_text("not a directory")
    line = _refused(tmp_path, "--checkpoint-dir", str(tmp_path / "a-file"))
    assert "exists and is not a directory" in line
    assert "not a directory" in _refused(tmp_path, "--resume", str(tmp_path / "a-file"))


# ---------------------------------------------------------------- one process: auto, and a save cut short

ONE = ["--steps", "10", "--checkpoint-every", "5"]


@pytest.fixture(scope="module")
def one_straight(tmp_path_factory) -> dict:
    """10 steps straight in one process: what every one-process resume must end with."""
    code, result, err = _train(tmp_path_factory.mktemp("one") / "straight", "--steps", "10")
    assert code == 0, err
    return result


@pytest.mark.slow
def test_resume_auto_starts_fresh_then_continues(one_straight, tmp_path):
    ck = str(tmp_path / "ckpt")
    straight = one_straight
    code, first, err = _train(tmp_path / "a", "--steps", "5", "--checkpoint-dir", ck, "--resume", "auto")
    assert code == 0 and first["resume"] is None, err  # nothing to resume from: step 0
    code, second, err = _train(tmp_path / "b", *ONE, "--checkpoint-dir", ck, "--resume", "auto")
    assert code == 0 and second["resume"]["from_step"] == 5, err
    assert second["final_fingerprint"] == straight["final_fingerprint"]
    code, again, err = _train(tmp_path / "c", *ONE, "--checkpoint-dir", ck, "--resume", "auto")
    assert code == 0 and again["resume"]["from_step"] == 10, err  # nothing left: the final state, checked again
    assert again["final_fingerprint"] == straight["final_fingerprint"] and again["losses"] == straight["losses"]


@pytest.mark.faults
@pytest.mark.slow
def test_a_save_cut_short_leaves_the_previous_checkpoint_the_newest_valid_one(one_straight, tmp_path):
    ck = tmp_path / "ckpt"
    env = dict(os.environ, HF_HUB_OFFLINE="1", **fault_env(exit_in_save=2))
    env.pop("RANK", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "distshare",
            "train",
            *RUN,
            *ONE,
            "--checkpoint-dir",
            str(ck),
            "--out",
            str(tmp_path / "a"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == FAULT_EXIT_CODE, proc.stderr[-2000:]  # killed inside the second save
    assert [p.name for _, p in list_checkpoints(ck)] == ["step-000005"]
    leftovers = [p for p in ck.iterdir() if p.name.startswith(".step-000010.")]
    assert leftovers and not (leftovers[0] / MANIFEST).exists()  # half a checkpoint, never named as one
    assert verify_checkpoint(ck / "step-000005").ok
    code, resumed, err = _train(tmp_path / "b", *ONE, "--checkpoint-dir", str(ck), "--resume", "auto")
    assert code == 0 and resumed["resume"]["from_step"] == 5, err
    assert resumed["final_fingerprint"] == one_straight["final_fingerprint"]
    assert not [p for p in ck.iterdir() if p.name.startswith(".step-")]  # the next save cleared the leftover


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    state = rng_state(torch.device("cpu"))
    expected = (torch.rand(4), random.random(), np.random.rand(3))
    model = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path / "ck", model, state={f"rng/rank0/{k}": v for k, v in state.items()})
    torch.manual_seed(2), random.seed(2), np.random.seed(2)
    loaded: dict[str, torch.Tensor] = {}
    load_checkpoint(tmp_path / "ck", model, state=loaded)
    set_rng_state({k.removeprefix("rng/rank0/"): v for k, v in loaded.items()}, torch.device("cpu"))
    again = (torch.rand(4), random.random(), np.random.rand(3))
    assert torch.equal(expected[0], again[0]) and expected[1] == again[1] and np.array_equal(expected[2], again[2])


@pytest.mark.faults
def test_a_hand_edited_learning_rate_in_the_manifest_is_caught(tmp_path):
    model = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path / "ck", model, torch.optim.Adam(model.parameters(), lr=1e-3), step=3)
    manifest = json.loads((tmp_path / "ck" / MANIFEST).read_text())
    manifest["optimizer"]["param_groups"][0]["lr"] = 1.0
    (tmp_path / "ck" / MANIFEST).write_text(json.dumps(manifest))
    assert "meta digest" in verify_checkpoint(tmp_path / "ck").problems[MANIFEST]
