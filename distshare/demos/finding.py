"""What one experiment hands back: the seed's question, the claim, and the verdicts.

A claim that cannot fail proves nothing, so every finding carries the claim's own verdict
(`holds` when the measured numbers satisfy it) and one or more controls: the same test run
where the claim is false for a real reason (a fair counterfactual: test-time adaptation, an
attention-ablated model, weights never synchronized), and, where training is what makes the
claim true, the untrained model. Every control must come out `fails`; a finding whose
control does not flip is itself a failure of the demo.

Each demo also names its mutants (`MUTANTS` in its module, `run(..., mutant=name)`): faults
injected into the experiment itself that must turn the claim's own verdict to `fails`
(`distshare selftest` runs them all). Where part of a claim is true by construction (an
`nn.Module` has one storage per parameter whatever the batch), the finding says so in
`by_construction` instead of dressing it up as an experiment.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

HOLDS, FAILS = "holds", "fails"


def verdict(ok: bool) -> str:
    """`holds` or `fails`: the only two words a verdict may be."""
    return HOLDS if ok else FAILS


@dataclass
class Control:
    """The claim's test, run on a counterfactual where the claim is false: must come out `fails`."""

    name: str  # short, for tables: "untrained", "test-time adaptation"
    what: str  # what is different, in one line
    verdict: str  # holds | fails (should be fails)
    numbers: dict[str, Any] = field(default_factory=dict)  # its measurements, beside the claim's

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Finding:
    """One experiment's result, as written to result.json and report.md."""

    name: str  # the demo's name on the command line
    question: str  # the seed's own question, quoted
    claim: str  # the answer's claim, stated so that it can be measured
    verdict: str  # holds | fails: the claim on the real mechanism
    controls: list[Control]  # counterfactuals, each of which must fail the same test
    numbers: dict[str, Any] = field(default_factory=dict)  # the measurements behind the claim's verdict
    figure: str | None = None  # PNG file name inside the run directory
    headline: str = ""  # one line for the terminal table: the key number
    by_construction: str = ""  # what part of the claim holds by construction, not by experiment
    mutant: str | None = None  # the injected fault this run carried (selftest), None for the real run

    @property
    def control_verdict(self) -> str:
        """`fails` when every control fails, else `holds`: the column the tables show."""
        return FAILS if self.controls and all(c.verdict == FAILS for c in self.controls) else HOLDS

    @property
    def ok(self) -> bool:
        """The demo succeeded: the claim holds and every control flips."""
        return self.verdict == HOLDS and self.control_verdict == FAILS

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["control_verdict"] = self.control_verdict
        return d
