"""Training: the one step, the loop that hands each step to components, and the components."""

from distshare.training.loop import Component, Loop, TrainResult, run_loop
from distshare.training.step import (
    DTYPES,
    Run,
    StepStats,
    build_optimizer,
    build_run,
    loss_sum,
    optimizer_step,
    sample_losses,
    train_step,
)
from distshare.training.trainer import train

__all__ = [
    "DTYPES",
    "Component",
    "Loop",
    "Run",
    "StepStats",
    "TrainResult",
    "build_optimizer",
    "build_run",
    "loss_sum",
    "optimizer_step",
    "run_loop",
    "sample_losses",
    "train",
    "train_step",
]
