"""Sample accounting: did every sample of a global batch count exactly once?

Each rank records the global indices it actually consumed, micro-batch by micro-batch.
Put together, they must be exactly the plan's global batch: no sample missing, none
counted twice, and no two ranks sharing a sample (each worker sees different data).
`DistributedSampler` with `drop_last=False` fails this check by design: it pads the last
batch with repeated samples.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from distshare.data.plan import GlobalBatchPlan


@dataclass
class Accounting:
    """Result of checking what the ranks consumed against the plan."""

    steps: int = 0
    samples: int = 0
    missing: dict[int, list[int]] = field(default_factory=dict)  # step -> indices nobody used
    duplicated: dict[int, list[int]] = field(default_factory=dict)  # step -> indices used twice
    shared_between_ranks: dict[int, list[int]] = field(default_factory=dict)  # step -> indices

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
    acc = Accounting()
    steps = min(len(s) for s in samples_by_rank)
    acc.steps = steps
    for step in range(steps):
        expected = Counter(int(i) for i in plan.global_batch(step))
        seen: Counter[int] = Counter()
        owner: dict[int, set[int]] = {}
        for rank, by_step in enumerate(samples_by_rank):
            for micro in by_step[step]:
                for i in micro:
                    seen[i] += 1
                    owner.setdefault(i, set()).add(rank)
        acc.samples += sum(seen.values())
        missing = sorted(set(expected) - set(seen))
        twice = sorted(i for i, c in seen.items() if c > 1 or i not in expected)
        shared = sorted(i for i, ranks in owner.items() if len(ranks) > 1)
        if missing:
            acc.missing[step] = missing
        if twice:
            acc.duplicated[step] = twice
        if shared:
            acc.shared_between_ranks[step] = shared
    return acc
