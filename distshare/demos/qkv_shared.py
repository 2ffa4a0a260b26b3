"""Claim 1: one W_Q, W_K, W_V serves every sample of a batch.

Three measurements, each of which a per-sample weight copy would fail:

- the parameters a forward pass reads do not grow with the batch (counted by hooks on what
  the forward really touches, at batch 1, 4, 10 and 40);
- running the samples one by one, every sample is served by the same storage of each
  W_Q / W_K / W_V (one address per matrix, not one per sample);
- the batch gradient of W_Q, W_K, W_V equals the sum of the per-sample gradients
  (`torch.func.vmap(grad(...))`), normalized by the batch size, within the rounding bound of
  summing the same terms in another order.

Control: a model that keeps a deep copy of the network per sample. Its parameter count
grows with the batch, each sample has its own storage, and the gradient that reaches the
weights serving sample 0 is sample 0's alone, not the batch's.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from distshare.demos.common import config, data, params_used, pyplot, save, seeded
from distshare.demos.finding import Control, Finding, verdict
from distshare.models import build_model
from distshare.numerics.diff import Diff, diff
from distshare.numerics.rounding import reorder_norm_bound
from distshare.training import DTYPES, loss_sum

NAME = "qkv-shared"
QUESTION = (
    "If there are more than 1 sample, does it mean for each sample, there is a different weight matrix for Q, K and V?"
)
CLAIM = (
    "No: one W_Q, W_K, W_V serves every sample; the batch gradient is the normalized sum of the "
    "per-sample gradients into those same tensors."
)
CONTROL = "a model holding one weight copy per sample"
BATCH = 8  # samples whose gradients are compared
SIZES = (1, 4, 10, 40)  # batch sizes at which the parameters a forward reads are counted


class PerSampleCopies(nn.Module):
    """The broken mechanism: sample i is served by its own deep copy of the network."""

    def __init__(self, base: nn.Module, n: int) -> None:
        super().__init__()
        self.copies = nn.ModuleList(copy.deepcopy(base) for _ in range(n))

    def forward(self, input_ids: Tensor, pad_mask: Tensor) -> Tensor:
        return torch.cat([m(input_ids[i : i + 1], pad_mask[i : i + 1]) for i, m in enumerate(self.copies)])


def _qkv(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ("W_Q", "W_K", "W_V")}


def _storages_per_matrix(model: nn.Module, ids: Tensor, mask: Tensor, modules: dict[str, list[nn.Module]]) -> int:
    """Run the samples one at a time; the most distinct storages any one matrix name used."""
    used: dict[str, set[int]] = {n: set() for n in modules}
    handles = []
    for name, mods in modules.items():
        for m in mods:
            handles.append(
                m.register_forward_pre_hook(lambda mod, a, n=name: used[n].add(mod.weight.untyped_storage().data_ptr()))
            )
    try:
        with torch.no_grad():
            for i in range(ids.shape[0]):
                if isinstance(model, PerSampleCopies):
                    model.copies[i](ids[i : i + 1], mask[i : i + 1])
                else:
                    model(ids[i : i + 1], mask[i : i + 1])
    finally:
        for h in handles:
            h.remove()
    return max(len(s) for s in used.values())


def run(out_dir: Path, seed: int = 0) -> Finding:
    cfg = config(["data.num_samples=40"], seed)
    info, table = data(cfg)
    with seeded(seed):
        model = build_model(cfg.model, info, seed=cfg.seed)
    qkv = _qkv(model)
    batch = table.select(list(range(BATCH)))
    ids, mask, labels = batch.inputs["input_ids"], batch.inputs["pad_mask"], batch.labels

    # Batch gradient: the training step's loss (summed, divided by the batch's item count).
    model.zero_grad(set_to_none=True)
    (loss_sum(model(ids, mask), labels) / BATCH).backward()
    batch_grads = {n: m.weight.grad.detach().clone() for n, m in qkv.items()}

    # Per-sample gradients: one gradient per sample, computed independently with torch.func.
    params = {n: p.detach() for n, p in model.named_parameters()}

    def sample_loss(p: dict[str, Tensor], i: Tensor, m: Tensor, y: Tensor) -> Tensor:
        return loss_sum(functional_call(model, p, (i[None], m[None])), y[None])

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0, 0))(params, ids, mask, labels)
    summed = {n: per_sample[f"{n}.weight"].sum(0) / BATCH for n in qkv}
    shared_diff = diff(summed, batch_grads)

    # Control: a copy per sample. Its batch backward sends sample 0's gradient (only) to copy 0.
    copies = PerSampleCopies(model, BATCH)
    copies.zero_grad(set_to_none=True)
    (loss_sum(copies(ids, mask), labels) / BATCH).backward()
    copy0 = _qkv(copies.copies[0])
    control_grads = {n: copy0[n].weight.grad.detach().clone() for n in qkv}
    control_diff = diff(summed, control_grads)

    # The sum runs over BATCH samples x max_len positions of every weight element.
    bound = reorder_norm_bound(DTYPES[cfg.model.dtype], BATCH * info.max_len)
    all_ids, all_mask = table.inputs["input_ids"], table.inputs["pad_mask"]
    shared_counts, copy_counts = [], []
    for n in SIZES:
        shared_counts.append(params_used(model, lambda n=n: model(all_ids[:n], all_mask[:n]))[0])
        c = PerSampleCopies(model, n)
        copy_counts.append(params_used(c, lambda c=c, n=n: c(all_ids[:n], all_mask[:n]))[0])
    shared_storages = _storages_per_matrix(model, ids, mask, {n: [m] for n, m in qkv.items()})
    copy_storages = _storages_per_matrix(copies, ids, mask, {n: [_qkv(c)[n] for c in copies.copies] for n in qkv})

    def test(counts: list[int], storages: int, d: Diff) -> bool:
        return len(set(counts)) == 1 and storages == 1 and (d.bitwise_equal or d.norm_rel_diff <= bound)

    holds = test(shared_counts, shared_storages, shared_diff)
    control = test(copy_counts, copy_storages, control_diff)
    numbers = {
        "batch_size": BATCH,
        "qkv_matrices": len(qkv),
        "params_used_by_batch_size": dict(zip(map(str, SIZES), shared_counts, strict=True)),
        "control_params_used_by_batch_size": dict(zip(map(str, SIZES), copy_counts, strict=True)),
        "storages_per_matrix": shared_storages,
        "control_storages_per_matrix": copy_storages,
        "grad_vs_sum_of_per_sample": shared_diff.to_dict(),
        "control_grad_vs_sum_of_per_sample": control_diff.to_dict(),
        "rounding_bound_norm_rel": bound,
    }
    figure = _figure(out_dir, shared_counts, copy_counts, summed, batch_grads, control_grads)
    headline = (
        f"params {shared_counts[0]} at batch 1 and 40; 1 storage per matrix; "
        f"grad = sum of per-sample grads, norm rel {shared_diff.norm_rel_diff:.1e} (bound {bound:.1e}); "
        f"copies: {copy_counts[-1]} params at batch 40"
    )
    return Finding(
        NAME,
        QUESTION,
        CLAIM,
        verdict(holds),
        [Control("per-sample copies", CONTROL, verdict(control))],
        numbers,
        figure,
        headline,
    )


def _figure(out_dir: Path, shared: list[int], copies: list[int], summed: dict, batch: dict, control: dict) -> str:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(SIZES, shared, "o-", label="shared weights (the model)")
    left.plot(SIZES, copies, "s--", label="control: a copy per sample")
    left.set(xlabel="batch size", ylabel="parameters read by one forward", yscale="log", title="Parameters vs batch")
    left.legend()
    name = next(iter(summed))
    x = summed[name].flatten()
    right.scatter(x, batch[name].flatten(), s=6, label="batch gradient")
    right.scatter(x, control[name].flatten(), s=6, marker="x", label="control: gradient of copy 0")
    right.set(xlabel=f"sum of per-sample gradients / B  ({name})", ylabel="gradient", title="Gradients")
    right.legend()
    return save(fig, out_dir, NAME)
