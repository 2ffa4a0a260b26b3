"""Claim 5: after training the weights are fixed; inference on new data changes none of them.

Two trained models (the tiny transformer, and a CNN with batch norm) answer new data (drawn
from another seed) in inference mode, `model.eval()` under `torch.no_grad()`. Every tensor of
their state, parameters *and buffers*, is fingerprinted before and after: nothing changes.

Control, and a real pitfall: the batch-norm CNN left in train mode. Its parameters still do
not change (no optimizer step), but its running mean and variance, which are buffers and so
part of the model's state, drift with every inference batch: "fixed weights" is not the
whole story, the state that decides the output is what must stay fixed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from distshare.demos.common import CNN, TRANSFORMER, config, data, pyplot, save, trained
from distshare.demos.finding import Control, Finding, verdict
from distshare.integrity.fingerprint import fingerprint_state

NAME = "fixed-after-training"
QUESTION = "After training transformer is the Q weight matrix WQ fixed"
CLAIM = "Yes: inference on new data leaves every parameter (and every buffer) of a trained model bit for bit unchanged."
CONTROL = "a batch-norm CNN left in train mode during inference"
BN_CNN = (*CNN, "model.norm=batch", "steps=60")
NEW_DATA = 200  # samples of unseen data answered in inference
INFER_BATCH = 20


def _infer(model: nn.Module, overrides: tuple[str, ...], seed: int, train_mode: bool) -> dict:
    """Answer NEW_DATA unseen samples; report which state tensors changed, by kind."""
    cfg = config([*overrides, f"data.num_samples={NEW_DATA}"], seed + 1000)  # another data seed: new data
    _, table = data(cfg)
    before = fingerprint_state(model)
    model.train(train_mode)
    drift = []
    bn = next((m for m in model.modules() if isinstance(m, nn.BatchNorm2d)), None)
    with torch.no_grad():
        for start in range(0, NEW_DATA, INFER_BATCH):
            batch = table.select(list(range(start, start + INFER_BATCH)))
            model(**batch.inputs)
            if bn is not None:
                drift.append(float(bn.running_mean[0]))
    after = fingerprint_state(model)
    changed = sorted(n for n in before if before[n] != after[n])
    return {
        "tensors": len(before),
        "params_changed": sum(n.startswith("param/") for n in changed),
        "buffers_changed": sum(n.startswith("buffer/") for n in changed),
        "changed": changed,
        "running_mean_0": drift,
    }


def run(out_dir: Path, seed: int = 0) -> Finding:
    transformer = trained(TRANSFORMER, seed).model
    cnn = trained(BN_CNN, seed)
    runs = {
        "transformer, eval": _infer(transformer, TRANSFORMER, seed, train_mode=False),
        "batch-norm CNN, eval": _infer(cnn.model, BN_CNN, seed, train_mode=False),
    }
    control_model = trained(BN_CNN, seed).model  # a fresh copy of the same trained CNN
    control = _infer(control_model, BN_CNN, seed, train_mode=True)
    unchanged = all(r["params_changed"] == 0 and r["buffers_changed"] == 0 for r in runs.values())
    control_unchanged = control["params_changed"] == 0 and control["buffers_changed"] == 0
    numbers = {
        "new_samples": NEW_DATA,
        **{name: {k: v for k, v in r.items() if k != "running_mean_0"} for name, r in runs.items()},
        "control: batch-norm CNN, train mode": {k: v for k, v in control.items() if k != "running_mean_0"},
    }
    figure = _figure(out_dir, runs, control)
    headline = (
        f"eval: 0 of {sum(r['tensors'] for r in runs.values())} state tensors changed; "
        f"train-mode BN: {control['params_changed']} params, {control['buffers_changed']} buffers changed"
    )
    return Finding(
        NAME,
        QUESTION,
        CLAIM,
        verdict(unchanged),
        [Control("train-mode BN", CONTROL, verdict(control_unchanged))],
        numbers,
        figure,
        headline,
    )


def _figure(out_dir: Path, runs: dict, control: dict) -> str:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    rows = {**runs, "control: BN CNN, train mode": control}
    names = list(rows)
    x = torch.arange(len(names)).float()
    left.bar(x - 0.2, [r["params_changed"] for r in rows.values()], 0.4, label="parameters changed")
    left.bar(x + 0.2, [r["buffers_changed"] for r in rows.values()], 0.4, label="buffers changed")
    left.set_xticks(x.tolist(), names, fontsize=7)
    left.set(ylabel="state tensors changed by inference", title="Inference on new data")
    left.legend()
    right.plot(runs["batch-norm CNN, eval"]["running_mean_0"], "o-", label="eval mode")
    right.plot(control["running_mean_0"], "s--", label="train mode (pitfall)")
    right.set(xlabel="inference batch", ylabel="BN running_mean[0]", title="A buffer during inference")
    right.legend()
    return save(fig, out_dir, NAME)
