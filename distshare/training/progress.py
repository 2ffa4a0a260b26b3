"""The progress display: one bar on rank 0, the latest global loss beside it."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from distshare.training.loop import Component, Loop


class ProgressBar(Component):
    """A tqdm bar over the run's steps (rank 0 only: the others stay quiet)."""

    def __init__(self, desc: str = "train") -> None:
        self.desc = desc
        self.bar: tqdm | None = None

    def begin(self, loop: Loop) -> None:
        self.bar = tqdm(
            desc=self.desc,
            unit="step",
            leave=False,
            initial=loop.first_step,
            total=loop.steps,
            disable=not loop.world.is_main,
        )

    def step_end(self, loop: Loop, step: int) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_losses(self, loop: Loop, rows: list[dict[str, Any]]) -> None:
        if self.bar is not None and rows:
            self.bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}", refresh=False)

    def close(self, loop: Loop) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __getstate__(self) -> dict[str, Any]:  # the bar itself never travels to another rank
        return {**self.__dict__, "bar": None}
