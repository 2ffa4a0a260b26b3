"""`DistshareLightningCallback`: distshare's replica checks inside Lightning's `Trainer`.

    from distshare.integrations.lightning_callback import DistshareLightningCallback

    trainer = L.Trainer(strategy="ddp", devices=2, callbacks=[DistshareLightningCallback(every=10)])
    trainer.fit(model, loader)

    pip install distshare[lightning]       # Lightning is an optional extra

The callback places `distshare.watch` on what Lightning trains: a check that every rank holds
the same training state (parameters, buffers, the optimizer's state and hyperparameters, the
learning-rate schedulers' state) before the first step, after every `every`-th optimizer step,
and at the end of training.

Why these hooks:

- **on_train_start** runs after the strategy has wrapped the module (DDP) and built the
  optimizer, on every rank, before the first batch: the baseline check goes there, and the
  watch is given the DDP wrapper (`trainer.strategy.model`), whose settings are evidence.
- The checks run in the optimizer's step post-hook: with automatic optimization Lightning runs
  forward and backward inside `optimizer.step(closure)`, so after the step is the first point
  where the update is done, with the gradients it used still in `.grad`.
- **on_train_end** runs a last check when steps were taken since the last one;
  **on_exception** removes the hooks without a check (peers may never reach one).

A divergence raises `ReplicaDivergenceError` out of `trainer.fit()` on every rank at the same
step, its message starting with the likely cause and its fix: the run stops loudly.
"""

from __future__ import annotations

from typing import Any

from distshare.errors import UsageError
from distshare.integrations.options import WatchingCallback

try:
    from lightning.pytorch import Callback
except ImportError:
    try:  # the standalone package, same API
        from pytorch_lightning import Callback
    except ImportError:
        raise UsageError(
            "distshare.integrations.lightning_callback needs Lightning: pip install distshare[lightning] "
            "(or pip install lightning)"
        ) from None


class DistshareLightningCallback(WatchingCallback, Callback):
    """Check, every `every` optimizer steps, that every rank of a Lightning run holds the same state.

    Args:
        every: optimizer steps between checks (`accumulate_grad_batches` batches count as one step).
        grads: compare the gradients the step used: "on_divergence" (default: digested only once
            the state differs, free while replicas agree), True (every check) or False.
        buffers: "compare" (default), "separate" (reported, not judged: BatchNorm under DDP)
            or "ignore".
        schedulers: compare the learning-rate schedulers' state too.
        locate: how many differing tensors to localize element by element.
        timeout_s: how long a check waits for every rank before it fails.
        verbose: rank 0 prints one line when the baseline check passes and one at the end.

    After training, `watcher` holds the `distshare.Watch` (its `checks`, `reports`, `in_sync`).
    Reports count steps from 0, as all of distshare does: "at step 2" is the check after the
    third optimizer step (Lightning's `trainer.global_step` is 3 then).
    """

    def __init__(
        self,
        every: int = 1,
        grads: bool | str = "on_divergence",
        buffers: str = "compare",
        schedulers: bool = True,
        locate: bool | int = 16,
        timeout_s: float = 300.0,
        verbose: bool = True,
    ) -> None:
        super().__init__(every, grads, buffers, locate, timeout_s, verbose)
        self.schedulers = schedulers

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = list(trainer.optimizers)
        if len(optimizers) != 1:
            raise UsageError(
                f"DistshareLightningCallback watches one optimizer, this run has {len(optimizers)}: "
                "call distshare.assert_replicas_in_sync(model, optimizer) for each in your training_step instead"
            )
        extra = None
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
        if self.schedulers and schedulers:
            extra = lambda: {"lr_scheduler": [s.state_dict() for s in schedulers]}  # noqa: E731 (read at each check)
        # The strategy's model is the DDP wrapper under strategy="ddp" (the module itself otherwise).
        self._start(trainer.strategy.model, optimizers[0], extra, trainer.is_global_zero)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish(trainer.is_global_zero)  # raises ReplicaDivergenceError when the last steps diverged

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.watcher is not None:
            self.watcher.remove()  # no last check: an error is on its way, peers may never join one
