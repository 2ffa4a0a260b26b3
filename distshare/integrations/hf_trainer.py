"""`DistshareCallback`: distshare's replica checks inside transformers' `Trainer`.

    from distshare.integrations.hf_trainer import DistshareCallback

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[DistshareCallback(every=10)])
    trainer.train()

    torchrun --standalone --nproc_per_node 2 train.py      # or: accelerate launch train.py

The callback places `distshare.watch` on what `Trainer` trains: a check that every rank holds
the same training state (parameters, buffers, the optimizer's state and hyperparameters, the
learning-rate scheduler's state) before the first step, after every `every`-th optimizer step,
and at the end of training.

Why these hooks:

- **on_train_begin** is the first event that sees the optimizer: `Trainer` creates it lazily,
  inside `train()`, and hands it to callbacks wrapped in accelerate's `AcceleratedOptimizer`.
  The watch hooks the torch optimizer inside that wrapper (see `innermost_optimizer`).
- The checks themselves run in that optimizer's step post-hook, not at `on_step_end`: by
  `on_step_end` Trainer has zeroed the gradients, and the gradients the step used are the
  evidence that tells "DDP never reduced them" from "the update differed".
- **on_train_end** runs a last check when steps were taken since the last one.

A divergence raises `ReplicaDivergenceError` (its message starts with the likely cause and its
fix) out of `trainer.train()` on every rank, at the same step: the run stops loudly, and every
rank stops, so none is left waiting in an all-reduce. Setting `control.should_training_stop`
instead would end the run "successfully" (exit code 0, a saved model) with replicas that
differ: the one outcome this check exists to prevent.
"""

from __future__ import annotations

from typing import Any

from distshare.errors import UsageError
from distshare.integrations.options import WatchingCallback
from distshare.integrity.state import innermost_optimizer

try:
    from transformers import TrainerCallback
except ImportError:  # transformers is the user's, not a dependency of distshare
    raise UsageError("distshare.integrations.hf_trainer needs transformers: pip install transformers") from None


class DistshareCallback(WatchingCallback, TrainerCallback):
    """Check, every `every` optimizer steps, that every rank of a `Trainer` run holds the same state.

    Args:
        every: optimizer steps between checks (gradient accumulation counts as one step).
        grads: compare the gradients the step used: "on_divergence" (default: digested only once
            the state differs, free while replicas agree), True (every check) or False.
        buffers: "compare" (default), "separate" (reported, not judged: BatchNorm under DDP)
            or "ignore".
        scheduler: compare the learning-rate scheduler's state too.
        locate: how many differing tensors to localize element by element.
        timeout_s: how long a check waits for every rank before it fails.
        verbose: rank 0 prints one line when the baseline check passes and one at the end.

    After training, `watcher` holds the `distshare.Watch` (its `checks`, `reports`, `in_sync`).
    Reports count steps from 0, as all of distshare does: "at step 2" is the check after the
    third optimizer step (Trainer's `state.global_step` is 3 then).
    """

    def __init__(
        self,
        every: int = 1,
        grads: bool | str = "on_divergence",
        buffers: str = "compare",
        scheduler: bool = True,
        locate: bool | int = 16,
        timeout_s: float = 300.0,
        verbose: bool = True,
    ) -> None:
        super().__init__(every, grads, buffers, locate, timeout_s, verbose)
        self.scheduler = scheduler

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, optimizer, lr_scheduler = kwargs.get("model"), kwargs.get("optimizer"), kwargs.get("lr_scheduler")
        if model is None or optimizer is None:
            raise UsageError(
                "DistshareCallback: Trainer passed no model or optimizer to on_train_begin; "
                "pass the callback to Trainer(callbacks=[...]) and call trainer.train()"
            )
        extra = None
        if self.scheduler and lr_scheduler is not None:
            extra = lambda: {"lr_scheduler": lr_scheduler.state_dict()}  # noqa: E731 (read at each check)
        # `model` is Trainer's bare model (callbacks never see the DDP wrapper): names carry no prefix.
        self._start(model, innermost_optimizer(optimizer), extra, state.is_world_process_zero)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._finish(state.is_world_process_zero)  # raises ReplicaDivergenceError when the last steps diverged
