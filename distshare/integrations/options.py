"""The options every integration takes, refused when the callback is built.

A callback is built in the user's script before any rank trains; a bad option refused there
is one line (`UsageError`, exit code 2), not the same error raised later inside every rank's
training loop.
"""

from __future__ import annotations

from typing import Any

from distshare.errors import UsageError
from distshare.integrity.replicas import BUFFER_MODES, GRAD_MODES


def check_options(every: Any, grads: Any, buffers: Any) -> None:
    """Refuse an `every`, `grads` or `buffers` that `distshare.watch` cannot take (UsageError)."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise UsageError(f"every={every!r}: expected a positive whole number of optimizer steps (every=1 checks each)")
    if grads not in GRAD_MODES:
        raise UsageError(f"grads={grads!r}: expected True, False or 'on_divergence'")
    if buffers not in BUFFER_MODES:
        raise UsageError(f"buffers={buffers!r}: expected one of {', '.join(repr(m) for m in BUFFER_MODES)}")
