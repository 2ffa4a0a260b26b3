"""A plain accelerate loop on a tiny GPT-2, under distshare's accelerate helper (tests/test_data_parallel.py).

    accelerate launch --config_file configs/accelerate/cpu.yaml --num_processes 2 \
        tests/scripts/accelerate_data_parallel.py plain     # Accelerator(): accelerate does not distribute
    accelerate launch --config_file configs/accelerate/cpu.yaml --num_processes 2 \
        tests/scripts/accelerate_data_parallel.py cpu       # Accelerator(cpu=True): MULTI_CPU on gloo

The main process writes one JSON line per phase to DS_TEST_OUT/<rank>.jsonl; every phase's
outcome (a pass, or the error it expects) is asserted by the test, not here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

import distshare
import distshare.integrations.accelerate as ds_accelerate
from distshare.errors import DistshareError
from distshare.integrity.state import unwrap


def build(accelerator: Accelerator):
    torch.manual_seed(0)  # the same seed on every rank: equal replicas, and equal shuffles
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 64, (32, 12), generator=torch.Generator().manual_seed(1))
    loader = DataLoader([{"input_ids": t, "labels": t} for t in tokens], batch_size=2, shuffle=True)
    return accelerator.prepare(model, optimizer, loader)


def train(accelerator, model, optimizer, loader, steps, corrupt_at=None):
    for i, batch in enumerate(loader):
        if i == corrupt_at and accelerator.process_index == 1:
            with torch.no_grad():  # a weight changed on rank 1 alone
                unwrap(model).transformer.h[0].mlp.c_fc.weight[0, 0] += 1e-3
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            optimizer.step()
            optimizer.zero_grad()
        if i + 1 == steps:
            return


def say(accelerator, **fields):
    if accelerator.is_main_process:
        # Each process appends to a file of its own (DS_TEST_OUT/<launcher rank>.jsonl): under
        # DistributedType.NO both processes are "main", and lines two processes print to one
        # pipe can interleave (seen in CI as JSONDecodeError 'Extra data').
        out = Path(os.environ["DS_TEST_OUT"]) / f"{os.environ.get('RANK', '0')}.jsonl"
        with out.open("a") as f:
            f.write(json.dumps(fields) + "\n")


def main(mode: str) -> None:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2) if mode == "cpu" else Accelerator()
    model, optimizer, loader = build(accelerator)
    kind = str(accelerator.distributed_type.value)
    if mode == "plain":
        try:
            ds_accelerate.watch(accelerator, model, optimizer)
            say(accelerator, phase="refuse", distributed_type=kind, error=None)
        except DistshareError as exc:
            say(accelerator, phase="refuse", distributed_type=kind, error=type(exc).__name__, message=str(exc))
        try:  # the same loop under the plain watch: it runs, and the data-parallel check fails it
            with distshare.watch(model, optimizer, data_parallel=True):
                train(accelerator, model, optimizer, loader, steps=2)
            say(accelerator, phase="plain_watch", error=None)
        except DistshareError as exc:
            cause = getattr(getattr(exc, "report", None), "cause", None)
            say(accelerator, phase="plain_watch", error=type(exc).__name__, cause=str(cause), message=str(exc))
        return
    with ds_accelerate.watch(accelerator, model, optimizer, every=2) as watcher:
        train(accelerator, model, optimizer, loader, steps=8)  # 4 optimizer steps: checks at steps 1 and 3
    dp = watcher.data_parallel_report
    say(
        accelerator,
        phase="clean",
        distributed_type=kind,
        checks=watcher.checks,
        in_sync=watcher.in_sync,
        data_parallel=dp.to_dict() if dp else None,
    )
    try:
        with ds_accelerate.watch(accelerator, model, optimizer, every=1):
            train(accelerator, model, optimizer, loader, steps=6, corrupt_at=2)
        say(accelerator, phase="corrupt", error=None)
    except DistshareError as exc:
        report = getattr(exc, "report", None)
        diagnosis = getattr(report, "diagnosis", None)
        say(
            accelerator,
            phase="corrupt",
            error=type(exc).__name__,
            message=str(exc),
            cause=str(diagnosis.cause) if diagnosis else None,
            differing=sorted(getattr(report, "differing", {})),
        )


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    finally:
        # Every rank leaves its process groups (distshare's check groups with them) together:
        # a process that exits with a gloo group alive can abort in C++ at shutdown
        # ("terminate called without an active exception", seen in CI on the plain run).
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
