"""What a pitfall reports: the headline measurement, the check that caught it, the numbers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Pitfall:
    """One pitfall, measured against its correct version."""

    number: int
    name: str
    explanation: str
    discrepancy: str  # the headline measurement, one line
    detected_by: str  # grid | accounting | all-reduce count
    detected: bool  # the check flagged the pitfall (and passed the correct version)
    distshare_avoids: bool
    measured: dict[str, Any] = field(default_factory=dict)  # the numbers behind the headline

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
