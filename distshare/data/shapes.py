"""Small grayscale images with one pattern stamped at a random position.

The label is *which* pattern, never *where*: a conv layer, whose one kernel is shared by
every position, finds a cross at the top left with the same weights as at the bottom right
(translation equivariance). `row` and `col` are kept as columns so demos can group samples
by position, and `render` draws a noiseless pattern anywhere for shift experiments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from distshare.config import DataConfig
from distshare.data.types import DataInfo
from distshare.errors import ConfigError

if TYPE_CHECKING:
    import datasets

PATTERNS: dict[str, tuple[tuple[int, ...], ...]] = {
    "cross": ((0, 1, 0), (1, 1, 1), (0, 1, 0)),
    "square": ((1, 1, 1), (1, 0, 1), (1, 1, 1)),
    "hbar": ((0, 0, 0), (1, 1, 1), (0, 0, 0)),
    "vbar": ((0, 1, 0), (0, 1, 0), (0, 1, 0)),
    "diagonal": ((1, 0, 0), (0, 1, 0), (0, 0, 1)),
}
PATTERN_NAMES = tuple(PATTERNS)
PATTERN_SIZE = 3  # every pattern is a 3x3 stamp; (row, col) is its top-left pixel
NOISE_STD = 0.05  # light Gaussian noise on every pixel, so no two samples are identical

_STAMPS = np.array([PATTERNS[name] for name in PATTERN_NAMES], dtype=np.float32)


def render(pattern: int, row: int, col: int, size: int) -> np.ndarray:
    """A noiseless `[1, size, size]` float32 image with pattern number `pattern` at (row, col).

    Raises:
        ValueError: unknown pattern, or the stamp would not fit inside the image.
    """
    if not 0 <= pattern < len(PATTERN_NAMES):
        raise ValueError(f"pattern must be in 0..{len(PATTERN_NAMES) - 1} ({', '.join(PATTERN_NAMES)})")
    last = size - PATTERN_SIZE
    if not (0 <= row <= last and 0 <= col <= last):
        raise ValueError(f"a {PATTERN_SIZE}x{PATTERN_SIZE} pattern at ({row}, {col}) does not fit a {size}px image")
    image = np.zeros((1, size, size), dtype=np.float32)
    image[0, row : row + PATTERN_SIZE, col : col + PATTERN_SIZE] = _STAMPS[pattern]
    return image


def build_shapes(data: DataConfig) -> tuple[datasets.Dataset, DataInfo]:
    """Draw `data.num_samples` images from `data.seed`; columns image, label, row, col."""
    import datasets  # where a data set is built, not at import: see distshare.data

    n, size = data.num_samples, data.image_size
    if size < PATTERN_SIZE:
        raise ConfigError("data.image_size", f"expected at least {PATTERN_SIZE} pixels, got {size}")
    rng = np.random.default_rng(data.seed)
    label = rng.integers(len(PATTERN_NAMES), size=n)
    row = rng.integers(size - PATTERN_SIZE + 1, size=n)
    col = rng.integers(size - PATTERN_SIZE + 1, size=n)
    images = rng.normal(0.0, NOISE_STD, size=(n, 1, size, size)).astype(np.float32)
    for i in range(n):
        images[i] += render(int(label[i]), int(row[i]), int(col[i]), size)
    ds = datasets.Dataset.from_dict({"image": images, "label": label, "row": row, "col": col})
    info = DataInfo("image", "sequence", len(PATTERN_NAMES), PATTERN_NAMES, image_shape=(1, size, size))
    return ds, info
