"""A small CNN: two conv stages, then one linear classifier.

Each conv kernel is one small tensor slid over every position of every image; that sharing
across space (and across the samples of a batch) is what the conv demos measure. `norm`
chooses what follows each conv, because the choice matters to distributed training: batch
norm keeps running statistics in *buffers* that change in train mode (even at inference) and
that each rank computes from its own micro-batch, while group norm has no such state.
"""

from __future__ import annotations

from torch import Tensor, nn

from distshare.data.types import DataInfo


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(2, channels)
    raise ValueError(f"unknown norm {kind!r}; expected none, batch or group")


class SmallCNN(nn.Module):
    """conv -> norm -> ReLU -> pool, twice (c then 2c filters), flatten, linear."""

    def __init__(self, info: DataInfo, channels: int = 8, kernel_size: int = 3, norm: str = "none") -> None:
        super().__init__()
        c_in, height, width = info.image_shape
        if height < 4 or width < 4:
            raise ValueError(f"images of {height}x{width} pixels are too small: two 2x2 poolings need 4x4")
        if kernel_size % 2 == 0:  # padding k//2 keeps the size only for odd k; even k grows it by one
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        pad = kernel_size // 2
        self.features = nn.Sequential(
            nn.Conv2d(c_in, channels, kernel_size, padding=pad),
            _norm(norm, channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, kernel_size, padding=pad),
            _norm(norm, 2 * channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        # Each MaxPool2d(2) floors, so a 13x7 image ends as 3x1: floor(floor(n / 2) / 2) = n // 4.
        self.head = nn.Linear(2 * channels * (height // 4) * (width // 4), info.num_classes)

    def forward(self, image: Tensor) -> Tensor:
        """Logits [B, num_classes] for images [B, C, H, W] of the shape the model was built for."""
        return self.head(self.features(image).flatten(1))
