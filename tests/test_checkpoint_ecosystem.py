"""Claim: distshare's checkpoint tools work on the ecosystem's checkpoints and on the user's live
model. `distshare checksum` and `distshare compare` read an HF `save_pretrained` folder (one
file, or shards with their index) as well as a distshare checkpoint, and pair tensors by name;
a live `fingerprint_state` is matched against a checkpoint (the manifest's `state_digest` is the
live `state_digest`); a tied weight (GPT-2's `wte`/`lm_head`) is stored once and tied again on
load. Each verdict has its mutant: a flipped bit in a shard, a missing or truncated shard, a
tensor missing from its shard, a tie whose target changed, one live element changed."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distshare.checkpoint import (
    MANIFEST,
    MODEL_FILE,
    compare_checkpoints,
    load_checkpoint,
    match_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from distshare.cli import main
from distshare.integrity.fingerprint import state_digest

INDEX = "model.safetensors.index.json"


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the tiny vocabulary makes it warn about GPT-2's token ids
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16))


def _trained_gpt2():
    model = _gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids).loss.backward()
    opt.step()
    return model, opt


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained tiny GPT-2 as a distshare checkpoint, an HF sharded folder and an HF one-file folder."""
    root = tmp_path_factory.mktemp("gpt2")
    model, opt = _trained_gpt2()
    save_checkpoint(root / "ck", model, opt, step=0)
    model.save_pretrained(root / "hf", max_shard_size="20KB")  # 7 shards and an index
    model.save_pretrained(root / "hf1")
    return root, model, opt


@pytest.fixture
def copies(saved, tmp_path):
    """Fresh copies to damage (the module's originals stay intact)."""
    root, model, opt = saved
    for name in ("ck", "hf", "hf1"):
        shutil.copytree(root / name, tmp_path / name)
    return tmp_path, model, opt


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _header(file: Path) -> tuple[int, dict]:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n, json.loads(raw[8 : 8 + n])


def _shard_of(folder: Path, tensor: str) -> Path:
    return folder / json.loads((folder / INDEX).read_text())["weight_map"][tensor]


def _flip_bit(file: Path, tensor: str, byte: int = 5) -> None:
    start, header = _header(file)
    raw = bytearray(file.read_bytes())
    raw[start + header[tensor]["data_offsets"][0] + byte] ^= 0x10
    file.write_bytes(bytes(raw))


# ------------------------------------------------------------------------ HF folders


def test_hf_folders_read_and_compare_equal_to_the_distshare_checkpoint(saved, capsys):
    root, _, _ = saved
    shards = sorted(p.name for p in (root / "hf").glob("*.safetensors"))
    assert len(shards) > 1  # the index case, not one file
    for folder in ("hf", "hf1"):
        code, out, _ = _cli(capsys, "checksum", str(root / folder))
        assert code == 0 and "no manifest" in out and "transformer.wte.weight" in out, out
    # The sharded and the one-file folder hold the same tensors under the same names.
    code, out, _ = _cli(capsys, "compare", str(root / "hf1"), str(root / "hf"))
    assert code == 0 and "OK 28 tensors identical" in out, out
    # A distshare checkpoint against the HF folder: model/x is x; lm_head.weight is tied (HF drops
    # it, the checkpoint stores it once); the optimizer's tensors cannot be in a weights folder.
    code, out, _ = _cli(capsys, "compare", str(root / "ck"), str(root / "hf"), "--json")
    result = json.loads(out)
    assert code == 0 and result["ok"] and result["tensors"] == 28
    assert result["tied"] == {"model/lm_head.weight": "model/transformer.wte.weight"}
    assert result["not_compared"] and all(n.startswith("optim/") for n in result["not_compared"])
    assert result["only_in_a"] == result["only_in_b"] == []


def test_a_flipped_bit_in_an_hf_shard_is_named_by_tensor(copies, capsys):
    root, _, _ = copies
    victim = "transformer.h.1.mlp.c_fc.weight"
    _flip_bit(_shard_of(root / "hf", victim), victim)
    for reference in ("ck", "hf1"):
        cmp = compare_checkpoints(root / reference, root / "hf")
        name = f"model/{victim}" if reference == "ck" else victim
        assert list(cmp.differing) == [name] and not cmp.same
        assert cmp.differing[name].differing == 1 and cmp.differing[name].first_index == [0, 1]
    code, out, _ = _cli(capsys, "compare", str(root / "ck"), str(root / "hf"))
    assert code == 1 and f"model/{victim}" in out and "1 of 28 tensors differ" in out, out
    code, out, _ = _cli(capsys, "compare", str(root / "hf1"), str(root / "hf"))  # two HF folders
    assert code == 1 and "why: corruption: 1 element(s)" in out, out
    # Alone, an HF folder has no recorded digests: the flip is found only against another copy.
    assert verify_checkpoint(root / "hf").ok


