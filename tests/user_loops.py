"""Training loops as users write them, for `assert_loop_equivalent`: each correct one beside its bug.

Ranks are spawned processes and import a loop by name, so the loops live here, at module
level (pytest puts this folder on `sys.path`; spawned ranks inherit it). A variant is chosen
with `functools.partial(loop, bug=...)`, which pickles by name too.

The model is transformers' GPT-2 from a tiny config (no download, dropout off: dropout
draws its masks per batch, so a split would change the function itself). The data: token
sequences of varying length, right-padded, labels -100 on the padding. The correct
normalization is transformers' since its 2024 accumulation fix: the summed token loss of a
micro-batch divided by the *global* count of label tokens (counted on each rank, summed
across ranks), times W where DDP averages gradients over the W ranks.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

PAD_TO = 12  # every sequence is padded to this many tokens
VOCAB = 64


def tiny_gpt2(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config).to(dtype)


def sequences(n: int, variable: bool = True, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`n` token sequences, lengths 2..PAD_TO when `variable` (else all PAD_TO), right-padded."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(2, PAD_TO + 1, (), generator=gen)) if variable else PAD_TO
        ids = torch.zeros(PAD_TO, dtype=torch.long)
        ids[:length] = torch.randint(1, VOCAB, (length,), generator=gen)
        labels = torch.full((PAD_TO,), -100, dtype=torch.long)
        labels[:length] = ids[:length]
        out.append({"input_ids": ids, "labels": labels})
    return out


def label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The items a causal LM's loss averages over: next-token labels that are not -100."""
    return int((batch["labels"][:, 1:] != -100).sum())


def token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], reduction: str) -> torch.Tensor:
    # No attention mask: with right padding a causal model's real tokens never attend to the
    # padding after them, and the padding's own positions carry label -100.
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction=reduction)


def _global_count(local: int, world_size: int) -> float:
    count = torch.tensor([local], dtype=torch.int64)
    if world_size > 1:
        dist.all_reduce(count)  # every rank divides by the same, global, number of tokens
    return float(count)


def _sum_hook(state, bucket):  # no annotations: DDP checks them, and this module's are strings
    # The default hook averages over the ranks; this one sums (the loss is globally normalized).
    fut = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def gpt2_ddp_loop(
    ctx: Any, bug: str = "", reduce: str = "mean", dtype: str = "float32", mutant: str = ""
) -> torch.nn.Module:
    """A plain DDP loop with gradient accumulation over `ctx.batches()`.

    bug: "" (correct), "token_mean" (each micro-batch's token mean / k: the 2024 bug),
    "k_twice" / "no_k" (the token mean divided by k twice / not at all), "ddp_average"
    (the global normalization without x W, so DDP's averaging divides by W once more),
    "forward_outside_no_sync" (only the backward inside no_sync). reduce: "mean" (DDP's
    default averaging, hence x W) or "sum" (a SUM comm hook: no x W). mutant: a fault in
    every split with k > 1 (never in the reference), to show the verdict flips: "nan" (one
    gradient element), "scale" (the loss x (1 + 1e-4)), "skip_micro" (the last micro-batch
    drawn but not trained on), "exponent_bit" (a flipped exponent bit in one weight).
    """
    model = tiny_gpt2(getattr(torch, dtype))
    ddp = DistributedDataParallel(model) if ctx.world_size > 1 else model
    if ctx.world_size > 1 and reduce == "sum":
        ddp.register_comm_hook(state=None, hook=_sum_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scale = ctx.world_size if reduce == "mean" and bug != "ddp_average" else 1
    k = ctx.accum_steps
    faulty = mutant if k > 1 else ""
    if faulty == "scale":
        scale *= 1 + 1e-4
    for step in ctx.batches():
        # A first pass over the step's micro-batches counts its label tokens, on all ranks.
        count = _global_count(sum(label_tokens(b) for b in step), ctx.world_size)
        for i, batch in enumerate(step):
            last = i == len(step) - 1
            if faulty == "skip_micro" and last:
                continue
            quiet = ddp.no_sync() if ctx.world_size > 1 and not last else contextlib.nullcontext()
            if bug == "forward_outside_no_sync":
                loss = token_losses(ddp, batch, "sum") * scale / count
                with quiet:
                    loss.backward()
                continue
            with quiet:
                if bug in ("token_mean", "k_twice", "no_k"):
                    divide = {"token_mean": k, "k_twice": k * k, "no_k": 1}[bug]
                    loss = token_losses(ddp, batch, "mean") / divide
                else:
                    loss = token_losses(ddp, batch, "sum") * scale / count
                loss.backward()
        if faulty == "nan":
            model.transformer.h[0].mlp.c_fc.weight.grad[0, 0] = float("nan")
        optimizer.step()
        if faulty == "exponent_bit":
            _flip_bit(model.transformer.h[0].mlp.c_fc.weight, 30)
        optimizer.zero_grad(set_to_none=True)
    return ddp


def _flip_bit(t: torch.Tensor, bit: int) -> None:
    """Flip one bit of the first element of a float32 (bit 0: its last mantissa bit) or float64 tensor."""
    ints = t.data.view(torch.int32 if t.dtype == torch.float32 else torch.int64).view(-1)
    ints[0] ^= 1 << bit


def gpt2_sharded_loop(ctx: Any, drop_last: bool = False) -> torch.nn.Module:
    """A loop that shards the data itself: DistributedSampler + DataLoader over `ctx.dataset`.

    One epoch, whatever its length; k = 1. With a data set whose size W does not divide,
    `drop_last=False` pads every rank to the same length by repeating samples.
    """
    model = tiny_gpt2()
    ddp = DistributedDataParallel(model) if ctx.world_size > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    sampler = DistributedSampler(
        ctx.dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=ctx.seed, drop_last=drop_last
    )
    for batch in DataLoader(ctx.dataset, batch_size=ctx.micro_batch, sampler=sampler):
        count = _global_count(label_tokens(batch), ctx.world_size)
        loss = token_losses(ddp, batch, "sum") * ctx.world_size / count
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return ddp


def gpt2_accelerate_loop(ctx: Any, bug: str = "") -> torch.nn.Module:
    """The correct loop written with accelerate: `Accelerator` + `accelerator.accumulate`.

    Inside distshare's spawned ranks the gloo group already exists; accelerate finds its
    place from the launcher's variables, which a spawned rank does not have: the loop sets
    them (what `accelerate launch` would have) before building the Accelerator, which then
    adopts the existing group. bug "token_mean": accelerate's own scaling (the micro-batch
    mean divided by k inside `accelerator.backward`), the 2024 bug in its accelerate form.
    """
    from accelerate import Accelerator

    _launched_place(ctx)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ctx.accum_steps)
    model = tiny_gpt2()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer = accelerator.prepare(model, optimizer)
    for step in ctx.batches():
        local = torch.tensor([sum(label_tokens(b) for b in step)])
        count = float(accelerator.reduce(local, reduction="sum"))
        for batch in step:
            with accelerator.accumulate(model):
                if bug == "token_mean":
                    loss = token_losses(model, batch, "mean")  # accelerator.backward divides by k
                    accelerator.backward(loss)
                else:
                    # accelerator.backward divides by k; DDP averages over W: undo both.
                    loss = token_losses(model, batch, "sum") * accelerator.num_processes * ctx.accum_steps / count
                    accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
    return model


