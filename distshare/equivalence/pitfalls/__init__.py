"""The ways real training code breaks "k micro-batches on W ranks == one big batch".

    distshare equivalence --pitfalls

Each pitfall runs on small data in seconds, side by side with the correct version, and is
caught by a check that does not know it is there: the partition grid (a gradient further
from the big-batch gradient than rounding allows), the sample accounting (a sample counted
zero times or twice), or a count of all-reduces. The record (`Pitfall`) says what was
measured and whether distshare's own step avoids it. Every wrong step is distshare's one
step with one ingredient swapped.

    1 token normalization   mean loss per micro-batch / k, with variable-length sequences
    2 accumulation scale    forgetting to divide by k, or dividing twice
    3 DistributedSampler    padding repeats samples; drop_last drops them
    4 BatchNorm             batch statistics depend on the split (SyncBatchNorm: ranks only)
    5 dropout               the random masks depend on the split
    6 forward outside no_sync  DDP syncs at every micro-batch
    7 summed loss + DDP average  the gradient is divided by W once too often
    8 Join with uneven inputs  divides by the initial world size

`grid.py` holds 1-5, `ddp.py` 6-8 (2 spawned gloo ranks, real DistributedDataParallel),
`record.py` the record.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from tqdm import tqdm

from distshare.equivalence.pitfalls.ddp import ddp_pitfalls
from distshare.equivalence.pitfalls.grid import (
    KS,
    DropoutMLP,
    G,
    MicroMeanTask,
    accumulation_scale,
    batchnorm,
    distributed_sampler,
    dropout,
    dropout_model,
    keyed_dropout_model,
    mlp_loss,
    token_normalization,
    toy_dataset,
)
from distshare.equivalence.pitfalls.record import Pitfall

__all__ = [
    "G",
    "KS",
    "PITFALLS",
    "DropoutMLP",
    "MicroMeanTask",
    "Pitfall",
    "accumulation_scale",
    "batchnorm",
    "ddp_pitfalls",
    "distributed_sampler",
    "dropout",
    "dropout_model",
    "keyed_dropout_model",
    "mlp_loss",
    "run_pitfalls",
    "token_normalization",
    "toy_dataset",
]

PITFALLS: tuple[Callable[[], Pitfall], ...] = (
    token_normalization,
    accumulation_scale,
    distributed_sampler,
    batchnorm,
    dropout,
)


def run_pitfalls(progress: bool = True, timeout_s: float = 120.0) -> list[Pitfall]:
    """Every pitfall, in order; the three DDP ones share one spawn of 2 ranks."""
    out = []
    with _bar(len(PITFALLS) + 1, progress) as bar:
        for fn in PITFALLS:
            out.append(fn())
            bar.update(1)
        out.extend(ddp_pitfalls(timeout_s))
        bar.update(1)
    return out


@contextlib.contextmanager
def _bar(total: int, progress: bool) -> Iterator[tqdm]:
    bar = tqdm(total=total, desc="pitfalls", unit="pitfall", disable=not progress, leave=False)
    try:
        yield bar
    finally:
        bar.close()
