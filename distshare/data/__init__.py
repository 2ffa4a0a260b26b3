"""Data sets as HF `datasets.Dataset`s, built offline and deterministically from a `DataConfig`.

`build_dataset(cfg)` gives the data set and its `DataInfo`; `TensorTable.from_dataset`
turns it into fixed-shape tensors once, and the global batch plan picks rows by index.
The same config gives the very same data set in every process, so ranks need not ship
data to each other: each builds it and takes its own rows.

    svo     subject-verb-object sentences, task subject | roles   (corpus.py)
    shapes  patterns stamped at random positions                  (shapes.py)
    digits  scikit-learn's bundled 8x8 digits                      (real.py)
    pydoc   windows of CPython's pydoc topics, label = topic       (real.py)
    file    a local csv / json / jsonl / parquet file              (files.py)

`datasets` (with pandas and pyarrow: 1.5 s) is imported inside the functions that build a data
set, not at module import: `distshare --help`, a refused command and a launcher's parent
process never build one, and start that much sooner.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distshare.config import DataConfig
from distshare.data.corpus import build_svo, encode_sentence
from distshare.data.files import build_file
from distshare.data.real import build_digits, build_pydoc
from distshare.data.shapes import build_shapes, render
from distshare.data.tensors import TensorTable
from distshare.data.types import IGNORE_INDEX, Batch, DataInfo
from distshare.errors import ConfigError

if TYPE_CHECKING:
    import datasets

BUILDERS = {
    "svo": build_svo,
    "shapes": build_shapes,
    "digits": build_digits,
    "pydoc": build_pydoc,
    "file": build_file,
}

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "DataInfo",
    "TensorTable",
    "build_dataset",
    "encode_sentence",
    "render",
]


def build_dataset(cfg: DataConfig) -> tuple[datasets.Dataset, DataInfo]:
    """Build the data set `cfg` names; same config, same data set, in any process.

    Raises:
        ConfigError: unknown `data.name`, bad `data.num_samples`, or (svo) unknown `data.task`.
        UsageError: a file that cannot be used, or scikit-learn missing for digits.
    """
    import datasets  # where a data set is built, not at import: see distshare.data

    builder = BUILDERS.get(cfg.name)
    if builder is None:
        raise ConfigError("data.name", f"unknown value {cfg.name!r}; expected one of {', '.join(BUILDERS)}")
    if cfg.num_samples <= 0:
        raise ConfigError("data.num_samples", f"expected a positive integer, got {cfg.num_samples}")
    datasets.disable_progress_bars()
    return builder(cfg)
