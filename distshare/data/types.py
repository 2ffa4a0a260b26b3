"""What a data set tells the rest of distshare, and the batch the step consumes.

Every data set is an HF `datasets.Dataset`; `DataInfo` carries what a model needs to be
built for it (vocabulary, classes, shapes), and `Batch` is a slice of the data set already
as tensors, with the number of loss items it holds (samples, or tokens for per-token tasks)
so the step can normalize by the count of the *whole global batch*.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # label of a padding position: excluded from the loss and from item counts


@dataclass(frozen=True)
class DataInfo:
    """Shape of a data set, enough to build a model for it."""

    kind: str  # "text" | "image"
    task: str  # "sequence" (one label per sample) | "token" (one label per token)
    num_classes: int
    class_names: tuple[str, ...] = ()
    vocab: tuple[str, ...] = ()  # text: id -> token; id 0 is the padding token "<pad>"
    max_len: int = 0  # text: every sample is padded to this length (fixed shapes, see tensors.py)
    image_shape: tuple[int, int, int] = (0, 0, 0)  # image: (channels, height, width)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


@dataclass
class Batch:
    """Model inputs (keyword arguments of `model.forward`), labels and loss-item count."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor  # [B] or [B, T] with IGNORE_INDEX at padding
    indices: torch.Tensor  # global sample indices this batch holds, for accounting

    @property
    def num_items(self) -> int:
        """Loss items (non-ignored labels) in this batch; counted only when asked for."""
        return int((self.labels != IGNORE_INDEX).sum())

    def __len__(self) -> int:
        return int(self.indices.numel())

    def to(self, device: torch.device) -> Batch:
        """The same batch with inputs and labels on `device` (a no-op on the CPU)."""
        if device.type == "cpu":
            return self
        inputs = {k: v.to(device, non_blocking=True) for k, v in self.inputs.items()}
        return Batch(inputs, self.labels.to(device, non_blocking=True), self.indices)
