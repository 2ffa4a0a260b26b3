"""Subject-verb-object sentences: "cat eat mouse" and "mouse eat cat".

The seed's question is whether a transformer can tell these two apart with one shared set
of weights. They hold the same words, so a bag-of-words model cannot; only positions can.
This corpus makes that a measurable task:

- `task="subject"`: one label per sentence, the subject noun. "cat eat mouse" is labelled
  cat, "mouse eat cat" mouse; each sentence's permutation has a different label.
- `task="roles"`: a label per token (subject / verb / object / modifier).

The vocabulary is the whole grammar, fixed and sorted, so ids never depend on which
sentences the seed happened to draw and `encode_sentence` works for any sentence of the
grammar. With `variable_length` an optional adjective may precede each noun
("big cat eat small mouse"), giving 3 to 5 words.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import numpy as np

from distshare.config import DataConfig
from distshare.data.types import DataInfo
from distshare.errors import ConfigError

if TYPE_CHECKING:
    import datasets

NOUNS = ("cat", "mouse", "dog", "bird", "fish", "fox")
VERBS = ("eat", "chase", "see", "bite")
ADJECTIVES = ("big", "small", "black", "white")
ROLES = ("subject", "verb", "object", "modifier")
PAD = "<pad>"
VOCAB = (PAD, *sorted(NOUNS + VERBS + ADJECTIVES))
TASKS = ("subject", "roles")
ADJECTIVE_P = 0.5  # variable_length: chance that a noun gets an adjective

_SUBJECT, _VERB, _OBJECT, _MODIFIER = range(len(ROLES))
_ID = {word: i for i, word in enumerate(VOCAB)}


def max_words(variable_length: bool) -> int:
    """Longest sentence the grammar can produce: a property of the grammar, not of a sample."""
    return 5 if variable_length else 3


def build_svo(data: DataConfig) -> tuple[datasets.Dataset, DataInfo]:
    """Draw `data.num_samples` sentences from `data.seed`; columns text, input_ids, label(s)."""
    import datasets  # where a data set is built, not at import: see distshare.data

    if data.task not in TASKS:
        raise ConfigError("data.task", f"unknown svo task {data.task!r}; expected one of {', '.join(TASKS)}")
    rng = np.random.default_rng(data.seed)
    n = data.num_samples
    subject = rng.integers(len(NOUNS), size=n)
    # An offset in 1..len-1 makes the object uniform over the *other* nouns: subject != object.
    obj = (subject + rng.integers(1, len(NOUNS), size=n)) % len(NOUNS)
    verb = rng.integers(len(VERBS), size=n)
    has_adj = rng.random((n, 2)) < ADJECTIVE_P if data.variable_length else np.zeros((n, 2), dtype=bool)
    adj = rng.integers(len(ADJECTIVES), size=(n, 2))

    texts, ids, roles = [], [], []
    for i in range(n):
        words: list[str] = []
        tags: list[int] = []
        for slot, (noun, role) in enumerate(((subject[i], _SUBJECT), (obj[i], _OBJECT))):
            if has_adj[i, slot]:
                words.append(ADJECTIVES[adj[i, slot]])
                tags.append(_MODIFIER)
            words.append(NOUNS[noun])
            tags.append(role)
            if slot == 0:
                words.append(VERBS[verb[i]])
                tags.append(_VERB)
        texts.append(" ".join(words))
        ids.append([_ID[w] for w in words])
        roles.append(tags)

    columns: dict[str, list] = {"text": texts, "input_ids": ids}
    if data.task == "subject":
        columns["label"] = subject.tolist()
        info = DataInfo("text", "sequence", len(NOUNS), NOUNS, VOCAB, max_words(data.variable_length))
    else:
        columns["labels"] = roles
        info = DataInfo("text", "token", len(ROLES), ROLES, VOCAB, max_words(data.variable_length))
    return datasets.Dataset.from_dict(columns), info


def encode_sentence(text: str, info: DataInfo) -> list[int]:
    """Ids of a whitespace-separated sentence, unpadded, for demos ("cat eat mouse").

    Raises:
        ValueError: a word is not in `info.vocab`, or the sentence is longer than
            `info.max_len` (the model's positions stop there).
    """
    index = {word: i for i, word in enumerate(info.vocab)}
    words = text.lower().split()
    unknown = [w for w in words if w not in index or w == info.vocab[0]]
    if unknown:
        known = ", ".join(w for w in info.vocab[1:])
        raise ValueError(f"unknown word(s) {', '.join(map(repr, unknown))}; the vocabulary is: {known}")
    if not words or len(words) > info.max_len:
        raise ValueError(f"expected 1 to {info.max_len} words, got {len(words)}: {text!r}")
    return [index[w] for w in words]


def mirror_pairs() -> list[tuple[str, str]]:
    """Every pair ("cat eat mouse", "mouse eat cat") of the fixed-length grammar, once, in a fixed order.

    The two sentences of a pair hold the same words in another order, with different subjects:
    an answer blind to word order is right on at most one of them.
    """
    return [
        (f"{s} {v} {o}", f"{o} {v} {s}")
        for s, o in itertools.combinations(NOUNS, 2)  # s before o in NOUNS: each pair once
        for v in VERBS
    ]
