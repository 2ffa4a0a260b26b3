"""What every integration shares: its options, refused when the callback is built, and the watch.

A callback is built in the user's script before any rank trains; a bad option refused there
is one line (`UsageError`, exit code 2), not the same error raised later inside every rank's
training loop. `WatchingCallback` is the part of the Trainer and Lightning callbacks that is
the same: start a `distshare.watch` on the framework's model and optimizer, close it with a
last check at the end, and say so from rank 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from distshare.errors import UsageError
from distshare.integrity.replicas import BUFFER_MODES, GRAD_MODES, ReplicaReport
from distshare.integrity.watch import Watch, watch


def check_options(every: Any, grads: Any, buffers: Any) -> None:
    """Refuse an `every`, `grads` or `buffers` that `distshare.watch` cannot take (UsageError)."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise UsageError(f"every={every!r}: expected a positive whole number of optimizer steps (every=1 checks each)")
    if grads not in GRAD_MODES:
        raise UsageError(f"grads={grads!r}: expected True, False or 'on_divergence'")
    if buffers not in BUFFER_MODES:
        raise UsageError(f"buffers={buffers!r}: expected one of {', '.join(repr(m) for m in BUFFER_MODES)}")


class WatchingCallback:
    """The watch a framework callback places: options checked at once, started, closed, reported."""

    def __init__(
        self,
        every: int = 1,
        grads: bool | str = "on_divergence",
        buffers: str = "compare",
        locate: bool | int = 16,
        timeout_s: float = 300.0,
        verbose: bool = True,
    ) -> None:
        check_options(every, grads, buffers)
        self.every, self.grads, self.buffers = every, grads, buffers
        self.locate, self.timeout_s, self.verbose = locate, timeout_s, verbose
        self.watcher: Watch | None = None

    def _start(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, extra: Callable[[], Any] | None, main: bool
    ) -> None:
        """The baseline check (a collective) and the hooks for the checks after optimizer steps."""
        if self.watcher is not None:
            self.watcher.remove()  # a second train()/fit(): the last run's hooks go
        self.watcher = watch(
            model,
            optimizer,
            every=self.every,
            grads=self.grads,
            buffers=self.buffers,
            extra=extra,
            locate=self.locate,
            timeout_s=self.timeout_s,
        )
        self._say(main, "before the first step", self.watcher.reports[-1])

    def _finish(self, main: bool) -> None:
        """A last check if steps were taken since the last one; raises ReplicaDivergenceError."""
        if self.watcher is None:
            return
        report = self.watcher.close()
        self._say(main, f"after {self.watcher.iterations} optimizer steps", report or self.watcher.reports[-1])

    def _say(self, main: bool, when: str, report: ReplicaReport) -> None:
        if self.verbose and main and self.watcher is not None:
            checks = self.watcher.checks
            print(f"distshare: replicas in sync {when} ({checks} check(s)): {report.summary()}", flush=True)
