"""The errors distshare raises on purpose, each with the exit code the CLI turns it into.

A user's mistake (bad config, missing path, wrong argument) is a `UsageError`: the CLI
prints its one-line message and exits 2, never a traceback. A check that ran and did not
hold is a `VerificationFailed`: exit 1.
"""

from __future__ import annotations


class DistshareError(Exception):
    """Base of every error distshare raises deliberately."""

    exit_code = 1

    def __str__(self) -> str:
        # One line, always: a user's key, path or value may hold a newline or another
        # control character, which is shown escaped (as Python writes it) instead.
        return one_line(super().__str__())


def one_line(text: str) -> str:
    """`text` with every line break and unprintable character escaped (`\\n`, `\\x00`)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


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


class RankSilent(DistshareError):
    """Ranks stopped taking part: their peers' collectives timed out waiting for them. Exit 1.

    Found by the survivors (`distshare.distributed.watchdog`); `reporter` marks the one survivor
    that speaks for all of them (the lowest surviving rank), so the line is printed once.
    """

    exit_code = 1

    def __init__(self, ranks: list[int], step: int | None, timeout_s: float, reporter: bool = True, when: str = ""):
        self.ranks, self.step, self.timeout_s, self.reporter = list(ranks), step, timeout_s, reporter
        who = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(str(r) for r in ranks)
        if not when:
            when = f"at step {step}" if step is not None else "before the first step"
        self.when = when
        super().__init__(f"{who} went silent {when} (no answer within {timeout_s:g} s)")

    def __reduce__(self):  # picklable with its fields (it crosses from a rank to its parent)
        return (type(self), (self.ranks, self.step, self.timeout_s, self.reporter, self.when))
