"""What the demos share: seeded training through the one training loop, data, and figures.

Demos train with `distshare.training.train` (the same step every engine runs), so what a
demo shows about weights is what training with distshare does. Trained models are cached
per configuration: `distshare demo all` trains each model once even when two demos read it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distshare import report
from distshare.config import RunConfig, load_config
from distshare.data import build_dataset
from distshare.data.tensors import TensorTable
from distshare.data.types import DataInfo
from distshare.distributed.world import World
from distshare.models import build_model
from distshare.training import DTYPES, TrainResult, train

# The tiny transformer on subject-verb-object sentences: learns "who is the subject" in about
# 60 steps (loss < 0.01), a few seconds on one core.
TRANSFORMER = ("data.num_samples=512", "plan.global_batch=32", "steps=60", "optim.lr=0.01", "check_every=0")
# The small CNN on shapes (which pattern, anywhere in a 12x12 image): 150 steps, under a second.
CNN = (
    "model.name=cnn",
    "data.name=shapes",
    "data.num_samples=512",
    "plan.global_batch=32",
    "steps=150",
    "optim.lr=0.01",
    "check_every=0",
)


@dataclass(frozen=True)
class Trained:
    """A model after training, with the data it was trained on and the loop's account."""

    cfg: RunConfig
    model: nn.Module
    info: DataInfo
    table: TensorTable
    result: TrainResult


def config(overrides: tuple[str, ...] | list[str], seed: int) -> RunConfig:
    """A run config from dotted overrides; the demo's seed seeds the parameters and the data."""
    return load_config(None, [*overrides, f"seed={seed}", f"data.seed={seed}", f"plan.seed={seed}"])


def trained(overrides: tuple[str, ...], seed: int) -> Trained:
    """Train with the one training loop, in this process; a fresh copy of a cached run."""
    t = _trained(tuple(overrides), seed)
    model = build_model(t.cfg.model, t.info, seed=t.cfg.seed)
    model.load_state_dict(t.model.state_dict())
    return Trained(t.cfg, model, t.info, t.table, t.result)


@lru_cache(maxsize=8)
def _trained(overrides: tuple[str, ...], seed: int) -> Trained:
    cfg = config(overrides, seed)
    result = train(cfg, World(), out_dir=None, progress=False, keep_state=True)
    info, table = data(cfg)
    model = build_model(cfg.model, info, seed=cfg.seed)
    assert result.state is not None
    model.load_state_dict(result.state)
    return Trained(cfg, model, info, table, result)


def data(cfg: RunConfig) -> tuple[DataInfo, TensorTable]:
    """The configured data set as tensors, exactly as the training loop sees it."""
    dataset, info = build_dataset(cfg.data)
    return info, TensorTable.from_dataset(dataset, info, DTYPES[cfg.model.dtype])


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block from `seed` without disturbing the caller's random stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (figures need no display), in distshare's style."""
    return report.pyplot()


def save(fig: Any, out_dir: Path, name: str) -> str:
    """Write a figure as `<name>.png` in `out_dir` (at `report.DPI`); return the file name for the finding."""
    file = f"{name}.png"
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    report.save_figure(fig, out_dir / file)
    return file


def finding_title(claim: str, holds: bool, numbers: str) -> str:
    """A figure's title: the claim when the measurement holds, its failure when not, and the numbers."""
    return f"{claim}\n{numbers}" if holds else f"FAILS: {claim}\n{numbers}"


def params_used(model: nn.Module, run: Any) -> tuple[int, set[int]]:
    """Parameters a forward pass reads: (their element count, their storages' addresses).

    Counted by what the forward really touches (a hook on every module records the storage of
    each parameter it holds), not by what the model declares.
    """
    seen: dict[int, int] = {}

    def hook(module: nn.Module, args: Any) -> None:
        for p in module.parameters(recurse=False):
            seen[p.untyped_storage().data_ptr()] = p.numel()

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return sum(seen.values()), set(seen)
