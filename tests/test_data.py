"""Data sets: deterministic, offline, and shaped so every sample has fixed shapes.

The svo tests state the seed's example as a specification: "cat eat mouse" and
"mouse eat cat" are permutations of the same ids with different labels, so only a model
that sees positions can tell them apart.
"""

from __future__ import annotations

import functools
import json
import sys

import datasets
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distshare.config import DataConfig
from distshare.data import IGNORE_INDEX, TensorTable, build_dataset, encode_sentence, render
from distshare.data.corpus import ADJECTIVES, NOUNS, ROLES, VERBS
from distshare.data.files import MAX_TOKENS
from distshare.data.shapes import PATTERN_NAMES, PATTERN_SIZE
from distshare.errors import ConfigError, UsageError

GENERATED = [
    {"name": "svo"},
    {"name": "svo", "task": "roles", "variable_length": True},
    {"name": "shapes"},
    {"name": "digits"},
    {"name": "pydoc"},
]


def build(**kw):
    return build_dataset(DataConfig(**kw))


@pytest.fixture(scope="module")
def roles():
    return build(task="roles", variable_length=True, num_samples=256)


# --- determinism --------------------------------------------------------------------------


@pytest.mark.parametrize("kw", GENERATED, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_same_config_gives_identical_data_set(kw):
    (a, info_a), (b, info_b) = build(**kw, num_samples=64), build(**kw, num_samples=64)
    assert info_a == info_b
    assert a.to_dict() == b.to_dict()


@pytest.mark.parametrize("kw", GENERATED, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_different_seeds_give_different_data_sets(kw):
    (a, info_a), (b, info_b) = build(**kw, num_samples=64, seed=0), build(**kw, num_samples=64, seed=1)
    assert info_a == info_b  # vocabulary and classes belong to the data set, not to the draw
    assert a.to_dict() != b.to_dict()


# --- svo ----------------------------------------------------------------------------------


def test_cat_eat_mouse_and_mouse_eat_cat_are_permutations_with_different_labels():
    ds, info = build(num_samples=4096)
    cat_mouse = encode_sentence("cat eat mouse", info)
    mouse_cat = encode_sentence("mouse eat cat", info)
    assert sorted(cat_mouse) == sorted(mouse_cat) and cat_mouse != mouse_cat
    label = dict(zip(ds["text"], ds["label"], strict=True))
    assert info.class_names[label["cat eat mouse"]] == "cat"
    assert info.class_names[label["mouse eat cat"]] == "mouse"


def test_subject_task_labels_the_subject_and_subject_is_never_the_object():
    ds, info = build(num_samples=256)
    assert info.kind == "text" and info.task == "sequence" and info.class_names == NOUNS
    for text, ids, label in zip(ds["text"], ds["input_ids"], ds["label"], strict=True):
        subject, _verb, obj = text.split()
        assert info.class_names[label] == subject and subject != obj
        assert [info.vocab[i] for i in ids] == text.split()


def test_roles_task_labels_every_token(roles):
    ds, info = roles
    assert info.task == "token" and info.class_names == ROLES
    for ids, labels in zip(ds["input_ids"], ds["labels"], strict=True):
        assert len(labels) == len(ids)
        words = [info.vocab[i] for i in ids]
        verb = next(i for i, w in enumerate(words) if w in VERBS)
        expected = [
            "modifier" if w in ADJECTIVES else "verb" if i == verb else "subject" if i < verb else "object"
            for i, w in enumerate(words)
        ]
        assert [ROLES[r] for r in labels] == expected


def test_variable_length_gives_3_to_5_words_and_max_len_is_the_grammars(roles):
    ds, info = roles
    assert {len(ids) for ids in ds["input_ids"]} == {3, 4, 5}
    assert info.max_len == 5
    fixed, fixed_info = build(num_samples=64)
    assert {len(ids) for ids in fixed["input_ids"]} == {3} and fixed_info.max_len == 3


def test_vocabulary_is_fixed_and_sorted():
    vocabs = {build(seed=s, variable_length=v, num_samples=8)[1].vocab for s in (0, 1) for v in (False, True)}
    assert len(vocabs) == 1
    (vocab,) = vocabs
    assert vocab[0] == "<pad>" and list(vocab[1:]) == sorted(vocab[1:])


def test_encode_sentence_refuses_unknown_words_and_long_sentences():
    info = build(num_samples=8)[1]
    with pytest.raises(ValueError, match="unicorn"):
        encode_sentence("cat eat unicorn", info)
    with pytest.raises(ValueError, match="1 to 3 words"):
        encode_sentence("big cat eat mouse", info)


def test_unknown_svo_task_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        build(task="verbs")
    assert err.value.field == "data.task"


def test_unknown_data_set_name_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        build(name="imagenet")
    assert err.value.field == "data.name"


# --- shapes -------------------------------------------------------------------------------


def test_shapes_labels_positions_and_pixels():
    ds, info = build(name="shapes", num_samples=128, image_size=16)
    assert info.kind == "image" and info.image_shape == (1, 16, 16) and info.class_names == PATTERN_NAMES
    images = np.asarray(ds.with_format("numpy")[:]["image"])
    assert images.shape == (128, 1, 16, 16) and np.isfinite(images).all()
    last = 16 - PATTERN_SIZE
    for image, label, row, col in zip(images, ds["label"], ds["row"], ds["col"], strict=True):
        assert 0 <= label < len(PATTERN_NAMES) and 0 <= row <= last and 0 <= col <= last
        # The noise is light: the noiseless rendering at (row, col) is the image, within noise.
        assert np.abs(image - render(label, row, col, 16)).max() < 0.5


def test_render_shifts_the_pattern_and_nothing_else():
    for pattern in range(len(PATTERN_NAMES)):
        base = render(pattern, 2, 3, 12)
        assert np.array_equal(np.roll(base, (1, 2), axis=(1, 2)), render(pattern, 3, 5, 12))
    with pytest.raises(ValueError):
        render(0, 10, 0, 12)


# --- real data ----------------------------------------------------------------------------


def test_digits_are_8x8_in_0_1_and_at_most_num_samples():
    ds, info = build(name="digits", num_samples=100)
    images = np.asarray(ds.with_format("numpy")[:]["image"])
    assert images.shape == (100, 1, 8, 8) and info.image_shape == (1, 8, 8) and info.num_classes == 10
    assert images.min() >= 0 and images.max() <= 1
    assert len(build(name="digits", num_samples=5000)[0]) == 1797


def test_digits_without_scikit_learn_is_a_usage_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(UsageError, match="pip install"):
        build(name="digits")


def test_pydoc_windows_classify_topics():
    ds, info = build(name="pydoc", num_samples=200)
    assert len(ds) == 200 and info.num_classes >= 2 and len(set(ds["label"])) == info.num_classes
    assert info.vocab[:2] == ("<pad>", "<unk>")
    for ids in ds["input_ids"]:
        assert len(ids) == info.max_len and all(0 < i < info.vocab_size for i in ids)


# --- local files --------------------------------------------------------------------------

ROWS = [
    {"text": "the cat eats", "label": "pos"},
    {"text": "a mouse", "label": "neg"},
    {"text": "", "label": "pos"},
    {"text": " ".join(["w"] * 100), "label": "neg"},
]


def write(path, rows=ROWS):
    suffix = path.suffix
    if suffix == ".csv":
        datasets.Dataset.from_list(rows).to_csv(path, index=False)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        datasets.Dataset.from_list(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl", ".parquet"])
def test_local_file_round_trip(tmp_path, suffix):
    ds, info = build(name="file", path=str(write(tmp_path / f"data{suffix}")))
    assert info.class_names == ("neg", "pos") and ds["label"] == [1, 0, 1, 0]
    assert info.vocab[:2] == ("<pad>", "<unk>") and list(info.vocab[2:]) == sorted(info.vocab[2:])
    assert ds["text"][0] == "the cat eats"
    assert [info.vocab[i] for i in ds["input_ids"][1]] == ["a", "mouse"]
    assert ds["input_ids"][2] == [1]  # an empty text is one <unk>: never a row of padding only
    assert info.max_len == MAX_TOKENS and len(ds["input_ids"][3]) == MAX_TOKENS


def test_local_file_integer_labels_are_kept(tmp_path):
    rows = [{"body": "x y", "y": 2}, {"body": "z", "y": 0}]
    ds, info = build(name="file", path=str(write(tmp_path / "d.jsonl", rows)), text_field="body", label_field="y")
    assert ds["label"] == [2, 0] and info.num_classes == 3 and info.max_len == 2


@pytest.mark.parametrize(
    ("name", "content", "error", "match"),
    [
        ("d.txt", "a,b\n", ConfigError, "unsupported extension"),
        ("d.csv", "", UsageError, "empty"),
        ("d.csv", "text,label\n", UsageError, "no rows"),
        ("d.json", "garbage{{", UsageError, "cannot read"),
        ("d.parquet", "not parquet", UsageError, "cannot read"),
        ("d.csv", "words,label\na b,x\n", ConfigError, "'text' not found.*columns found: words, label"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, name, content, error, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(error, match=match) as err:
        build(name="file", path=str(path))
    assert "\n" not in str(err.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        build(name="file", path=str(tmp_path / "nope.csv"))
    assert err.value.field == "data.path"


# --- tensors ------------------------------------------------------------------------------


def test_token_table_pads_to_max_len_with_ignore_index(roles):
    ds, info = roles
    table = TensorTable.from_dataset(ds, info, torch.float32)
    ids, mask = table.inputs["input_ids"], table.inputs["pad_mask"]
    lengths = torch.tensor([len(r) for r in ds["input_ids"]])
    assert len(table) == len(ds)
    assert ids.shape == mask.shape == table.labels.shape == (len(ds), info.max_len)
    assert ids.dtype == table.labels.dtype == torch.long and mask.dtype == torch.bool
    assert torch.equal(mask.sum(1), lengths) and torch.equal(table.items, lengths)
    assert (ids[~mask] == 0).all() and (ids[mask] > 0).all()
    assert torch.equal(table.labels == IGNORE_INDEX, ~mask)
    assert ids[0, : lengths[0]].tolist() == ds["input_ids"][0]


def test_sequence_and_image_tables():
    ds, info = build(num_samples=32)
    table = TensorTable.from_dataset(ds, info, torch.float32)
    assert table.labels.shape == (32,) and torch.equal(table.items, torch.ones(32, dtype=torch.long))
    ds, info = build(name="shapes", num_samples=32)
    table = TensorTable.from_dataset(ds, info, torch.float64)
    assert table.inputs["image"].shape == (32, *info.image_shape) and table.inputs["image"].dtype == torch.float64
    assert table.labels.tolist() == ds["label"]


def test_a_sample_has_the_same_shapes_and_values_in_any_batch(roles):
    table = TensorTable.from_dataset(*roles, torch.float32)
    alone, among = table.select([5]), table.select([7, 5, 0])
    for name in alone.inputs:
        assert torch.equal(alone.inputs[name][0], among.inputs[name][1])
    assert torch.equal(alone.labels[0], among.labels[1])


def test_empty_selection_is_an_empty_batch(roles):
    table = TensorTable.from_dataset(*roles, torch.float32)
    batch = table.select([])
    assert len(batch) == 0 and batch.num_items == 0 and table.count_items([]) == 0
    assert batch.inputs["input_ids"].shape == (0, 5) and batch.labels.shape == (0, 5)
    image_table = TensorTable.from_dataset(*build(name="shapes", num_samples=8), torch.float32)
    assert image_table.select(torch.tensor([], dtype=torch.long)).inputs["image"].shape == (0, 1, 12, 12)


@functools.cache
def roles_table() -> tuple[TensorTable, list[int]]:
    ds, info = build(task="roles", variable_length=True, num_samples=256)
    return TensorTable.from_dataset(ds, info, torch.float32), [len(ids) for ids in ds["input_ids"]]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 255), max_size=40))
def test_select_and_count_items_agree(indices):
    table, lengths = roles_table()
    batch = table.select(indices)
    expected = sum(lengths[i] for i in indices)
    assert batch.num_items == table.count_items(torch.tensor(indices, dtype=torch.long)) == expected
    assert batch.indices.tolist() == indices
    assert int((batch.labels != IGNORE_INDEX).sum()) == expected
