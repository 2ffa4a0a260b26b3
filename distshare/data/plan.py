"""The global batch plan: which global sample goes to which (step, rank, micro-step).

This is the truth the whole toolkit stands on. A step consumes one *global batch* of
`G = W x k x b` samples; which samples those are depends only on (seed, epoch, position),
never on W or k, so "4 ranks x 2 micro-steps" and "1 process x 1 big batch" see the very
same global batches and their results can be compared. Within a global batch, rank r's
micro-step m takes the consecutive slice number `r * k + m`.

Unlike `torch.utils.data.DistributedSampler`, nothing is padded or repeated to even out
ranks: every sample of an epoch is used at most once. The last incomplete global batch of
an epoch is dropped (`drop_last=True`, the default) or split as evenly as possible over the
W x k slots, some of which may then be empty; the step normalizes by the global item count,
so the gradient is still the large-batch gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from distshare.config import ResolvedPlan
from distshare.errors import ConfigError


@dataclass(frozen=True)
class GlobalBatchPlan:
    """A pure function from (step, rank, micro) to global sample indices."""

    num_samples: int
    plan: ResolvedPlan
    seed: int = 0
    drop_last: bool = True

    def __post_init__(self) -> None:
        if self.num_samples < self.plan.global_batch and self.drop_last:
            raise ConfigError(
                "plan.global_batch",
                f"{self.plan.global_batch} is larger than the data set ({self.num_samples} samples): "
                "no complete global batch; lower it or set plan.drop_last=false",
            )

    @property
    def steps_per_epoch(self) -> int:
        g = self.plan.global_batch
        return self.num_samples // g if self.drop_last else -(-self.num_samples // g)

    @property
    def dropped_per_epoch(self) -> int:
        """Samples of each epoch that no step uses (the tail of an incomplete last batch)."""
        return self.num_samples - self.steps_per_epoch * self.plan.global_batch if self.drop_last else 0

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The shuffled sample order of one epoch; read-only, shared by every caller."""
        return _permutation(self.num_samples, self.seed, epoch)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, index of the global batch within that epoch) of a step."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return divmod(step, self.steps_per_epoch)

    def global_batch(self, step: int) -> np.ndarray:
        """Global sample indices consumed by `step`, the same for every W and k."""
        epoch, pos = self.position(step)
        g = self.plan.global_batch
        return self.epoch_order(epoch)[pos * g : (pos + 1) * g]

    def slots(self, step: int) -> list[np.ndarray]:
        """The global batch cut into W x k consecutive slots; slot r * k + m is (rank r, micro m)."""
        batch = self.global_batch(step)
        n_slots = self.plan.world_size * self.plan.accum_steps
        if len(batch) == self.plan.global_batch:
            b = self.plan.micro_batch
            return [batch[i * b : (i + 1) * b] for i in range(n_slots)]
        return list(np.array_split(batch, n_slots))

    def micro_batch(self, step: int, rank: int, micro: int) -> np.ndarray:
        """Global indices of rank `rank`'s micro-step `micro` at `step`."""
        if not 0 <= rank < self.plan.world_size:
            raise ValueError(f"rank {rank} outside world of size {self.plan.world_size}")
        if not 0 <= micro < self.plan.accum_steps:
            raise ValueError(f"micro-step {micro} outside 0..{self.plan.accum_steps - 1}")
        return self.slots(step)[rank * self.plan.accum_steps + micro]

    def rank_micro_batches(self, step: int, rank: int) -> list[np.ndarray]:
        """All k micro-batches of one rank at `step`, in the order they run."""
        k = self.plan.accum_steps
        return self.slots(step)[rank * k : (rank + 1) * k]


@lru_cache(maxsize=8)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    # numpy's PCG64 stream is stable across numpy versions and platforms, unlike
    # torch.randperm, so the plan is reproducible wherever distshare runs.
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.setflags(write=False)
    return order
