"""The metrics writer: one JSON line per step in `metrics.jsonl`, the same for every engine.

A row holds the step, its global mean loss, the global batch's item count, the seconds
since the loop began and, at checked steps, whether the replicas agreed. A resumed run's
file starts with the steps before its checkpoint (from the checkpoint's loss history,
marked `from_checkpoint`), so the file holds each step exactly once.

Global losses are reduced a window of steps at a time (`distshare.training.loop`). A run that
fails inside a window (a rank went silent, Ctrl-C, an error) still gets the rows of the steps
that ran: their global loss is unknown (it needs the collective that failed), so `loss` is
null and `unreduced` says why; the last line is flushed before the process ends.

Rows go to a sink: a file on the machine of rank 0 (`FileSink`), or anything with
`write(rows)` and `close()` (Ray's rank 0 sends them to the driver, which writes each to its
`FileSink` as it arrives: the file grows during the run under every engine).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any, Protocol

from distshare.training.loop import Component, Loop

METRICS_FILE = "metrics.jsonl"


class MetricsSink(Protocol):
    def write(self, rows: list[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


class FileSink:
    """JSON lines into a file, rewritten from the start (not appended), flushed at every write."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: IO[str] | None = None

    def write(self, rows: list[dict[str, Any]]) -> None:
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("w")
        for row in rows:
            self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is None:
            self.write([])  # a run that logged nothing still leaves its (empty) file
        if self.file is not None:
            self.file.close()
            self.file = None


class MetricsWriter(Component):
    """Writes every step's row to `sink` on rank 0 (the other ranks write nothing)."""

    def __init__(self, sink: MetricsSink) -> None:
        self.sink = sink

    def begin(self, loop: Loop) -> None:
        if not loop.world.is_main:
            return
        # Rewritten, not appended: a restarted run's file then holds each step exactly once,
        # the steps before the checkpoint from its loss history, the rest as they run.
        run = loop.run
        self.sink.write(
            [
                {
                    "step": step,
                    "loss": loss,
                    "global_items": run.table.count_items(run.plan.global_batch(step)),
                    "from_checkpoint": True,
                }
                for step, loss in enumerate(loop.result.losses)
            ]
        )

    def on_losses(self, loop: Loop, rows: list[dict[str, Any]]) -> None:
        if loop.world.is_main:
            self.sink.write(rows)

    def close(self, loop: Loop) -> None:
        if not loop.world.is_main:
            return
        try:
            if loop.failure is not None:
                self.sink.write([_unreduced(row) for row in loop.unreduced_rows()])
        finally:
            self.sink.close()


def _unreduced(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "step": row["step"],
        "loss": None,  # the global loss needs every rank's sum: the run failed before it was reduced
        **{k: v for k, v in row.items() if k not in ("step", "loss")},
        "unreduced": "the run failed before this step's global loss was reduced across ranks",
    }
