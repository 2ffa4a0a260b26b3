"""The seed's questions, answered by experiment: one module per claim, each returning a `Finding`.

    distshare demo all            # every experiment, report.md with the seed's questions
    distshare demo context        # one of them

Every experiment runs on the CPU in seconds, deterministically from its seed, and carries a
control that breaks the mechanism it demonstrates: its verdict must flip, or the demo fails.
Modules are imported only when their demo runs, so `distshare --help` stays fast.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from distshare.demos.finding import FAILS, HOLDS, Control, Finding, verdict

# name on the command line -> module under distshare/demos, in the order of the seed's questions
DEMOS = {
    "qkv-shared": "qkv_shared",
    "conv-shared": "conv_shared",
    "one-weight-set": "one_weight_set",
    "accumulation": "accumulation",
    "fixed-after-training": "fixed_after_training",
    "context": "context",
    "heads-kernels": "heads_kernels",
}

__all__ = ["DEMOS", "FAILS", "HOLDS", "Control", "Finding", "mutants", "run_demo", "verdict"]


def run_demo(name: str, out_dir: Path, seed: int = 0, mutant: str | None = None) -> Finding:
    """Run one experiment; its figure is written into `out_dir`.

    `mutant` (one of `mutants(name)`) injects a fault into the experiment itself: the
    claim's verdict must then come out `fails` (`distshare selftest`).

    Raises:
        KeyError: `name` is not one of `DEMOS`, or `mutant` not one of its mutants.
    """
    module = importlib.import_module(f"distshare.demos.{DEMOS[name]}")
    if mutant is None:
        return module.run(out_dir, seed)
    if mutant not in module.MUTANTS:
        raise KeyError(f"demo {name!r} has no mutant {mutant!r}; it has: {', '.join(module.MUTANTS)}")
    finding = module.run(out_dir, seed, mutant=mutant)
    finding.mutant = mutant  # the record names the fault it carried, whichever demo ran it
    return finding


def mutants(name: str) -> dict[str, str]:
    """The faults demo `name` can inject into its own experiment: name -> what it breaks."""
    return dict(getattr(importlib.import_module(f"distshare.demos.{DEMOS[name]}"), "MUTANTS", {}))