def test_a_missing_shard_is_named_with_its_tensors(copies, capsys):
    root, _, _ = copies
    shard = _shard_of(root / "hf", "transformer.h.0.attn.c_attn.weight")
    lost = [t for t, s in json.loads((root / "hf" / INDEX).read_text())["weight_map"].items() if s == shard.name]
    shard.unlink()
    check = verify_checkpoint(root / "hf")
    assert set(check.problems) == {shard.name, *lost}
    assert all(check.problems[t] == f"its shard {shard.name} is missing" for t in lost)
    code, out, _ = _cli(capsys, "checksum", str(root / "hf"))
    assert code == 1 and "DAMAGED" in out and shard.name in out and "FAILED" in out
    code, out, _ = _cli(capsys, "compare", str(root / "ck"), str(root / "hf"))
    assert code == 1 and "DAMAGED" in out


def test_a_truncated_shard_names_the_tensors_it_lost(copies):
    root, _, _ = copies
    shard = _shard_of(root / "hf", "transformer.wte.weight")
    start, header = _header(shard)
    ends = {k: start + v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"}
    cut = max(ends.values()) - 6
    shard.write_bytes(shard.read_bytes()[:cut])
    problems = verify_checkpoint(root / "hf").problems
    assert set(problems) == {k for k, end in ends.items() if end > cut}
    assert all("truncated" in why for why in problems.values())


def test_the_index_is_checked_against_its_shards(copies):
    root, _, _ = copies
    victim = "transformer.h.0.ln_2.bias"
    shard = _shard_of(root / "hf", victim)
    tensors = load_file(shard)
    del tensors[victim]
    tensors["stray.weight"] = torch.ones(3)  # and one the index does not know
    save_file(tensors, shard, metadata={"format": "pt"})
    problems = verify_checkpoint(root / "hf").problems
    assert problems[victim] == f"not in {shard.name}, where the index says it is"
    assert problems[f"{shard.name}:stray.weight"] == f"in {shard.name} but not in the index there"
    assert "total_size" in problems[INDEX]  # the bytes the index promised are not all there


def test_a_folder_without_safetensors_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    code, out, err = _cli(capsys, "checksum", str(tmp_path))
    assert code == 2 and out == "" and "nor a folder of .safetensors files" in err
    assert len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------ tied weights


def test_a_tied_weight_is_stored_once_and_tied_again_on_load(saved, capsys):
    root, model, _ = saved
    _, header = _header(root / "ck" / MODEL_FILE)
    assert "transformer.wte.weight" in header and "lm_head.weight" not in header  # one copy in the file
    manifest = json.loads((root / "ck" / MANIFEST).read_text())
    alias = manifest["tensors"]["model/lm_head.weight"]
    assert alias["alias_of"] == "model/transformer.wte.weight" and alias["stored_as"] == "transformer.wte.weight"
    # A model built without the tie gets it back, and the same state.
    fresh = _gpt2()
    fresh.lm_head.weight = torch.nn.Parameter(torch.zeros_like(fresh.lm_head.weight))
    assert fresh.lm_head.weight is not fresh.transformer.wte.weight
    load_checkpoint(root / "ck", fresh)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    assert state_digest(fresh) == state_digest(model)
    code, out, _ = _cli(capsys, "checksum", str(root / "ck"))
    assert code == 0 and "tied: stored once, as model/transformer.wte.weight" in out, out


def test_a_tie_whose_target_changed_is_named(copies):
    root, _, _ = copies
    _flip_bit(root / "ck" / MODEL_FILE, "transformer.wte.weight")
    problems = verify_checkpoint(root / "ck").problems
    assert set(problems) == {"model/transformer.wte.weight", "model/lm_head.weight"}
    assert "bytes of model/transformer.wte.weight changed" in problems["model/lm_head.weight"]


def test_an_alias_pointed_at_another_tensor_is_named(copies):
    root, _, _ = copies
    manifest = json.loads((root / "ck" / MANIFEST).read_text())
    entry = manifest["tensors"]["model/lm_head.weight"]
    entry["stored_as"], entry["alias_of"] = "transformer.h.0.mlp.c_fc.weight", "model/transformer.h.0.mlp.c_fc.weight"
    (root / "ck" / MANIFEST).write_text(json.dumps(manifest))
    problems = verify_checkpoint(root / "ck").problems
    assert (
        list(problems) == ["model/lm_head.weight"]
        and "manifest says float32 [64, 32]" in problems["model/lm_head.weight"]
    )


def test_an_alias_whose_target_was_renamed_in_the_manifest_is_named(copies):
    root, _, _ = copies
    manifest = json.loads((root / "ck" / MANIFEST).read_text())
    manifest["tensors"]["model/lm_head.weight"]["alias_of"] = "model/transformer.wpe.weight"  # bytes unchanged
    (root / "ck" / MANIFEST).write_text(json.dumps(manifest))
    problems = verify_checkpoint(root / "ck").problems
    assert (
        list(problems) == ["model/lm_head.weight"]
        and "not stored as transformer.wte.weight" in problems["model/lm_head.weight"]
    )


# ------------------------------------------------------------------------ the live state


def test_an_edited_live_record_is_caught(copies):
    root, _, _ = copies
    manifest = json.loads((root / "ck" / MANIFEST).read_text())
    manifest["live_only"]["optim/group0/lr"] = manifest["live_only"]["optim/group0/eps"]
    (root / "ck" / MANIFEST).write_text(json.dumps(manifest))
    assert list(verify_checkpoint(root / "ck").problems) == [MANIFEST]
    assert "state digest" in verify_checkpoint(root / "ck").problems[MANIFEST]


def test_the_manifest_records_the_live_state_digest(saved):
    root, model, opt = saved
    manifest = json.loads((root / "ck" / MANIFEST).read_text())
    assert manifest["state_digest"] == state_digest(model, opt)  # params, Adam moments, lr, betas, ...
    assert verify_checkpoint(root / "ck").state_digest == manifest["state_digest"]  # recomputed from the bytes
    other, other_opt = _trained_gpt2()
    with torch.no_grad():
        other.transformer.wpe.weight[0, 0] += 1e-4
    assert state_digest(other, other_opt) != manifest["state_digest"]


def test_a_bert_with_non_persistent_buffers_matches_its_digest(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=64,
            max_position_embeddings=16,
        )
    )
    assert "embeddings.position_ids" not in bert.state_dict()  # registered with persistent=False
    manifest = save_checkpoint(tmp_path / "bert", bert)
    assert "buffer/embeddings.position_ids" in manifest["live_only"]
    assert manifest["state_digest"] == state_digest(bert)
    assert match_checkpoint(bert, tmp_path / "bert").ok
    with torch.no_grad():
        bert.embeddings.position_ids[0, 3] = 0  # a buffer no file holds: caught by its recorded digest
    report = match_checkpoint(bert, tmp_path / "bert")
    assert list(report.differing) == ["buffer/embeddings.position_ids"]


