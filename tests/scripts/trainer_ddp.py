"""transformers' `Trainer` on a tiny GPT-2 under torchrun, checked by `DistshareCallback`.

    torchrun --standalone --nproc_per_node 2 tests/scripts/trainer_ddp.py clean scale_rank1 lr_rank0

Runs each named scenario in turn, a fresh model and `Trainer` each (4 optimizer steps, 2
accumulation steps, 2 samples per micro-batch, a check after every step):

    clean        the run as a user writes it
    scale_rank1  a callback multiplies one weight by (1 + 1e-4) on rank 1 after step 2
    lr_rank0     a callback multiplies the learning rate by 10 on rank 0 only before step 2
    base_lr_rank1            rank 1's scheduler gets another base learning rate before step 2:
                             at step 2's check only the scheduler's state differs (the groups' lr
                             changes at the scheduler's next step)
    base_lr_rank1_unchecked  the same, with DistshareCallback(scheduler=False)

Every scenario but the last is caught and reported as one JSON line by rank 0 (`{"scenario":
..., "in_sync": ..., "error": ...}`); the last runs as a user's script runs, uncaught: a
divergence ends the process with `ReplicaDivergenceError` and torchrun exits non-zero.
"""

from __future__ import annotations

import sys
import tempfile

import torch
from scenarios import run_scenarios  # this folder is first on sys.path when launched
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from distshare.integrations.hf_trainer import DistshareCallback

STEPS = 4  # optimizer steps
MUTATE_AT = 2  # global step at which a mutant acts
SCALED = "transformer.h.0.mlp.c_fc.weight"  # the weight scale_rank1 scales
SCALE = 1 + 1e-4


class TokenData(torch.utils.data.Dataset):
    """64 random token sequences of 8 (the same on every rank: Trainer's sampler shards them)."""

    def __init__(self) -> None:
        self.ids = torch.randint(0, 64, (64, 8), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class ScaleOnRank1(TrainerCallback):
    """The mutant: one weight scaled by 1e-4 on rank 1 only, between two steps."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == MUTATE_AT and args.process_index == 1:
            with torch.no_grad():
                model.get_parameter(SCALED).mul_(SCALE)


class LrOnRank0(TrainerCallback):
    """The mutant: rank 0 steps with 10x the learning rate once (the scheduler resets it after)."""

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step == MUTATE_AT and args.process_index == 0:
            for group in optimizer.param_groups:
                group["lr"] *= 10


class BaseLrOnRank1(TrainerCallback):
    """The mutant: rank 1's schedule recomputes its learning rates from another base from now on."""

    def on_step_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        if state.global_step == MUTATE_AT and args.process_index == 1:
            lr_scheduler.base_lrs = [2 * lr for lr in lr_scheduler.base_lrs]


MUTANTS = {
    "clean": [],
    "scale_rank1": [ScaleOnRank1()],
    "lr_rank0": [LrOnRank0()],
    "base_lr_rank1": [BaseLrOnRank1()],
    "base_lr_rank1_unchecked": [BaseLrOnRank1()],
}


def train(scenario: str, out: str) -> DistshareCallback:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    args = TrainingArguments(
        output_dir=out,
        use_cpu=True,
        report_to=[],
        max_steps=STEPS,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    check = DistshareCallback(every=1, timeout_s=60, scheduler=not scenario.endswith("_unchecked"))
    model = GPT2LMHeadModel(config)
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(), callbacks=[check, *MUTANTS[scenario]])
    trainer.train()
    return check


def main(scenarios: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="distshare-trainer-") as out:  # nothing is saved there (save_strategy "no")
        run_scenarios(train, scenarios, out)


if __name__ == "__main__":
    main(sys.argv[1:] or ["clean"])
