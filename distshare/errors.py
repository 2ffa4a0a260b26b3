"""The errors distshare raises on purpose, each with the exit code the CLI turns it into.

A user's mistake (bad config, missing path, wrong argument) is a `UsageError`: the CLI
prints its one-line message and exits 2, never a traceback. A check that ran and did not
hold is a `VerificationFailed`: exit 1.
"""

from __future__ import annotations


class DistshareError(Exception):
    """Base of every error distshare raises deliberately."""

    exit_code = 1


class UsageError(DistshareError):
    """Bad input from the user: config, path, argument. Exit code 2, one line."""

    exit_code = 2


class ConfigError(UsageError):
    """A config field holds something it cannot; the message names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"config field '{field}': {problem}")
        self.field = field
        self.problem = problem


class VerificationFailed(DistshareError):
    """A check ran and did not hold (replicas diverged, equivalence broken). Exit code 1."""

    exit_code = 1


class RankError(DistshareError):
    """A simulated or launched rank failed; carries the rank and its traceback text."""

    def __init__(self, rank: int, message: str, traceback_text: str = "", exit_code: int = 1) -> None:
        super().__init__(f"[rank {rank}] {message}")
        self.rank = rank
        self.traceback_text = traceback_text
        self.exit_code = exit_code  # a user mistake found inside a rank is still exit code 2