def per_sample_ce(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """Each sample's loss (exact mode's loss function): [n]."""
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def mlp_exact_loop(ctx: Any, exact: bool = True, mutant: str = "") -> torch.nn.Module:
    """A loop in exact mode: distshare's `ExactSync` sums per-sample gradients in integers.

    exact=False: the same loop with a plain backward and an all-reduce (rounding differs by
    split). mutant "last_bit": one gradient element's last bit flipped in splits with k > 1.
    """
    from distshare.distributed.sync import AllReduceSync, ExactSync

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    sync = ExactSync(ctx.world_size) if exact else AllReduceSync()
    model, optimizer = sync.prepare(model, optimizer)
    for step in ctx.batches():
        sync.start_step(model, ctx.global_batch, ctx.global_batch)
        for x, y in step:
            if exact:
                sync.accumulate(model, (x, y), per_sample_ce)
            else:
                (per_sample_ce(model, (x, y)).sum() / ctx.global_batch).backward()
        if exact or ctx.world_size > 1:
            sync.synchronize(model)
        if mutant == "last_bit" and ctx.accum_steps > 1:
            _flip_bit(model[0].weight.grad, 0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def classification_data(n: int = 64) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(3)
    return torch.utils.data.TensorDataset(torch.randn(n, 8, generator=gen), torch.randint(0, 4, (n,), generator=gen))


def tiny_token_lm() -> torch.nn.Module:
    """A next-token model without attention (embedding, tanh, projection): a token-level loss
    whose per-sample gradients hold no structurally-zero, rounding-noise elements."""
    return torch.nn.Sequential(torch.nn.Embedding(VOCAB, 16), torch.nn.Tanh(), torch.nn.Linear(16, VOCAB)).double()


def summed_next_token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The summed loss of every next-token label that is not -100 (no mean: the step normalizes)."""
    logits = model(batch["input_ids"])[:, :-1]
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")


def _launched_place(ctx: Any) -> None:
    # accelerate (and the Trainer, through it) find their place from a launcher's variables,
    # which distshare's spawned ranks do not have: set what `accelerate launch` would have.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)  # runs at W = 1 share this process
    GradientState._reset_state()
    if ctx.world_size > 1:
        place = {"RANK": ctx.rank, "LOCAL_RANK": ctx.rank, "WORLD_SIZE": ctx.world_size}
        place["LOCAL_WORLD_SIZE"] = ctx.world_size
        os.environ.update({key: str(value) for key, value in place.items()}, MASTER_ADDR="127.0.0.1")


def gpt2_trainer_loop(ctx: Any, average_tokens_across_devices: bool = True) -> torch.nn.Module:
    """transformers' `Trainer` as the loop: its own sampler, accumulation and normalization.

    It divides the summed token loss by `num_items_in_batch`, the step's label tokens;
    `average_tokens_across_devices=False` counts only this rank's (the bug when ranks hold
    different numbers of tokens).
    """
    import tempfile

    from transformers import Trainer, TrainingArguments

    _launched_place(ctx)
    with tempfile.TemporaryDirectory(prefix="distshare-trainer-") as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=ctx.micro_batch, gradient_accumulation_steps=ctx.accum_steps,
            max_steps=ctx.steps, learning_rate=0.5, lr_scheduler_type="constant", optim="sgd", weight_decay=0.0,
            max_grad_norm=0.0, seed=ctx.seed, use_cpu=True, report_to=[], save_strategy="no",
            logging_strategy="no", disable_tqdm=True, average_tokens_across_devices=average_tokens_across_devices,
        )  # fmt: skip
        trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=ctx.dataset)
        trainer.train()
    return trainer.model
