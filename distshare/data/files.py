"""A local csv / json / jsonl / parquet file as a text classification data set.

The file goes through `datasets.load_dataset(<builder>, data_files=path)`, the way users
already load their data, but kept in memory with a throw-away cache directory so nothing
is left in ~/.cache. Every way a file can be wrong becomes a one-line `UsageError` or
`ConfigError` naming the file or the field, never a traceback from deep inside pyarrow.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from distshare.config import DataConfig
from distshare.data.types import DataInfo
from distshare.errors import ConfigError, UsageError

if TYPE_CHECKING:
    import datasets

BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
MAX_TOKENS = 64  # longer texts are truncated: every sample is padded to max_len, so keep it small
PAD, UNK = "<pad>", "<unk>"


def build_file(data: DataConfig) -> tuple[datasets.Dataset, DataInfo]:
    """Read `data.path`; columns text, input_ids, label (labels as given if int, else sorted names)."""
    import datasets  # where a data set is built, not at import: see distshare.data

    raw = _load(data.path)
    for field, column in (("data.text_field", data.text_field), ("data.label_field", data.label_field)):
        if column not in raw.column_names:
            found = ", ".join(raw.column_names)
            raise ConfigError(field, f"column {column!r} not found in {data.path}; columns found: {found}")
    texts = raw[data.text_field][:]
    labels, names = _labels(list(raw[data.label_field][:]), data)
    tokens = []
    for i, text in enumerate(texts):
        if text is not None and not isinstance(text, str):
            raise UsageError(f"{data.path}: row {i}: {data.text_field!r} is {text!r}, expected text")
        # An empty text (an empty csv cell reads as None) still gets one token: a row of
        # padding only would leave attention no key to attend to.
        tokens.append((text or "").split()[:MAX_TOKENS] or [UNK])
    vocab = (PAD, UNK, *sorted({t for ts in tokens for t in ts} - {PAD, UNK}))
    index = {t: i for i, t in enumerate(vocab)}
    ds = datasets.Dataset.from_dict(
        {
            "text": [" ".join(ts) for ts in tokens],
            "input_ids": [[index[t] for t in ts] for ts in tokens],
            "label": labels,
        }
    )
    max_len = max(len(ts) for ts in tokens)
    return ds, DataInfo("text", "sequence", len(names), names, vocab, max_len)


def _load(path: str | None) -> datasets.Dataset:
    import datasets  # where a data set is built, not at import: see distshare.data

    if not path:
        raise ConfigError("data.path", "data.name is 'file': give the path of a csv/json/parquet file")
    p = Path(path)
    builder = BUILDERS.get(p.suffix.lower())
    if builder is None:
        raise ConfigError("data.path", f"unsupported extension {p.suffix!r}; expected one of {', '.join(BUILDERS)}")
    if not p.is_file():
        raise ConfigError("data.path", f"no such file: {path}")
    if p.stat().st_size == 0:
        raise UsageError(f"data file {path} is empty")
    datasets.disable_progress_bars()
    # datasets logs a parse failure itself before raising; we report it in one line below.
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="distshare-") as cache:
        try:
            ds = datasets.load_dataset(builder, data_files=str(p), split="train", keep_in_memory=True, cache_dir=cache)
        except Exception as exc:  # pyarrow, pandas and datasets each raise their own kinds
            if "corresponds to no data" in str(exc):  # e.g. a csv with a header and no rows
                raise UsageError(f"data file {path} has no rows") from None
            raise UsageError(f"cannot read {path} as {builder}: {_reason(exc)}") from None
        finally:
            datasets.logging.set_verbosity(verbosity)
    if len(ds) == 0:
        raise UsageError(f"data file {path} has no rows")
    return ds


def _labels(values: list, data: DataConfig) -> tuple[list[int], tuple[str, ...]]:
    """Integer labels are kept (classes 0..max); string labels become indices of sorted names."""
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if min(values) < 0:
            raise UsageError(f"{data.path}: column {data.label_field!r} has negative label {min(values)}")
        return values, tuple(str(c) for c in range(max(values) + 1))
    if all(isinstance(v, str) for v in values):
        names = tuple(sorted(set(values)))
        index = {name: i for i, name in enumerate(names)}
        return [index[v] for v in values], names
    kinds = sorted({type(v).__name__ for v in values})
    raise UsageError(
        f"{data.path}: column {data.label_field!r} must hold all integers or all strings, found {', '.join(kinds)}"
    )


def _reason(exc: BaseException) -> str:
    """The innermost cause's first line: datasets wraps the parser's own, more useful message."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return lines[0][:200]
