"""Sample accounting: did every sample of a global batch count exactly once?

Each rank records the global indices it actually consumed, micro-batch by micro-batch.
Put together, they must be exactly the plan's global batch: no sample missing, none
counted twice, and no two ranks sharing a sample (each worker sees different data).
`DistributedSampler` with `drop_last=False` fails this check by design: it pads the last
batch with repeated samples (and with `drop_last=True` it leaves samples out):
`distributed_sampler_indices` runs torch's real sampler and `account_epoch` counts what it
yields.

Each step's counts are kept as a histogram {times counted: number of samples}: {1: 32} is
a healthy global batch of 32; {1: 40, 2: 2} has two samples whose gradient counted twice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from torch.utils.data import DistributedSampler

from distshare.data.plan import GlobalBatchPlan


@dataclass
class Accounting:
    """Result of checking what the ranks consumed against the plan."""

    steps: int = 0
    samples: int = 0
    missing: dict[int, list[int]] = field(default_factory=dict)  # step -> indices nobody used
    duplicated: dict[int, list[int]] = field(default_factory=dict)  # step -> indices used twice
    shared_between_ranks: dict[int, list[int]] = field(default_factory=dict)  # step -> indices
    # step -> {times a sample counted: how many samples}; 0 = missing, 2 = counted twice
    count_histogram: dict[int, dict[int, int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.duplicated or self.shared_between_ranks)

    def summary(self) -> str:
        if self.ok:
            return f"{self.samples} samples over {self.steps} steps, each counted exactly once"
        parts = []
        for what, d in (
            ("missing", self.missing),
            ("counted twice", self.duplicated),
            ("shared between ranks", self.shared_between_ranks),
        ):
            if d:
                step = min(d)
                parts.append(f"{what} at {len(d)} step(s), first step {step}: {d[step][:5]}")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"ok": self.ok, **asdict(self)}


def account(plan: GlobalBatchPlan, samples_by_rank: list[list[list[list[int]]]]) -> Accounting:
    """Check `samples_by_rank[rank][step][micro]` against the plan's global batches."""
    steps = min(len(s) for s in samples_by_rank)
    return account_batches([[int(i) for i in plan.global_batch(step)] for step in range(steps)], samples_by_rank)


def account_batches(expected: Sequence[Sequence[int]], samples_by_rank: list[list[list[list[int]]]]) -> Accounting:
    """Check `samples_by_rank[rank][step][micro]` against the expected global batch of each step."""
    acc = Accounting()
    steps = min([len(expected), *(len(s) for s in samples_by_rank)])
    acc.steps = steps
    for step in range(steps):
        want = Counter(int(i) for i in expected[step])
        seen: Counter[int] = Counter()
        owner: dict[int, set[int]] = {}
        for rank, by_step in enumerate(samples_by_rank):
            for micro in by_step[step]:
                for i in micro:
                    seen[int(i)] += 1
                    owner.setdefault(int(i), set()).add(rank)
        acc.samples += sum(seen.values())
        missing = sorted(set(want) - set(seen))
        twice = sorted(i for i, c in seen.items() if c > 1 or i not in want)
        shared = sorted(i for i, ranks in owner.items() if len(ranks) > 1)
        histogram = Counter(seen[i] for i in want)
        histogram.update(seen[i] for i in seen if i not in want)
        acc.count_histogram[step] = dict(sorted(histogram.items()))
        if missing:
            acc.missing[step] = missing
        if twice:
            acc.duplicated[step] = twice
        if shared:
            acc.shared_between_ranks[step] = shared
    return acc


def account_epoch(num_samples: int, indices_by_rank: Sequence[Sequence[int]]) -> Accounting:
    """Check one epoch of a per-rank sampler: every sample of the data set exactly once."""
    return account_batches([range(num_samples)], [[[list(indices)]] for indices in indices_by_rank])


def distributed_sampler_indices(
    num_samples: int, world_size: int, drop_last: bool, shuffle: bool = True, seed: int = 0, epoch: int = 0
) -> list[list[int]]:
    """What torch's `DistributedSampler` gives each rank in one epoch (the real class, run per rank).

    With `drop_last=False` it pads to a multiple of `world_size` by repeating samples from
    the start of the order; with `drop_last=True` it cuts the tail instead.
    """
    out = []
    for rank in range(world_size):
        sampler = DistributedSampler(
            range(num_samples), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        sampler.set_epoch(epoch)
        out.append([int(i) for i in sampler])
    return out
