"""Training: the one step, the loop that hands each step to components, and the components.

    step.py           the one step (any model and data: `optimizer_step`; distshare's own: `train_step`)
    loop.py           steps handed to components; the run's account (`TrainResult`)
    trainer.py        `train`: the loop with the standard components
    checkpointer.py   verified checkpoints during training, and resuming from them
    replica_check.py  replicas compared by digest every N steps
    metrics.py        metrics.jsonl, the same for every engine
    progress.py       the progress bar on rank 0
    hooks.py          small components: a function after every step, the final state kept
"""

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
