"""Real data that ships offline: scikit-learn's digits and CPython's own pydoc topics.

Nothing here touches the network: `load_digits` reads a file bundled with scikit-learn
(never the `fetch_*` functions, which download), and `pydoc_data.topics` is part of the
standard library. The pydoc text comes with the running Python, so the same seed gives the
same data set on the same Python version.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from distshare.config import DataConfig
from distshare.data.types import DataInfo
from distshare.errors import UsageError

if TYPE_CHECKING:
    import datasets

PYDOC_TOPICS = 4  # classes: the largest topics by word count
PYDOC_WINDOW = 12  # words per sample; every sample has exactly this many tokens
PYDOC_VOCAB = 500  # most frequent words kept; the rest become <unk>
_WORD = re.compile(r"[a-z0-9_]+")


def build_digits(data: DataConfig) -> tuple[datasets.Dataset, DataInfo]:
    """At most `data.num_samples` 8x8 digits in a seeded order; columns image ([1][8][8], 0..1), label."""
    import datasets  # where a data set is built, not at import: see distshare.data

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError("the digits data set needs scikit-learn: pip install 'distshare[digits]'") from None
    bunch = load_digits()
    order = np.random.default_rng(data.seed).permutation(len(bunch.target))[: data.num_samples]
    images = (bunch.images[order] / 16.0).astype(np.float32)[:, None]  # 0..16 -> 0..1, add channel
    ds = datasets.Dataset.from_dict({"image": images, "label": bunch.target[order].astype(np.int64)})
    names = tuple(str(d) for d in range(10))
    return ds, DataInfo("image", "sequence", 10, names, image_shape=(1, 8, 8))


def build_pydoc(data: DataConfig) -> tuple[datasets.Dataset, DataInfo]:
    """Which pydoc topic does a 12-word window come from? Columns text, input_ids, label.

    Samples are drawn round-robin over the topics so that the classes stay balanced while
    `num_samples` allows it; the vocabulary counts every window of the chosen topics, so it
    does not depend on which windows were drawn.
    """
    import pydoc_data.topics

    import datasets  # where a data set is built, not at import: see distshare.data

    words = {name: _WORD.findall(text.lower()) for name, text in pydoc_data.topics.topics.items()}
    names = tuple(sorted(words, key=lambda name: (-len(words[name]), name))[:PYDOC_TOPICS])
    counts = Counter(w for name in names for w in words[name])
    top = sorted(counts, key=lambda w: (-counts[w], w))[:PYDOC_VOCAB]
    vocab = ("<pad>", "<unk>", *top)
    index = {w: i for i, w in enumerate(vocab)}

    rng = np.random.default_rng(data.seed)
    per_topic = []
    for label, name in enumerate(names):
        ws = words[name]
        windows = [ws[i : i + PYDOC_WINDOW] for i in range(0, len(ws) - PYDOC_WINDOW + 1, PYDOC_WINDOW)]
        per_topic.append([(windows[j], label) for j in rng.permutation(len(windows))])
    longest = max(len(p) for p in per_topic)
    interleaved = [p[i] for i in range(longest) for p in per_topic if i < len(p)]
    chosen = [interleaved[j] for j in rng.permutation(min(data.num_samples, len(interleaved)))]

    ds = datasets.Dataset.from_dict(
        {
            "text": [" ".join(w) for w, _ in chosen],
            "input_ids": [[index.get(x, 1) for x in w] for w, _ in chosen],
            "label": [label for _, label in chosen],
        }
    )
    return ds, DataInfo("text", "sequence", len(names), names, vocab, PYDOC_WINDOW)