def test_a_live_model_matches_its_checkpoint_and_one_changed_element_is_named(saved):
    root, model, opt = saved
    report = match_checkpoint(model, root / "ck", opt)
    assert report.ok, report.describe()
    assert (
        report.live_digest
        == report.checkpoint_digest
        == json.loads((root / "ck" / MANIFEST).read_text())["state_digest"]
    )
    assert report.tied == {"model/lm_head.weight": "param/transformer.wte.weight"}
    assert match_checkpoint(model, root / "hf").ok  # the HF folder: parameters only
    live, live_opt = _trained_gpt2()
    with torch.no_grad():
        live.transformer.h[0].attn.c_attn.weight[3, 5] += 1e-4
    report = match_checkpoint(live, root / "ck", live_opt)
    assert not report.ok and list(report.differing) == ["param/transformer.h.0.attn.c_attn.weight"]
    d = report.differing["param/transformer.h.0.attn.c_attn.weight"]
    assert d.differing == 1 and d.first_index == [3, 5]
    assert "param/transformer.h.0.attn.c_attn.weight" in report.describe()
    assert list(match_checkpoint(live, root / "hf").differing) == ["param/transformer.h.0.attn.c_attn.weight"]
    # The optimizer's settings are state too: a learning rate changed after the save is named.
    live, live_opt = _trained_gpt2()
    live_opt.param_groups[0]["lr"] = 2e-3
    assert list(match_checkpoint(live, root / "ck", live_opt).differing) == ["optim/group0/lr"]


def test_a_version_1_manifest_still_reads_and_matches(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "ck", model, opt, step=0)
    manifest = json.loads((tmp_path / "ck" / MANIFEST).read_text())
    manifest["version"] = 1  # as version 1 wrote it: no live names, no state digest
    for key in ("state_digest", "live_only"):
        del manifest[key]
    for entry in manifest["tensors"].values():
        entry.pop("live", None)
    (tmp_path / "ck" / MANIFEST).write_text(json.dumps(manifest))
    check = verify_checkpoint(tmp_path / "ck")
    assert check.ok and check.state_digest is None
    report = match_checkpoint(model, tmp_path / "ck", opt)
    assert report.ok and report.live_digest == report.checkpoint_digest == state_digest(model, opt)
    with torch.no_grad():
        model[1].running_mean[2] = float("nan")
    assert list(match_checkpoint(model, tmp_path / "ck", opt).differing) == ["buffer/1.running_mean"]
