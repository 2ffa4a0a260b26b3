"""Claim: a step is data-parallel only if (a) every rank saw different inputs, (b) the ranks' local
gradients differ before the sync, and (c) the synced gradient is the all-reduced mean of the
local ones. Each fact beside the mutant that flips it: the same data on every rank, a model
never wrapped, one parameter DDP ignores, a flipped bit, a NaN, a 1e-4 scale error, a loss
that ignores the batch; and the run a user measured: a plain `Accelerator()` under the shipped
MULTI_GPU + use_cpu config, which every replica check passes, caught under a real
`accelerate launch`.

Ranks are real gloo processes (`run_distributed`); one spawn runs several scenarios and the
tests below read their reports, so the whole file costs a few spawns and two launches.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import ACCELERATE_CPU_CONFIG, free_port, run_command
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import distshare
from distshare.distributed.spawn import run_distributed
from distshare.errors import UsageError
from distshare.integrity.data_parallel import (
    DataParallelCheck,
    DataParallelReport,
    NotDataParallelError,
    NotParallelCause,
    assert_data_parallel,
)

SCRIPT = Path(__file__).parent / "scripts" / "accelerate_data_parallel.py"

# ------------------------------------------------------------------ ranks: an MLP, one scenario each


def _mlp() -> nn.Module:
    torch.manual_seed(0)  # equal replicas on every rank
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))


def _comm_hook(tamper: str):
    """DDP's all-reduce (each rank's share divided by W, then summed), then `tamper` on rank 1."""

    def hook(state, bucket):
        t = bucket.buffer()
        if tamper != "sum":
            t.div_(dist.get_world_size())
        fut = dist.all_reduce(t, async_op=True).get_future()

        def then(f):
            out = f.value()[0]
            if dist.get_rank() == 1:
                if tamper == "nan":
                    out[0] = float("nan")
                elif tamper == "bit":  # the lowest mantissa bit of one element
                    out.view(torch.int32)[0] ^= 1
                elif tamper == "scale":
                    out.mul_(1 + 1e-4)
            return out

        return fut.then(then)

    return hook


def _step(world, mode: str, k: int = 2, **options) -> DataParallelReport:
    """One step of k micro-batches (no_sync but the last), clipped after the backward, checked."""
    model = _mlp()
    if mode == "ignored":  # DDP told to leave one parameter out of its all-reduce
        DDP._set_params_and_buffers_to_ignore_for_model(model, ["2.bias"])
    wrapped = model if mode == "not_wrapped" else DDP(model, gradient_as_bucket_view=mode == "bucket_view")
    if mode == "zeroed_grads":  # zero_grad(set_to_none=False) after an earlier step: .grad holds zeros
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    if mode in ("nan", "bit", "scale", "sum"):
        wrapped.register_comm_hook(None, _comm_hook(mode))
    data = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    check = DataParallelCheck(wrapped, **options)
    check.arm()
    for micro in range(k):
        # Rank r takes rows [r*4k, (r+1)*4k) of the global batch; "same" gives every rank rank 0's.
        start = (0 if mode in ("same", "replicated") else world.rank * 4 * k) + micro * 4
        if mode == "same_on_1_2" and world.rank == 2:
            start = 1 * 4 * k + micro * 4
        x = data[start : start + 4]
        last = micro == k - 1
        local = isinstance(wrapped, DDP) and not last and mode != "sync_each"
        with wrapped.no_sync() if local else torch.enable_grad():
            out = wrapped(x)
            loss = (out * 0).sum() + sum((p**2).sum() for p in model.parameters()) if mode == "ignores_batch" else None
            (loss if loss is not None else out.pow(2).sum()).backward()
    torch.nn.utils.clip_grad_norm_(wrapped.parameters(), 0.01)  # after the copy the check judges
    report = check.verify(step=0)
    check.remove()
    return report


def _mlp_scenarios(world) -> dict[str, dict]:
    modes = ["ddp", "same", "not_wrapped", "ignored", "bit", "nan", "sum", "ignores_batch"]
    out = {mode: _step(world, mode).to_dict() for mode in modes}
    out["sum_declared"] = _step(world, "sum", reduction="sum").to_dict()
    out["replicated"] = _step(world, "replicated", replicated_inputs=True).to_dict()
    out["one_micro_batch"] = _step(world, "ddp", k=1).to_dict()
    out["sync_each"] = _step(world, "sync_each", k=3).to_dict()  # no no_sync: every backward all-reduces
    out["bucket_view"] = _step(world, "bucket_view").to_dict()  # .grad a view into DDP's buckets
    out["zeroed_grads"] = _step(world, "zeroed_grads").to_dict()
    try:  # the testing helper: a `with` block around the step
        model = DDP(_mlp())
        with assert_data_parallel(model) as check:
            model(torch.ones(4, 8)).sum().backward()  # the same batch on every rank
        out["assert"] = {"raised": None, "report": check.report.to_dict()}
    except NotDataParallelError as exc:
        out["assert"] = {"raised": str(exc), "cause": str(exc.report.cause)}
    try:
        with assert_data_parallel(DDP(_mlp())):
            pass  # no backward: nothing to judge
        out["empty"] = {"raised": None}
    except UsageError as exc:
        out["empty"] = {"raised": str(exc)}
    return out


def _three_rank_scenarios(world) -> dict[str, dict]:
    return {mode: _step(world, mode, k=3).to_dict() for mode in ("ddp", "scale", "same_on_1_2")}


def _two_rank_scenarios(world) -> dict[str, dict]:
    """Every 2-rank scenario of this file in one spawned world: the MLP's, then GPT-2's."""
    return {"mlp": _mlp_scenarios(world), "gpt2": _gpt2_scenarios(world)}


@pytest.fixture(scope="module")
def world_of_two() -> list[dict[str, dict]]:
    """Rank by rank, what `_two_rank_scenarios` returned."""
    return run_distributed(_two_rank_scenarios, 2)


@pytest.fixture(scope="module")
def two_ranks(world_of_two) -> dict[str, dict]:
    reports = [rank["mlp"] for rank in world_of_two]
    assert reports[0] == reports[1], "every rank ends with the same verdict"
    return reports[0]


@pytest.fixture(scope="module")
def three_ranks() -> dict[str, dict]:
    reports = run_distributed(_three_rank_scenarios, 3)
    assert reports[0] == reports[1] == reports[2]
    return reports[0]


# ------------------------------------------------------------------ the verdicts, each with its mutant


@pytest.mark.slow
def test_a_correct_ddp_loop_is_data_parallel_bit_for_bit_on_two_ranks(two_ranks):
    for name in ("ddp", "one_micro_batch", "sync_each", "bucket_view", "zeroed_grads"):
        r = two_ranks[name]
        assert r["ok"], r["summary"]
        assert r["same_inputs"] == [] and not r["same_local_grads"]
        assert r["parameters"] == 4 and r["unsynced"] == {}
        # Two ranks: one commutative addition, so the synced gradient is ours bit for bit,
        # clipping after the backward notwithstanding (the check copies before it).
        assert r["bitwise"] and r["max_abs_diff"] == 0.0
    assert two_ranks["ddp"]["forwards"] == [2, 2]


@pytest.mark.slow
def test_the_same_data_on_every_rank_fails_a_and_b(two_ranks):
    r = two_ranks["same"]
    assert r["cause"] == NotParallelCause.SAME_DATA
    assert r["same_inputs"] == [[0, 1]] and r["same_local_grads"]
    assert "not sharded" in r["summary"] and "replicated_inputs=True" in r["summary"]
    assert "\n" not in r["summary"]


@pytest.mark.slow
def test_a_model_never_wrapped_fails_c_on_every_parameter(two_ranks):
    r = two_ranks["not_wrapped"]
    assert r["cause"] == NotParallelCause.NOT_WRAPPED and not r["wrapped"]
    assert sorted(r["unsynced"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert "DistributedDataParallel" in r["summary"]


@pytest.mark.slow
@pytest.mark.parametrize("mutant", ["ignored", "bit", "nan"])
def test_one_parameter_or_element_not_synced_fails_c(two_ranks, mutant):
    r = two_ranks[mutant]
    assert r["cause"] == NotParallelCause.GRADS_NOT_SYNCED and r["wrapped"], r["summary"]
    if mutant == "ignored":  # DDP reduces every parameter but the one it was told to ignore
        assert r["unsynced"] == {"2.bias": [0, 1]}
    else:  # the comm hook tampered with the first element of the bucket on rank 1 only
        assert list(r["unsynced"].values()) == [[1]]
        assert not r["bitwise"]


@pytest.mark.slow
def test_a_summing_sync_fails_the_mean_with_a_hint_and_passes_when_declared(two_ranks):
    r = two_ranks["sum"]
    assert r["cause"] == NotParallelCause.GRADS_NOT_SYNCED and r["other_reduction"]
    assert "it is their sum" in r["summary"] and "reduction='sum'" in r["summary"]
    assert two_ranks["sum_declared"]["ok"], two_ranks["sum_declared"]["summary"]


@pytest.mark.slow
def test_a_loss_that_ignores_the_batch_fails_b(two_ranks):
    r = two_ranks["ignores_batch"]
    assert r["same_inputs"] == [] and r["same_local_grads"]
    assert r["cause"] == NotParallelCause.SAME_LOCAL_GRADS


@pytest.mark.slow
def test_replicated_inputs_are_a_note_not_a_failure_when_declared(two_ranks):
    r = two_ranks["replicated"]
    assert r["ok"] and r["same_inputs"] == [[0, 1]]


@pytest.mark.slow
def test_the_testing_helper_raises_one_line_with_the_cause(two_ranks):
    out = two_ranks["assert"]
    assert out["raised"] and out["cause"] == "same_data" and "\n" not in out["raised"]
    assert out["raised"].startswith("not data-parallel: same_data:")
    empty = two_ranks["empty"]["raised"]
    assert empty and "no gradient reached" in empty and "\n" not in empty


@pytest.mark.slow
def test_three_ranks_agree_within_the_rounding_bound_and_a_1e4_scale_error_does_not(three_ranks):
    ok = three_ranks["ddp"]
    assert ok["ok"], ok["summary"]
    assert ok["max_excess"] <= 1.0  # measured, not bitwise in general (three terms, two orders)
    scaled = three_ranks["scale"]
    assert scaled["cause"] == NotParallelCause.GRADS_NOT_SYNCED
    assert all(ranks == [1] for ranks in scaled["unsynced"].values()) and len(scaled["unsynced"]) == 4
    assert scaled["max_excess"] > 100  # 1e-4 relative is far past float32 rounding of 3 terms
    same = three_ranks["same_on_1_2"]
    assert same["cause"] == NotParallelCause.SAME_DATA and same["same_inputs"] == [[1, 2]]


# ------------------------------------------------------------------ distshare.watch, on GPT-2


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    return GPT2LMHeadModel(config)


def _gpt2_watched(world, wrap: bool, shard: bool) -> dict:
    model = _gpt2()
    trained = DDP(model) if wrap else model
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-3)
    tokens = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(1))
    armed_at_forward = []
    model.register_forward_pre_hook(lambda m, a: armed_at_forward.append(watcher.data_parallel.armed))
    watcher = distshare.watch(trained, optimizer, every=2, data_parallel=True, raise_on_divergence=False)
    for step in range(4):
        row = 2 * step + (world.rank if shard else 0)
        batch = tokens[row : row + 1]
        loss = trained(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    watcher.close()
    found = watcher.first_not_parallel
    return {
        "in_sync": watcher.in_sync,
        "report": watcher.data_parallel_report.to_dict(),
        "first_not_parallel": found.to_dict() if found else None,
        "armed_at_forward": armed_at_forward,
    }


def _gpt2_scenarios(world) -> dict:
    out = {"ddp": _gpt2_watched(world, wrap=True, shard=True)}
    out["same_data_not_wrapped"] = _gpt2_watched(world, wrap=False, shard=False)
    return out


@pytest.mark.slow
def test_watch_checks_a_gpt2_ddp_loop_and_catches_the_run_that_is_not_data_parallel(world_of_two):
    results = [rank["gpt2"] for rank in world_of_two]
    ddp = results[0]["ddp"]
    assert ddp["in_sync"] and ddp["first_not_parallel"] is None
    assert ddp["report"]["ok"] and ddp["report"]["step"] == 3 and ddp["report"]["bitwise"]
    # Hooks armed only for the steps before a check (every=2: steps 1 and 3), keyword inputs digested.
    assert ddp["armed_at_forward"] == [False, True, False, True]
    assert ddp["report"]["forwards"] == [1, 1]
    bad = results[0]["same_data_not_wrapped"]
    assert bad["in_sync"], "every replica check passes: the run a user measured"
    found = bad["first_not_parallel"]
    assert found["cause"] == "same_data" and found["step"] == 1
    assert found["same_local_grads"] and "not a DDP wrapper" in found["summary"]


def test_launched_processes_without_a_process_group_each_train_alone(monkeypatch):
    # accelerate's state is process-wide: an earlier test in this process may have set it up; this user did not.
    state = sys.modules.get("accelerate.state")
    if state is not None:
        monkeypatch.setattr(state.PartialState, "_shared_state", {})
    model = nn.Linear(3, 1)
    with assert_data_parallel(model) as check:  # one process, no launcher: nothing to compare, nothing wrong
        model(torch.ones(2, 3)).sum().backward()
    assert check.report.ok and check.report.world_size == 1
    monkeypatch.setenv("RANK", "0")  # what torchrun / accelerate launch write for 2 processes
    monkeypatch.setenv("WORLD_SIZE", "2")
    expected = r"^not data-parallel: no_process_group: .* 2 processes"
    with pytest.raises(NotDataParallelError, match=expected), assert_data_parallel(model):
        model(torch.ones(2, 3)).sum().backward()


def test_bad_options_are_refused_in_one_line():
    with pytest.raises(UsageError, match="reduction='max'"):
        DataParallelCheck(nn.Linear(2, 2), reduction="max")


# ------------------------------------------------------------------ a real accelerate launch


def _launch(mode: str, out: Path) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        f"--config_file={ACCELERATE_CPU_CONFIG}",
        "--num_processes=2",
        f"--main_process_port={free_port()}",
        str(SCRIPT),
        mode,
    ]
    proc = run_command(cmd, timeout=180, DS_TEST_OUT=str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # One file per process: lines two processes print to one pipe can interleave.
    return [json.loads(line) for f in sorted(out.glob("*.jsonl")) for line in f.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.launcher
def test_a_plain_accelerator_under_the_cpu_config_is_refused_and_caught(tmp_path):
    lines = _launch("plain", tmp_path)
    refused = next(x for x in lines if x["phase"] == "refuse")
    assert refused["distributed_type"] == "NO" and refused["error"] == "UsageError"
    assert "Accelerator(cpu=True)" in refused["message"]
    caught = next(x for x in lines if x["phase"] == "plain_watch")
    assert caught["error"] == "NotDataParallelError" and caught["cause"] == "accelerate_not_distributed"
    assert "Accelerator(cpu=True)" in caught["message"] and "identical inputs on ranks 0, 1" in caught["message"]
    # accelerate's NO: each process believes it is the main one, so both printed
    assert sum(x["phase"] == "plain_watch" for x in lines) == 2


@pytest.mark.slow
@pytest.mark.launcher
def test_the_accelerate_helper_passes_a_clean_loop_and_catches_a_weight_changed_on_rank_1(tmp_path):
    lines = _launch("cpu", tmp_path)
    clean = next(x for x in lines if x["phase"] == "clean")
    assert clean["distributed_type"] == "MULTI_CPU" and clean["in_sync"] and clean["checks"] == 3
    dp = clean["data_parallel"]
    assert dp["ok"] and dp["wrapped"] and dp["forwards"] == [2, 2] and dp["bitwise"], dp["summary"]
    corrupt = next(x for x in lines if x["phase"] == "corrupt")
    assert corrupt["error"] == "ReplicaDivergenceError"
    assert corrupt["differing"] == ["param/transformer.h.0.mlp.c_fc.weight"]
    assert corrupt["cause"] == "corruption" and "Fix:" in corrupt["message"]
