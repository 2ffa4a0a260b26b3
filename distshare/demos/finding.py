"""What one experiment hands back: the seed's question, the claim, and the verdicts.

A claim that cannot fail proves nothing, so every finding carries two verdicts: the claim's
own (`holds` when the measured numbers satisfy it) and its control's, the same test run on a
mechanism that is deliberately broken, which must come out `fails`. A finding whose control
does not flip is itself a failure of the demo.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

HOLDS, FAILS = "holds", "fails"


def verdict(ok: bool) -> str:
    """`holds` or `fails`: the only two words a verdict may be."""
    return HOLDS if ok else FAILS


@dataclass
class Finding:
    """One experiment's result, as written to result.json and report.md."""

    name: str  # the demo's name on the command line
    question: str  # the seed's own question, quoted
    claim: str  # the answer's claim, stated so that it can be measured
    verdict: str  # holds | fails: the claim on the real mechanism
    control: str  # what the control breaks
    control_verdict: str  # holds | fails: the same test on the broken mechanism (should fail)
    numbers: dict[str, Any] = field(default_factory=dict)  # the measurements behind both verdicts
    figure: str | None = None  # PNG file name inside the run directory
    headline: str = ""  # one line for the terminal table: the key number

    @property
    def ok(self) -> bool:
        """The demo succeeded: the claim holds and its control flips."""
        return self.verdict == HOLDS and self.control_verdict == FAILS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
