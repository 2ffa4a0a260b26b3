"""The data set materialized once as tensors, so a micro-batch is one indexing operation.

Two reasons not to index the HF `Dataset` at every step: it is slow (Arrow -> Python ->
tensor per sample), and it would pad each batch to its own longest sample. Here every text
sample is padded to `info.max_len`, always, so a sample's forward pass has the same shapes
whichever micro-batch, rank or accumulation step it lands in; that is what lets
"4 ranks x 2 micro-steps" be compared with "1 process x 1 big batch" sample by sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from distshare.data.types import IGNORE_INDEX, Batch, DataInfo

if TYPE_CHECKING:
    import datasets


@dataclass
class TensorTable:
    """Inputs, labels and loss-item counts of every sample, indexed by global sample index."""

    info: DataInfo
    inputs: dict[str, torch.Tensor]  # {"input_ids", "pad_mask"} [N, T] or {"image"} [N, C, H, W]
    labels: torch.Tensor  # [N], or [N, T] with IGNORE_INDEX at padding (token tasks)
    items: torch.Tensor  # [N] loss items per sample: 1, or the number of labelled tokens

    @classmethod
    def from_dataset(cls, ds: datasets.Dataset, info: DataInfo, dtype: torch.dtype) -> TensorTable:
        """Convert a data set built by `build_dataset`; `dtype` is the image dtype (text ids are int64)."""
        columns = ds.with_format("numpy")[:] if info.kind == "image" else ds[:]
        if info.kind == "image":
            image = np.asarray(columns["image"])
            inputs = {"image": torch.tensor(image, dtype=dtype).reshape(len(ds), *info.image_shape)}
        else:
            ids = columns["input_ids"]
            inputs = {"input_ids": _pad(ids, info.max_len, 0), "pad_mask": _pad_mask(ids, info.max_len)}
        if info.task == "token":
            labels = _pad(columns["labels"], info.max_len, IGNORE_INDEX)
            items = (labels != IGNORE_INDEX).sum(dim=1)
        else:
            labels = torch.as_tensor(np.asarray(columns["label"], dtype=np.int64))
            items = torch.ones(len(ds), dtype=torch.long)
        return cls(info, inputs, labels, items)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, indices: Sequence[int] | torch.Tensor) -> Batch:
        """The samples at `indices` as a `Batch`; an empty selection gives 0 rows of the right shape."""
        idx = _as_index(indices)
        return Batch(
            inputs={name: t[idx] for name, t in self.inputs.items()},
            labels=self.labels[idx],
            indices=idx,
        )

    def count_items(self, indices: Sequence[int] | torch.Tensor) -> int:
        """Loss items at `indices`, without gathering inputs: what the global normalizer sums."""
        # numpy, not torch: this runs every step on the whole global batch, and for a few
        # dozen indices torch's per-call overhead dominates.
        return int(self.items.cpu().numpy()[np.asarray(indices, dtype=np.int64)].sum())


def _as_index(indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
    if isinstance(indices, torch.Tensor):
        return indices.to(torch.long).reshape(-1)
    # A copy: plan indices are views of a read-only permutation, which torch will not wrap.
    return torch.tensor(np.asarray(indices, dtype=np.int64).reshape(-1))


def _lengths(rows: Sequence[Sequence[int]], max_len: int) -> np.ndarray:
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    if lengths.size and lengths.max() > max_len:
        raise ValueError(f"a sample has {lengths.max()} tokens, more than info.max_len={max_len}")
    return lengths


def _pad_mask(rows: Sequence[Sequence[int]], max_len: int) -> torch.Tensor:
    """True at real tokens: position t of a row is real when t < its length."""
    lengths = _lengths(rows, max_len)
    return torch.as_tensor(np.arange(max_len)[None, :] < lengths[:, None])


def _pad(rows: Sequence[Sequence[int]], max_len: int, fill: int) -> torch.Tensor:
    """Right-pad every row to `max_len` with `fill` ([N, max_len] int64), in one vectorized write."""
    lengths = _lengths(rows, max_len)
    out = np.full((len(rows), max_len), fill, dtype=np.int64)
    out[np.arange(max_len)[None, :] < lengths[:, None]] = np.fromiter(
        (x for r in rows for x in r), dtype=np.int64, count=int(lengths.sum())
    )
    return torch.as_tensor(out)
