"""The progress display: one bar on rank 0, the latest global loss beside it.

`steps_bar` and `show_loss` are the bar itself, for a process that shows a run it does not
run: Ray's driver draws the same bar from the steps and rows its rank 0 sends it.
"""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from distshare.training.loop import Component, Loop


def steps_bar(first_step: int, total: int, disable: bool = False, desc: str = "train") -> tqdm:
    """A bar over a run's steps, starting at `first_step` (a resumed run starts part way)."""
    return tqdm(desc=desc, unit="step", leave=False, initial=first_step, total=total, disable=disable)


def show_loss(bar: tqdm, rows: list[dict[str, Any]]) -> None:
    """The latest known global loss beside the bar (a row of a failed window has none)."""
    losses = [row["loss"] for row in rows if row.get("loss") is not None]
    if losses:
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)


class ProgressBar(Component):
    """A tqdm bar over the run's steps (rank 0 only: the others stay quiet)."""

    def __init__(self, desc: str = "train") -> None:
        self.desc = desc
        self.bar: tqdm | None = None

    def begin(self, loop: Loop) -> None:
        self.bar = steps_bar(loop.first_step, loop.steps, disable=not loop.world.is_main, desc=self.desc)

    def step_end(self, loop: Loop, step: int) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_losses(self, loop: Loop, rows: list[dict[str, Any]]) -> None:
        if self.bar is not None:
            show_loss(self.bar, rows)

    def close(self, loop: Loop) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __getstate__(self) -> dict[str, Any]:  # the bar itself never travels to another rank
        return {**self.__dict__, "bar": None}
