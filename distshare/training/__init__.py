"""Training: the one step and the loop that hands each step to its components."""

from distshare.training.loop import TrainResult, train
from distshare.training.step import (
    DTYPES,
    Run,
    StepStats,
    build_optimizer,
    build_run,
    loss_sum,
    sample_losses,
    train_step,
)

__all__ = [
    "DTYPES",
    "Run",
    "StepStats",
    "TrainResult",
    "build_optimizer",
    "build_run",
    "loss_sum",
    "sample_losses",
    "train",
    "train_step",
]
