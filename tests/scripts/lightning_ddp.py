"""Lightning's `Trainer(strategy="ddp", accelerator="cpu", devices=2)`, checked by `DistshareLightningCallback`.

    python tests/scripts/lightning_ddp.py clean scale_rank1 lr_rank0

Lightning's ddp strategy starts the second rank itself: it runs this script again, with the
same arguments, as a child process. Each named scenario runs in turn, a fresh module and
`Trainer` each (4 optimizer steps, 2 accumulated batches of 4 per step, a check after every
step):

    clean        the run as a user writes it
    scale_rank1  a callback multiplies one weight by (1 + 1e-4) on rank 1 after step 2
    lr_rank0     a callback multiplies the learning rate by 10 on rank 0 only before step 2
    base_lr_rank1            rank 1's scheduler gets another base learning rate before step 2
                             (StepLR scales the groups' lr, never reads it: only its state differs)
    base_lr_rank1_unchecked  the same, with DistshareLightningCallback(schedulers=False)

Every scenario but the last is caught and reported as one JSON line by rank 0; the last runs
uncaught, as a user's script runs: a divergence ends the process with `ReplicaDivergenceError`.
"""

from __future__ import annotations

import sys
import tempfile

import lightning.pytorch as L
import torch
from scenarios import run_scenarios  # this folder is first on sys.path when launched
from torch import nn
from torch.nn import functional as F

from distshare.integrations.lightning_callback import DistshareLightningCallback

STEPS = 4  # optimizer steps
MUTATE_AT = 2  # global step (optimizer steps taken) at which a mutant acts
SCALED = "net.0.weight"  # the weight scale_rank1 scales
SCALE = 1 + 1e-4


class Regression(L.LightningModule):
    """A small MLP on a fixed random regression task, AdamW with a step schedule."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)}


class ScaleOnRank1(L.Callback):
    """The mutant: one weight scaled by 1e-4 on rank 1 only, between two steps."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == MUTATE_AT and trainer.global_rank == 1 and not getattr(self, "done", False):
            self.done = True  # global_step stays at 2 for both batches of the next step
            with torch.no_grad():
                pl_module.get_parameter(SCALED).mul_(SCALE)


class LrOnRank0(L.Callback):
    """The mutant: rank 0 steps with 10x the learning rate once (the schedule's next step keeps it)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == MUTATE_AT and trainer.global_rank == 0:
            for group in optimizer.param_groups:
                group["lr"] *= 10


class BaseLrOnRank1(L.Callback):
    """The mutant: rank 1's scheduler holds another base learning rate from step 2 on."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == MUTATE_AT and trainer.global_rank == 1:
            scheduler = trainer.lr_scheduler_configs[0].scheduler
            scheduler.base_lrs = [2 * lr for lr in scheduler.base_lrs]


MUTANTS = {
    "clean": [],
    "scale_rank1": [ScaleOnRank1],
    "lr_rank0": [LrOnRank0],
    "base_lr_rank1": [BaseLrOnRank1],
    "base_lr_rank1_unchecked": [BaseLrOnRank1],
}


def data() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    y = x.sum(dim=1, keepdim=True).sin()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


def train(scenario: str, out: str) -> DistshareLightningCallback:
    L.seed_everything(0, verbose=False)
    check = DistshareLightningCallback(every=1, timeout_s=60, schedulers=not scenario.endswith("_unchecked"))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=STEPS,
        accumulate_grad_batches=2,
        callbacks=[check, *(m() for m in MUTANTS[scenario])],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(Regression(), data())
    return check


def main(scenarios: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="distshare-lightning-") as out:  # no checkpoint, no logger: stays empty
        run_scenarios(train, scenarios, out)


if __name__ == "__main__":
    main(sys.argv[1:] or ["clean"])
